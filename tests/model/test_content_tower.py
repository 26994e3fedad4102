"""ContentTower: ids -> c in tower / fixed / trainable-text modes, and the pe table."""

import numpy as np
import pytest
import torch

from common.errors import DataError, MMRankError
from trainer.model.config import ContentConfig
from trainer.model.content_tower import ContentTower
from trainer.model.pca_table import load_content_table, pca_table, save_content_table

N = 20


def _modalities(seed: int = 0, text_dim: int = 24):
    gen = torch.Generator().manual_seed(seed)
    text_mask = torch.rand(N + 1, 3, generator=gen) > 0.3
    image_mask = torch.rand(N + 1, 1, generator=gen) > 0.3
    text_mask[0], image_mask[0] = False, False
    text_mask[5], image_mask[5] = False, False  # item 5 has nothing at all
    return {
        "text": (torch.randn(N + 1, 3, text_dim, generator=gen), text_mask),
        "image": (torch.randn(N + 1, 1, 40, generator=gen), image_mask),
    }


def _tower(**overrides) -> ContentTower:
    torch.manual_seed(0)
    cfg = ContentConfig(d=16, dropout=0.0, **overrides)
    return ContentTower(cfg, _modalities()).eval()


@pytest.mark.parametrize("fusion", ["fq_former", "masked", "mean", "1flow", "2flow"])
def test_tower_shapes_padding_and_duplicates(fusion):
    tower = _tower(fusion=fusion)
    ids = torch.tensor([[[0, 3, 3], [5, 20, 0]], [[1, 2, 3], [0, 0, 0]]])
    c = tower(ids)
    assert c.shape == (2, 2, 3, 16)
    assert torch.isfinite(c).all()
    assert c[ids == 0].abs().max() == 0
    torch.testing.assert_close(c[0, 0, 1], c[0, 0, 2])
    torch.testing.assert_close(c[0, 0, 1], c[1, 0, 2])
    # The unique/scatter path equals encoding each row directly through `fuse`.
    direct = tower.fuse({name: (f[ids[1, 0]], m[ids[1, 0]]) for name, (f, m) in _modalities().items()})
    torch.testing.assert_close(c[1, 0], direct)
    assert tower(torch.zeros(0, 4, dtype=torch.long)).shape == (0, 4, 16)
    assert not tower.trainable_encoder


def test_feature_tables_are_not_in_the_checkpoint():
    tower = _tower()
    assert not any(k.startswith(("feats_", "mask_")) for k in tower.state_dict())
    assert any(k.startswith("projections.") for k in tower.state_dict())


def test_gradients_reach_projections_queries_and_fusion():
    tower = _tower().train()
    tower(torch.tensor([1, 2, 3, 4, 6, 7])).square().sum().backward()
    assert tower.fusion.queries.grad is not None and tower.fusion.queries.grad.abs().sum() > 0
    for name, p in tower.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_masked_modality_values_do_not_change_c():
    tower = _tower()
    ids = torch.arange(N + 1)
    before = tower(ids)
    feats, mask = tower.feats_text, tower.mask_text
    feats[~mask] = float("nan")
    tower.feats_image[~tower.mask_image] = 1e6
    torch.testing.assert_close(tower(ids), before)


def test_bad_ids_and_config_are_named():
    tower = _tower()
    with pytest.raises(MMRankError, match="item id 21 is unknown"):
        tower(torch.tensor([1, 21]))
    with pytest.raises(MMRankError, match="item id -1"):
        tower(torch.tensor([-1]))
    with pytest.raises(MMRankError, match="int64"):
        tower(torch.tensor([1.0]))
    with pytest.raises(MMRankError, match="fusion='nope'"):
        ContentTower(ContentConfig(fusion="nope"), _modalities())
    with pytest.raises(MMRankError, match="'audio' is configured"):
        ContentTower(ContentConfig(modalities=("text", "audio")), _modalities())
    with pytest.raises(MMRankError, match="missing modality features"):
        tower.fuse({"text": _modalities()["text"]})
    with pytest.raises(MMRankError, match="token table"):
        ContentTower(ContentConfig(encoder_mode="trainable"), _modalities())


