"""Item text fields -> the text encoder graph's inputs, with the exported tokenizer files.

Two layouts, the same the trainer used (recorded in the manifest's tokenizer section):
- per field (frozen encoder, the feature cache): one text per field, K tokens per item, each
  truncated to `max_length`;
- joined (trainable encoder): the item's non-empty fields joined by " [SEP] ", one text per item.
A field that is empty or whitespace gives an all-zero attention mask row and text_mask False, which
the encoder maps to a zero vector and the fusion masks out. Within one call every text is padded to
the longest (at least one column), as `TextEncoder.tokenize` does with `padding=True`.

A text longer than CHARS_PER_TOKEN * max_length characters is first encoded by a prefix: up to its
last space within that many characters. The tokenizers split words at spaces and normalise character by
character (BERT's WordPiece, and BPE or SentencePiece with their usual pre-tokenizers: checked on "a b"
when the tokenizer loads, else texts are never cut), so the prefix's tokens are the text's first tokens.
When the prefix fills max_length, truncation keeps exactly those tokens from the whole text too, and the
prefix's encoding is the text's; only when it does not (a text of mostly whitespace) is the whole text
encoded, which the per-field byte limit bounds (model_repository/limits.py EncodeLimits). So a 4 MB
field costs the tokenizer a few thousand characters, not the whole field, with the same result.

Uses the `tokenizers` library on tokenizer.json directly: no transformers import in the server.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from common.errors import MMRankError

# Far above natural text's 4 to 5 characters a token, so the prefix nearly always fills max_length.
CHARS_PER_TOKEN = 16
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> Path:
    src, dst = Path(src), Path(dst)
    if not (src / "tokenizer.json").is_file():
        raise MMRankError(f"{src}: no tokenizer.json to export")
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    return dst


def _text(value) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


class ItemTokenizer:
    """texts [B, K] (str or UTF-8 bytes) -> input_ids, attention_mask [B, K', T] int64, text_mask [B, K']
    bool, where K' = K per field or 1 joined."""

    def __init__(self, folder: str | Path, max_length: int, join_fields: bool):
        from tokenizers import Tokenizer

        folder = Path(folder)
        try:
            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            config = json.loads((folder / "tokenizer_config.json").read_text())
        except Exception as e:  # tokenizers raises a plain Exception on a malformed file
            raise MMRankError(f"{folder}: unreadable tokenizer files ({type(e).__name__}: {e})") from e
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)
        self.max_length = max_length
        pre = self.tokenizer.pre_tokenizer
        splits_at_spaces = pre is not None and len(pre.pre_tokenize_str("a b")) == 2
        self.cut_at = CHARS_PER_TOKEN * max_length if splits_at_spaces else None
        self.pad_id = self.tokenizer.token_to_id(config.get("pad_token", "[PAD]")) or 0
        self.sep = config.get("sep_token", "[SEP]")
        self.join_fields = join_fields

    def texts(self, fields: np.ndarray) -> list[str]:
        """[B, K] fields -> the B * K' texts to encode ("" = nothing to encode)."""
        rows = [[_text(v) for v in row] for row in np.asarray(fields, dtype=object)]
        if self.join_fields:
            return [f" {self.sep} ".join(t for t in row if t.strip()) for row in rows]
        return [t if t.strip() else "" for row in rows for t in row]

    def _prefix(self, text: str) -> str:
        """`text` up to its last space within the first `cut_at` characters; the whole text where it is
        shorter, has no such space or the tokenizer does not split words at spaces."""
        if self.cut_at is None or len(text) <= self.cut_at:
            return text
        space = text.rfind(" ", 0, self.cut_at)
        return text[:space] if space > 0 else text

    def encode(self, texts: list[str]) -> list:
        """The truncated encodings of `texts`, each from its prefix where that gives the same tokens
        (the module's docstring says why)."""
        prefixes = [self._prefix(t) for t in texts]
        encoded = self.tokenizer.encode_batch(prefixes)
        short = [
            i
            for i, (text, prefix, e) in enumerate(zip(texts, prefixes, encoded, strict=True))
            if len(prefix) < len(text) and len(e.ids) < self.max_length
        ]
        for i, e in zip(short, self.tokenizer.encode_batch([texts[i] for i in short]), strict=True):
            encoded[i] = e
        return encoded

    def __call__(self, fields: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        fields = np.asarray(fields, dtype=object)
        if fields.ndim != 2:
            raise MMRankError(f"text fields must be [items, fields], got shape {fields.shape}")
        b = fields.shape[0]
        texts = self.texts(fields)
        present = np.array([bool(t) for t in texts], dtype=bool)
        encoded = self.encode([t for t in texts if t])
        width = max([len(e.ids) for e in encoded], default=1)
        ids = np.full((len(texts), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), width), dtype=np.int64)
        for row, e in zip(np.flatnonzero(present), encoded, strict=True):
            ids[row, : len(e.ids)] = e.ids
            mask[row, : len(e.ids)] = e.attention_mask
        k = len(texts) // b if b else (1 if self.join_fields else fields.shape[1])
        return ids.reshape(b, k, width), mask.reshape(b, k, width), present.reshape(b, k)
