"""Typed model configuration. Defaults are the papers' (EM3 §4.1, LEMUR) scaled to our data.

Each sub-config belongs to one part of the model; presets (trainer/presets/*.json) override fields by
dotted path, e.g. {"model.content.fusion": "mean"}.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ContentConfig:
    """Item content tower: single-modal features -> projections -> fusion -> content vector c."""

    d: int = 64  # content vector dimension [EM3: 64]
    modalities: tuple[str, ...] = ("text", "image")  # ItemFeatures modalities fed to the fusion
    fusion: str = "fq_former"  # fq_former | mean | 1flow | 2flow | masked
    num_queries: int = 2  # FQ-Former learnable queries [EM3: 2]
    fusion_layers: int = 1  # [EM3: 1]
    fusion_heads: int = 4  # [EM3: 4]
    fusion_ffn: int = 0  # FFN width as a multiple of d after each attention block; 0 = none (EM3 public code)
    dropout: float = 0.1  # hidden dropout in the fusion blocks (attention dropout is 0, as in EM3's code)
    source: str = "tower"  # tower: computed by the model | fixed: a frozen per-item table (pe, task_pe)
    fixed_table: str | None = None  # .npy [num_items + 1, d] when source == "fixed"
    encoder_mode: str = (
        "frozen"  # frozen: cached encoder features (EM3 hybrid) | trainable: MiniLM in the loop (LEMUR)
    )
    trainable_layers: int = 2  # MiniLM top layers fine-tuned in trainable mode
    encoder_lora_rank: int = 0  # > 0: LoRA on the trainable MiniLM layers instead of full fine-tuning
    max_text_tokens: int = 64
    sample_p: float = 0.2  # LEMUR p: share of target items encoded per step (rest read from the bank)
    sample_q: float = 0.2  # LEMUR q: share that back-propagates, q <= p
    stop_gradient: bool = False  # LEMUR Table 5: no ranking-loss gradient into the tower (aux losses still)


@dataclass
class InterestConfig:
    """User interest over the history of content vectors."""

    short_len: int = 20  # short history length [EM3 phase 1: 20]
    long_len: int = 0  # long history length (EM3 LoRA phase, LEMUR long sequence); 0 = off
    target_attention: bool = True  # EM3 eq. 7-8
    attention_heads: int = 1
    # Every attention of the model (target attention, decoder, FQ-Former): sdpa (torch's fused attention)
    # | fused (the Triton kernel on CUDA, attention + cosine features in one pass; reference on CPU)
    # | reference (the plain masked softmax)
    attention_impl: str = "sdpa"
    decoder_layers: int = 0  # LEMUR/LONGER cross-attention decoder layers; 0 = off
    decoder_queries: int = 2  # global query tokens built from non-sequence features
    decoder_heads: int = 1
    similarity_topk: int = 0  # LEMUR cosine features: cos(c, c_ui) + sorted top-k copy; 0 = off
    memory_bank: bool = False  # LEMUR: history vectors read from the bank, no encoder on history items
    lora_rank: int = 0  # EM3 eq. 9: LoRA rank on the content tower for the long-history phase


@dataclass
class RankerConfig:
    id_dim: int = 32  # ID embedding dimension (user, item, categoricals)
    use_item_id: bool = True
    use_content_item: bool = True  # c of the target item (EM3 Table 6 "item")
    use_content_user: bool = True  # u, decoder output, similarity features (EM3 Table 6 "user")
    hidden: tuple[int, ...] = (256, 128)
    # mlp | rankmixer (token mixing + per-token FFN) | dot (matrix factorisation: <user ID emb, item ID
    # emb>, no categoricals, user features or content; BPR-MF)
    mixer: str = "mlp"
    token_dim: int = 64  # rankmixer token width (rounded up to a multiple of the token count)
    mixer_layers: int = 2  # rankmixer layers
    dropout: float = 0.1
    # Items with no training interaction share one learned "new item" ID row (row 0). ID dropout trains
    # it: this share of training targets reads row 0 instead of their own row, so the row learns what
    # an uninformative ID means and the ranker learns to lean on content (and categoricals) then.
    item_id_dropout: float = 0.1


@dataclass
class LossConfig:
    # bce: pointwise on labelled samples | bpr: pairwise vs one sampled negative per positive | none: the
    # auxiliary losses alone (stage 1 of LEMUR's two-stage baseline: SQDC only)
    main: str = "bce"
    cic_alpha: float = 0.0  # EM3 CIC weight [0.1]
    cic_tau: float = 0.1  # [0.1]
    cic_dim: int = 64  # width of the shared space of f_cic(c) and f'_cic(id)
    sqdc_lambda: float = 0.0  # LEMUR SQDC weight
    sqdc_scale: float = 50.0  # T, multiplies the cosine [50]
    sqdc_request_mask: bool = True  # mask other samples of the same request from the denominator


@dataclass
class ModelConfig:
    content: ContentConfig = field(default_factory=ContentConfig)
    interest: InterestConfig = field(default_factory=InterestConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