def test_fixed_source_returns_table_rows(tmp_path):
    table = np.random.default_rng(0).standard_normal((N + 1, 16)).astype(np.float32)
    table[0] = 0
    path = tmp_path / "pe.npy"
    save_content_table(table, path)
    tower = ContentTower(ContentConfig(d=16, source="fixed", fixed_table=str(path)), _modalities())
    ids = torch.tensor([[3, 0], [7, 3]])
    np.testing.assert_array_equal(tower(ids).numpy(), table[ids.numpy()])
    assert not list(tower.parameters())
    assert not tower.state_dict()
    with pytest.raises(MMRankError, match="no fusion"):
        tower.fuse(_modalities())
    with pytest.raises(MMRankError, match="no weights"):
        tower.enable_lora(2)


def test_fixed_table_errors_name_the_file(tmp_path):
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((N + 1, 8), dtype=np.float32))
    with pytest.raises(DataError, match="wrong.npy.*expected a table"):
        ContentTower(ContentConfig(d=16, source="fixed", fixed_table=str(wrong)), _modalities())
    with pytest.raises(DataError, match="has 21 rows, the dataset needs 10"):
        load_content_table(wrong, 8, rows=10)
    corrupt = tmp_path / "corrupt.npy"
    corrupt.write_bytes(b"not numpy")
    with pytest.raises(DataError, match="corrupt.npy"):
        load_content_table(corrupt, 8)
    with pytest.raises(DataError, match="not found"):
        load_content_table(tmp_path / "absent.npy", 8)
    with pytest.raises(MMRankError, match="fixed_table"):
        ContentTower(ContentConfig(source="fixed"), _modalities())


def test_pca_table():
    modalities = _modalities()
    table = pca_table(modalities, 8)
    assert table.shape == (N + 1, 8) and table.dtype == np.float32
    assert not table[0].any()
    assert np.isfinite(table).all()
    np.testing.assert_array_equal(table, pca_table(modalities, 8))
    cov = np.cov(table[1:].T)
    np.testing.assert_allclose(cov - np.diag(np.diag(cov)), 0, atol=1e-4)  # components are uncorrelated
    assert np.all(np.diff(np.diag(cov)) <= 1e-6)  # sorted by variance
    np.testing.assert_allclose((table[1:] ** 2).mean(), 1.0, rtol=1e-5)
    with pytest.raises(MMRankError, match="exceeds"):
        pca_table(modalities, 64)


def _token_table(n: int, width: int = 8):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 5000, (n + 1, width), generator=gen)
    lengths = torch.randint(3, width + 1, (n + 1,), generator=gen)
    lengths[0] = 0
    lengths[2] = 0  # an item without text
    mask = (torch.arange(width) < lengths[:, None]).long()
    ids[:, 0] = 101
    ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
    return ids, mask


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_trainable_text_mode_trains_only_the_top_layers(lora_rank):
    torch.manual_seed(0)
    cfg = ContentConfig(d=16, encoder_mode="trainable", trainable_layers=1, encoder_lora_rank=lora_rank)
    modalities = {"image": _modalities()["image"]}  # text comes from the live encoder
    tower = ContentTower(cfg, modalities, tokens=_token_table(N))
    assert tower.trainable_encoder
    assert not any(k.startswith("text.input_ids") for k in tower.state_dict())
    ids = torch.tensor([[1, 2, 3], [3, 0, 1]])
    c = tower(ids)
    assert c.shape == (2, 3, 16) and torch.isfinite(c).all()
    assert c[1, 1].abs().max() == 0
    c.square().sum().backward()
    encoder = tower.text.encoder.model
    top, lower = encoder.encoder.layer[-1], encoder.encoder.layer[:-1]
    assert all(p.grad is None for p in lower.parameters())
    assert all(p.grad is None for p in encoder.embeddings.parameters())
    top_grads = {name: p.grad for name, p in top.named_parameters()}
    if lora_rank:
        assert all((g is not None) == ("lora_" in name) for name, g in top_grads.items())
    else:
        assert all(g is not None for g in top_grads.values())
    assert tower.projections.proj["text"][0].weight.grad is not None
    assert tower.projections.proj["image"][0].weight.grad is not None
