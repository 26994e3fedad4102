"""LoRA (EM3 eq. 9): unchanged output at enable time, no gradient into the frozen weights."""

import pytest
import torch
from torch import nn

from common.errors import MMRankError
from trainer.model.config import ContentConfig
from trainer.model.content_tower import ContentTower
from trainer.model.lora import LoRALinear, apply_lora


def test_lora_linear_starts_as_the_base_and_trains_only_adapters():
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    x = torch.randn(5, 8)
    expected = base(x).detach()
    lora = LoRALinear(base, rank=2)
    torch.testing.assert_close(lora(x), expected)
    lora.weight.requires_grad_(True)  # the stop-gradient must hold even if someone re-enables it
    lora(x).sum().backward()
    assert lora.weight.grad is None and lora.bias.grad is None
    assert lora.lora_a.weight.grad is not None and lora.lora_b.weight.grad is not None


def test_lora_linear_adds_the_scaled_low_rank_term():
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    lora = LoRALinear(base, rank=2, alpha=4.0)
    nn.init.normal_(lora.lora_b.weight)
    x = torch.randn(3, 8)
    delta = lora.lora_b.weight @ lora.lora_a.weight
    torch.testing.assert_close(lora(x), base(x) + 2.0 * x @ delta.T)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(base, rank=0)


def test_apply_lora_swaps_linears_in_place_and_keeps_state_dict_names():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)))
    before = model.state_dict()
    x = torch.randn(2, 4)
    expected = model(x).detach()
    names = apply_lora(model, rank=2)
    assert names == ["0", "2.0"]
    assert isinstance(model[0], LoRALinear) and isinstance(model[2][0], LoRALinear)
    torch.testing.assert_close(model(x), expected)
    missing, unexpected = model.load_state_dict(before, strict=False)
    assert not unexpected and all("lora_" in k for k in missing)
    assert apply_lora(model, rank=2) == []  # adapters are never wrapped again


def test_apply_lora_target_filter():
    model = nn.ModuleDict({"query": nn.Linear(4, 4), "value": nn.Linear(4, 4)})
    assert apply_lora(model, 1, target=lambda name, m: isinstance(m, nn.Linear) and name == "query") == [
        "query"
    ]
    assert isinstance(model["query"], LoRALinear) and isinstance(model["value"], nn.Linear)
    with pytest.raises(TypeError, match="nn.Linear"):
        apply_lora(nn.Sequential(nn.ReLU()), 1, target=lambda name, m: True)


@pytest.mark.parametrize("fusion", ["fq_former", "2flow", "mean"])
def test_content_tower_enable_lora(fusion):
    torch.manual_seed(0)
    n = 12
    modalities = {
        "text": (torch.randn(n + 1, 2, 24), torch.rand(n + 1, 2) > 0.3),
        "image": (torch.randn(n + 1, 1, 40), torch.rand(n + 1, 1) > 0.3),
    }
    tower = ContentTower(ContentConfig(d=16, fusion=fusion, dropout=0.0), modalities).eval()
    ids = torch.tensor([[1, 2, 3], [4, 0, 12]])
    before = tower(ids).detach()
    base_names = {name for name, _ in tower.named_parameters()}
    tower.enable_lora(rank=2)
    torch.testing.assert_close(tower(ids), before)
    trainable = [name for name, p in tower.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    tower(ids).square().sum().backward()
    params = dict(tower.named_parameters())
    assert all(params[name].grad is None for name in base_names)
    assert all(params[name].grad is not None for name in trainable)
    with pytest.raises(MMRankError, match="already enabled"):
        tower.enable_lora(rank=2)
