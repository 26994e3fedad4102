"""Low-rank adapters (EM3 eq. 9): f(x) = sg(W x + b) + W_b (W_a x).

EM3 trains the content tower fully on short histories, then freezes it and adds LoRA to follow the
data while the history grows. The same adapters put LoRA on the trainable MiniLM layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable rank-`rank` bypass, scaled by alpha / rank.

    The base weight and bias keep their names (`weight`, `bias`), so a checkpoint written before LoRA
    loads into the adapted module with only the `lora_a` / `lora_b` keys missing. W_b starts at zero,
    so the output is unchanged at the moment the adapter is added.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # EM3 eq. 9 has no scale: alpha defaults to the rank, which makes it 1.
        self.scale = (rank if alpha is None else alpha) / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Linear(self.in_features, rank, bias=False, **factory)
        self.lora_b = nn.Linear(rank, self.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The detach is the stop-gradient of eq. 9: W gets no gradient even if requires_grad is set again.
        bias = None if self.bias is None else self.bias.detach()
        frozen = F.linear(x, self.weight.detach(), bias)
        return frozen + self.scale * self.lora_b(self.lora_a(x))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.lora_a.out_features}, scale={self.scale}"


def _is_linear(_name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def apply_lora(
    module: nn.Module,
    rank: int,
    alpha: float | None = None,
    target: Callable[[str, nn.Module], bool] = _is_linear,
) -> list[str]:
    """Replace, in place, every submodule of `module` that `target(name, submodule)` selects (by default
    every nn.Linear) with a LoRALinear around it. Returns the replaced names, relative to `module`.

    Only the selected layers are frozen; freeze the rest of `module` yourself where that is wanted.
    """
    if isinstance(module, LoRALinear):
        return []
    adapted = [name + "." for name, sub in module.named_modules() if isinstance(sub, LoRALinear)]
    chosen = [
        (name, sub)
        for name, sub in module.named_modules()
        if name
        and not isinstance(sub, LoRALinear)
        and not any(name.startswith(prefix) for prefix in adapted)  # the adapters' own Linears
        and target(name, sub)
    ]
    for name, sub in chosen:
        if not isinstance(sub, nn.Linear):
            raise TypeError(f"LoRA needs an nn.Linear, {name!r} is a {type(sub).__name__}")
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, LoRALinear(sub, rank, alpha))
    return [name for name, _ in chosen]
