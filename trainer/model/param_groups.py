"""The optimizer's parameter groups, shared by every model of the trainer."""

from __future__ import annotations

from torch import nn


def param_groups(
    model: nn.Module, content: nn.Module | None, lr_content: float, lr_ranker: float, weight_decay: float
) -> list[dict]:
    """AdamW groups: the `content` module (the content tower, the fusion) vs the rest, each split into
    decayed (matrices) and not decayed (biases, norms, embedding tables: decoupled decay would shrink
    rarely seen ID rows every step). Frozen parameters are left out."""
    tower = {id(p) for p in content.parameters()} if content is not None else set()
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            part = "content" if id(p) in tower else "ranker"
            decay = p.dim() >= 2 and id(p) not in embeddings
            groups.setdefault((part, decay), []).append(p)
    lrs = {"content": lr_content, "ranker": lr_ranker}
    return [
        {
            "name": f"{part}/{'decay' if decay else 'no_decay'}",
            "params": params,
            "lr": lrs[part],
            "weight_decay": weight_decay if decay else 0.0,
        }
        for (part, decay), params in sorted(groups.items())
    ]
