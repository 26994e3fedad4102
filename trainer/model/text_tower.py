"""The live text encoder of the trainable mode (LEMUR): MiniLM on each item's token row, in the loop.

Only the top `trainable_layers` transformer layers learn, either fully or, with `lora_rank` > 0,
through LoRA adapters on their Linear layers; embeddings and lower layers stay frozen (their autograd
graph is never built, since nothing below them needs a gradient). The per-item token table comes
from `TextEncoder.tokenize_items` and is a non-persistent buffer: it belongs to the data, not the
checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from common.errors import MMRankError
from trainer.features.text import TextEncoder
from trainer.model.lora import apply_lora


class TextTower(nn.Module):
    """item ids [U] -> (text features [U, 1, 384], present [U, 1] bool): one token per item, the mean
    pooled MiniLM output of its joined text fields (zeros and present=False for an item without text)."""

    def __init__(
        self,
        tokens: tuple[torch.Tensor, torch.Tensor],
        trainable_layers: int,
        lora_rank: int = 0,
        model_path: str | Path | None = None,
    ):
        super().__init__()
        input_ids, attention_mask = tokens
        if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
            raise MMRankError(
                "trainable text mode: the token table must be input_ids and attention_mask of the same "
                f"shape [num_items + 1, T], got {tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
            )
        self.encoder = TextEncoder(model_path)
        self.dim = self.encoder.dim
        layers = self.encoder.model.encoder.layer
        if not 0 <= trainable_layers <= len(layers):
            raise MMRankError(f"trainable_layers={trainable_layers}: MiniLM has {len(layers)} layers")
        if lora_rank > 0:
            self.encoder.train_top_layers(0)
            for layer in layers[len(layers) - trainable_layers :]:
                apply_lora(layer, lora_rank)
        else:
            self.encoder.train_top_layers(trainable_layers)
        self.register_buffer("input_ids", input_ids.long(), persistent=False)
        self.register_buffer("attention_mask", attention_mask.long(), persistent=False)

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    def forward(self, item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.input_ids[item_ids], self.attention_mask[item_ids]
        # Rows are right-padded to the table's width; cut to the longest row of this batch.
        width = max(int(mask.sum(1).max()), 1) if mask.numel() else 1
        feats = self.encoder(ids[:, :width], mask[:, :width])
        return feats.unsqueeze(1), mask.bool().any(1, keepdim=True)
