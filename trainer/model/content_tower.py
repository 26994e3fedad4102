"""The item content tower: item ids -> content vector c [d] (EM3 §3.2, LEMUR's doc encoder).

    cached features (+ live MiniLM text in trainable mode) -> projections f_t, f_v -> fusion -> c

`source="fixed"` replaces all of it by the rows of a frozen table (the pe / task_pe baselines).
Id 0 (padding) always maps to the zero vector. The per-item feature and token tables are
non-persistent buffers: they come from the feature cache, so checkpoints hold only weights.
"""

from __future__ import annotations

import torch
from torch import nn

from common.errors import MMRankError
from trainer.model.config import ContentConfig
from trainer.model.fusion_variants import FUSIONS, build_fusion
from trainer.model.lora import apply_lora
from trainer.model.pca_table import load_content_table
from trainer.model.projections import Modalities, Projections

SOURCES = ("tower", "fixed")
ENCODER_MODES = ("frozen", "trainable")


def check_content_config(cfg: ContentConfig) -> None:
    """Reject option values the tower does not know, naming the field."""
    choices = {"source": SOURCES, "encoder_mode": ENCODER_MODES, "fusion": FUSIONS}
    for field, allowed in choices.items():
        if getattr(cfg, field) not in allowed:
            raise MMRankError(f"model.content.{field}={getattr(cfg, field)!r}; expected one of {allowed}")
    if cfg.source == "fixed" and not cfg.fixed_table:
        raise MMRankError("model.content.source='fixed' needs model.content.fixed_table (a .npy file)")
    if cfg.source == "tower":
        if not cfg.modalities:
            raise MMRankError("model.content.modalities is empty")
        if cfg.d % cfg.fusion_heads:
            raise MMRankError(f"model.content.d={cfg.d} is not divisible by fusion_heads={cfg.fusion_heads}")
        if cfg.num_queries < 1 or cfg.fusion_layers < 1:
            raise MMRankError("model.content.num_queries and fusion_layers must be >= 1")
        if cfg.encoder_mode == "trainable" and "text" not in cfg.modalities:
            raise MMRankError(
                "model.content.encoder_mode='trainable' needs 'text' in model.content.modalities"
            )


def _check_table(name: str, feats: torch.Tensor, mask: torch.Tensor) -> None:
    if feats.dim() != 3 or mask.shape != feats.shape[:2]:
        raise MMRankError(
            f"modality {name!r}: expected features [num_items + 1, K, D] and mask [num_items + 1, K], "
            f"got {tuple(feats.shape)} and {tuple(mask.shape)}"
        )


class ContentTower(nn.Module):
    def __init__(
        self,
        cfg: ContentConfig,
        modalities: Modalities,
        tokens: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        super().__init__()
        check_content_config(cfg)
        self.cfg = cfg
        self.text = None
        self._cached: list[str] = []
        rows = {name: int(feats.shape[0]) for name, (feats, _) in modalities.items()}
        if len(set(rows.values())) > 1:
            raise MMRankError(f"modality tables disagree on num_items + 1: {rows}")
        if cfg.source == "fixed":
            table = load_content_table(cfg.fixed_table, cfg.d, next(iter(rows.values()), None))
            self.register_buffer("table", torch.from_numpy(table), persistent=False)
            self.num_rows = table.shape[0]
            return
        self.table = None
        dims = {}
        for name in cfg.modalities:
            if cfg.encoder_mode == "trainable" and name == "text":
                dims[name] = self._build_text_tower(cfg, tokens)
                continue
            if name not in modalities:
                raise MMRankError(
                    f"modality {name!r} is configured but has no cached features; got {sorted(modalities)}"
                )
            feats, mask = modalities[name]
            _check_table(name, feats, mask)
            self.register_buffer(f"feats_{name}", feats.float(), persistent=False)
            self.register_buffer(f"mask_{name}", mask.bool(), persistent=False)
            self._cached.append(name)
            dims[name] = int(feats.shape[-1])
        self.num_rows = rows[self._cached[0]] if self._cached else self.text.num_rows
        if self.text is not None and self.text.num_rows != self.num_rows:
            raise MMRankError(
                f"token table has {self.text.num_rows} rows, the feature tables {self.num_rows}"
            )
        self.projections = Projections(dims, cfg.d)
        self.fusion = build_fusion(cfg)

    def _build_text_tower(self, cfg: ContentConfig, tokens) -> int:
        if tokens is None:
            raise MMRankError(
                "encoder_mode='trainable' needs the per-item token table (input_ids, attention_mask)"
            )
        # Imported here so the frozen mode never loads transformers.
        from trainer.model.text_tower import TextTower

        self.text = TextTower(tokens, cfg.trainable_layers, cfg.encoder_lora_rank)
        return self.text.dim

    @property
    def trainable_encoder(self) -> bool:
        return self.text is not None

    def forward(self, item_ids: torch.Tensor) -> torch.Tensor:
        """item ids [...] -> c [..., d]. Each distinct id is encoded once per call."""
        self._check_ids(item_ids)
        if item_ids.numel() == 0:
            return torch.zeros(*item_ids.shape, self.cfg.d, device=item_ids.device)
        unique, inverse = torch.unique(item_ids.reshape(-1), return_inverse=True)
        c = self._encode(unique)
        c = torch.where((unique != 0).unsqueeze(-1), c, torch.zeros_like(c))
        return c[inverse].reshape(*item_ids.shape, -1)

    def _encode(self, ids: torch.Tensor) -> torch.Tensor:
        if self.table is not None:
            return self.table[ids]
        tokens = {
            name: (getattr(self, f"feats_{name}")[ids], getattr(self, f"mask_{name}")[ids])
            for name in self._cached
        }
        if self.text is not None:
            tokens["text"] = self.text(ids)
        return self.fuse(tokens)

    def fuse(self, tokens: Modalities) -> torch.Tensor:
        """Single-modal features {name: (feats [B, K, D], mask [B, K])} -> c [B, d]. The ONNX 'fusion'
        graph wraps this; in trainable mode the text features are the encoder graph's output."""
        if self.table is None:
            x, key_mask, segments = self.projections(tokens)
            return self.fusion(x, key_mask, segments=segments)
        raise MMRankError("content source 'fixed' has no fusion: its vectors are table rows")

    def enable_lora(self, rank: int, alpha: float | None = None) -> None:
        """EM3 eq. 9, phase 2: freeze every weight of the projections and the fusion (queries and
        LayerNorms included) and add LoRA adapters to their Linear layers; only the adapters train.
        The live text encoder keeps its own setting (encoder_lora_rank / trainable_layers)."""
        if self.table is not None:
            raise MMRankError("content source 'fixed' has no weights to adapt")
        if rank <= 0:
            raise MMRankError(f"LoRA rank must be positive, got {rank}")
        if any(name.endswith("lora_a.weight") for name, _ in self.projections.named_parameters()):
            raise MMRankError("LoRA is already enabled on the content tower")
        for part in (self.projections, self.fusion):
            part.requires_grad_(False)
            apply_lora(part, rank, alpha)

    def _check_ids(self, item_ids: torch.Tensor) -> None:
        if item_ids.dtype not in (torch.int64, torch.int32):
            raise MMRankError(f"item ids must be int64 or int32, got {item_ids.dtype}")
        if item_ids.numel() == 0 or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return
        low, high = int(item_ids.min()), int(item_ids.max())
        if low < 0 or high >= self.num_rows:
            bad = low if low < 0 else high
            raise MMRankError(f"item id {bad} is unknown to the content tower (ids 0..{self.num_rows - 1})")
