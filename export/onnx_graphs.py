"""`mmrank export --run RUN --out DIR`: the trained model as ONNX graphs, the item table and a manifest.

    encoder_text.onnx   input_ids, attention_mask [B, K, T] int64 -> text_feats [B, K, 384]
    encoder_image.onnx  pixels [B, 3, 224, 224] float32 -> image_feats [B, 1, 1280]
    fusion.onnx         {m}_feats [B, K_m, D_m], {m}_mask [B, K_m] per modality -> content [B, d]
    ranking.onnx        user_id [B], user_feats [B, U], candidate_item [B, N, E], candidate_c [B, N, d],
                        history_c [B, L, d], history_mask [B, L] (+ long_history_*), candidate_known
                        [B, N] -> scores [B, N] (-inf for unknown candidates); for a two-tower model
                        user_id [B], candidate_item [B, N, E], candidate_known [B, N] -> scores [B, N]
    *.fp16.onnx         the same graphs with fp16 weights and arithmetic, fp32 / int / bool at the edges
    item_table/         content vectors + item ID rows of every item (export/item_table.py); a two-tower
                        model's propagated item vectors (+ placement/, for new items)
    user_table.npy      a two-tower model's propagated user vectors [num_users + 1, E] (row 0: unknown)
    tokenizer/          the text encoder's tokenizer files
    manifest.json       every graph's inputs and outputs read back from the files (export/manifest.py)

Every graph wraps the trained modules themselves (no second model definition): the encoders are the
trainer's TextEncoder / ImageEncoder (the fine-tuned one in trainable mode), fusion is
`ContentTower.fuse`, ranking is `RankingModel.score`. The ranking graph reads the item token from the
item table (`candidate_item`) instead of looking ids up in its own embeddings, so a table version can
carry items the graph never saw (see `table_ranker`). A two-tower model (LightGCN, FREEDOM, EM3 on
FREEDOM) needs no special serving: its item vectors are the table's item rows, the lookup's generic
products, and its ranking graph holds the user table and takes their dot product
(`TwoTowerRankingGraph`). `scores` are logits; sigmoid gives the click
probability. Encoders use the TorchScript exporter (dynamo=False), as trainer/features/runtime.py does.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.atomic import atomic_dir, check_not_above
from common.errors import MMRankError
from export.item_table import build_item_table, build_placement, build_user_table
from export.manifest import GraphSpec, Manifest, ModelInfo, TokenizerInfo, onnx_io, sha256_file
from export.native_runtime import fit_native_runtime
from export.torch_program import write_ranking_programs
from model_repository import item_table as it
from model_repository.text_inputs import copy_tokenizer_files
from trainer.evaluate import is_two_tower
from trainer.model.attention import standard_attention, use_standard_attention

OPSET = 17
GRAPH_FILES = {  # manifest.GRAPH_NAMES -> file stem
    "text_encoder": "encoder_text",
    "image_encoder": "encoder_image",
    "fusion": "fusion",
    "ranking": "ranking",
}


# ---- graph modules ---------------------------------------------------------------------------------
class FieldTextEncoder(nn.Module):
    """TextEncoder over K texts per item: [B, K, T] ids and mask -> [B, K, dim]. K and dim are
    fixed (Python ints), so the graph's output shape states them."""

    def __init__(self, encoder: nn.Module, fields: int):
        super().__init__()
        self.encoder, self.fields = encoder, fields

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        t = input_ids.shape[-1]
        feats = self.encoder(input_ids.reshape(-1, t), attention_mask.reshape(-1, t))
        return feats.reshape(-1, self.fields, self.encoder.dim)


class ImageTokens(nn.Module):
    """ImageEncoder as the fusion's image modality: one token per item, [B, 1, 1280]."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixels: Tensor) -> Tensor:
        return self.encoder(pixels).unsqueeze(1)


class FusionGraph(nn.Module):
    """ContentTower.fuse with one (features, mask) input pair per modality, in the tower's order."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower
        self.names = list(tower.projections.proj)

    def forward(self, *pairs: Tensor) -> Tensor:
        tokens = {name: (pairs[2 * i], pairs[2 * i + 1]) for i, name in enumerate(self.names)}
        return self.tower.fuse(tokens)


def table_ranker(model: nn.Module) -> nn.Module:
    """A shallow copy of the RankingModel whose ranker takes item-table rows where it took candidate
    ids: `Ranker.item_features` (the id -> item token lookup) becomes the identity, every parameter is
    shared. The rows are exactly `Ranker.item_features(ids)` (the item table's item_rows), so scores
    are unchanged for known ids."""
    ranker = copy.copy(model.ranker)
    ranker.item_features = lambda rows: rows  # instance attribute: shadows the method on this copy only
    swapped = copy.copy(model)
    swapped._modules = dict(model._modules)  # the copy gets its own child table before the swap
    swapped._modules["ranker"] = ranker
    return swapped


class RankingGraph(nn.Module):
    """RankingModel.score on lookup products. `names` are the graph inputs in order (item_table names).

    `candidate_known` (False where the item table has no row for the candidate) sets that candidate's
    score to -inf: an unknown id is ranked last, never scored from the padding row.

    Zero candidates answer [B, 0]: the model's reshapes infer a -1 axis, which is ambiguous over zero
    elements (in torch, and in ONNX Runtime, whose graph optimizer turns even explicitly computed
    shapes back into a -1), so the graph scores one zero candidate after the request's and drops its
    score. Candidates are scored independently, so the others' scores are unchanged."""

    def __init__(self, model: nn.Module):
        super().__init__()
        cfg = model.cfg
        self.model = table_ranker(model)
        self.num_user_feats = len(model.schema.user_feat_cards)
        self.item_dim = model.ranker.item_dim
        self.has_content = model.tower is not None
        user_side = self.has_content and cfg.ranker.use_content_user
        self.long = user_side and cfg.interest.long_len > 0
        if not (self.item_dim or self.has_content):
            raise MMRankError("the model has neither item ID features nor content features to rank with")
        self.names = [it.USER_ID] + ([it.USER_FEATS] if self.num_user_feats else [])
        self.names += [it.CANDIDATE_ITEM] if self.item_dim else []
        self.names += [it.CANDIDATE_C] if self.has_content else []
        self.names += [it.HISTORY_C, it.HISTORY_MASK] if user_side else []
        self.names += [it.LONG_HISTORY_C, it.LONG_HISTORY_MASK] if self.long else []
        self.names += [it.CANDIDATE_KNOWN]

    def forward(self, *inputs: Tensor) -> Tensor:
        x = dict(zip(self.names, inputs, strict=True))
        for name in (it.CANDIDATE_C, it.CANDIDATE_ITEM):
            if name in x:  # one zero candidate after the request's (see the class docstring)
                x[name] = F.pad(x[name], (0, 0, 0, 1))
        user_id = x[it.USER_ID]
        user_feats = x.get(it.USER_FEATS, user_id.new_zeros(user_id.shape[0], 0))
        cand_c = x.get(it.CANDIDATE_C)
        rows = x.get(it.CANDIDATE_ITEM)
        if rows is None:
            rows = cand_c.new_zeros(*cand_c.shape[:2], 0)
        scores = self.model.score(
            user_id,
            user_feats,
            rows,
            cand_c,
            x.get(it.HISTORY_C),
            x.get(it.HISTORY_MASK),
            x.get(it.LONG_HISTORY_C),
            x.get(it.LONG_HISTORY_MASK),
        )
        return scores[:, :-1].masked_fill(~x[it.CANDIDATE_KNOWN], float("-inf"))


class TwoTowerRankingGraph(nn.Module):
    """A two-tower model's scores on lookup products: <users[user_id], candidate_item>, -inf where
    `candidate_known` is False. The user table (the model's propagated users, row 0 = the unknown user,
    zeros: it scores 0 against every item) is a constant of the graph; the item vectors are table rows."""

    def __init__(self, model: nn.Module):
        super().__init__()
        model.eval()
        users, items = model.tables()
        self.register_buffer("users", users.detach().clone())
        self.num_user_feats, self.item_dim = 0, int(items.shape[1])
        self.names = [it.USER_ID, it.CANDIDATE_ITEM, it.CANDIDATE_KNOWN]

    def forward(self, *inputs: Tensor) -> Tensor:  # one varargs signature for every ranking graph
        user_id, candidate_item, candidate_known = inputs
        scores = (self.users[user_id][:, None, :] * candidate_item).sum(-1)
        return scores.masked_fill(~candidate_known, float("-inf"))


class Fp16Graph(nn.Module):
    """A half-precision copy of a graph module with float32 inputs and outputs, so the fp16 variant
    has the same interface as the fp32 one.

    Attention runs its plain implementation in the copy: the TorchScript exporter writes
    scaled_dot_product_attention's mask as an fp32 constant, which makes an fp16 graph ill-typed.
    The reference is tested against SDPA in tests/model/test_attention.py."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(module).half()
        use_plain_attention(self.module)

    def forward(self, *inputs: Tensor) -> Tensor:
        cast = [x.half() if x.is_floating_point() else x for x in inputs]
        return self.module(*cast).float()


def use_plain_attention(module: nn.Module) -> None:
    """Switch every attention inside `module` to its masked-softmax reference (MiniLM to eager)."""
    from transformers import PreTrainedModel

    use_standard_attention(module, plain=True)
    for sub in module.modules():
        if isinstance(sub, PreTrainedModel):  # MiniLM
            sub.set_attn_implementation("eager")


# ---- one graph -------------------------------------------------------------------------------------
@dataclass
class GraphBuild:
    """What torch.onnx.export needs for one graph: example inputs (by name), output name, axes."""

    module: nn.Module
    inputs: dict[str, Tensor]
    output: str
    axes: dict[str, dict[int, str]] = field(default_factory=dict)


def export_onnx(build: GraphBuild, path: Path, output_shape: tuple[int, ...], opset: int = OPSET) -> Path:
    """Export to a temporary sibling, check it with onnx.checker, then rename into place.
    `output_shape` is the output's shape for the example inputs (fixed axes are declared from it)."""
    import onnx

    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # TorchScript exporter deprecation + tracer notes on constants
            torch.onnx.export(
                build.module.eval(),
                tuple(build.inputs.values()),
                tmp,
                input_names=list(build.inputs),
                output_names=[build.output],
                dynamic_axes=build.axes,
                opset_version=opset,
                dynamo=False,
            )
        _declare_output_shape(tmp, build, output_shape)
        onnx.checker.check_model(tmp, full_check=True)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the graph from a server running as another user
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _declare_output_shape(path: str, build: GraphBuild, example: tuple[int, ...]) -> None:
    """State the output's fixed axes (the example's sizes) where the exporter left a generated name:
    the manifest and the Triton configs then carry e.g. [batch, 2, 384] instead of [batch, ?, ?]. The
    file is written at an IR version the native backend's ONNX Runtime reads (`fit_native_runtime`)."""
    import onnx

    model = fit_native_runtime(onnx.load(path))
    dynamic = build.axes.get(build.output, {})
    for axis, dim in enumerate(model.graph.output[0].type.tensor_type.shape.dim):
        if axis in dynamic:
            dim.dim_param = dynamic[axis]
        else:
            dim.dim_value = example[axis]
    onnx.save(model, path)


def write_graph(name: str, build: GraphBuild, out: Path, fp16: bool) -> GraphSpec:
    stem = GRAPH_FILES[name]
    # The output shape comes from the fp32 module: an eager fp16 forward on a CPU is very slow
    # (about 100 s for EfficientNet-Lite0 here), while tracing the fp16 copy takes seconds.
    with torch.inference_mode():
        shape = tuple(build.module.eval()(*build.inputs.values()).shape)
    fp32_path = export_onnx(build, out / f"{stem}.onnx", shape)
    fp16_path = None
    if fp16:
        half = GraphBuild(Fp16Graph(build.module), build.inputs, build.output, build.axes)
        fp16_path = export_onnx(half, out / f"{stem}.fp16.onnx", shape)
    inputs, outputs = onnx_io(fp32_path)
    return GraphSpec(
        file=fp32_path.name,
        fp16_file=fp16_path.name if fp16_path else None,
        sha256=sha256_file(fp32_path),
        fp16_sha256=sha256_file(fp16_path) if fp16_path else None,
        inputs=inputs,
        outputs=outputs,
    )


# ---- the builds of one model -----------------------------------------------------------------------
def _axes(names: dict[str, tuple[str, ...]]) -> dict[str, dict[int, str]]:
    return {name: dict(enumerate(dims)) for name, dims in names.items()}


def ranking_build(model: nn.Module) -> GraphBuild:
    graph = TwoTowerRankingGraph(model) if is_two_tower(model) else RankingGraph(model)
    cfg = model.cfg
    gen = torch.Generator().manual_seed(0)
    b, n, d = 2, 3, cfg.content.d
    lengths = {it.HISTORY_C: 5, it.LONG_HISTORY_C: 7}
    # Distinct example sizes per axis, so the tracer cannot tie two dynamic axes together.
    examples = {
        it.USER_ID: torch.tensor([1, 0]),
        it.USER_FEATS: torch.zeros(b, graph.num_user_feats, dtype=torch.int64),
        it.CANDIDATE_ITEM: torch.randn(b, n, graph.item_dim, generator=gen),
        it.CANDIDATE_C: torch.randn(b, n, d, generator=gen),
        it.HISTORY_C: torch.randn(b, lengths[it.HISTORY_C], d, generator=gen),
        it.HISTORY_MASK: torch.arange(lengths[it.HISTORY_C]).expand(b, -1) >= 2,
        it.LONG_HISTORY_C: torch.randn(b, lengths[it.LONG_HISTORY_C], d, generator=gen),
        it.LONG_HISTORY_MASK: torch.arange(lengths[it.LONG_HISTORY_C]).expand(b, -1) >= 3,
        it.CANDIDATE_KNOWN: torch.tensor([[True, False, True], [True, True, True]]),
    }
    axes = {
        it.USER_ID: ("batch",),
        it.USER_FEATS: ("batch",),
        it.CANDIDATE_ITEM: ("batch", "candidates"),
        it.CANDIDATE_C: ("batch", "candidates"),
        it.HISTORY_C: ("batch", "history"),
        it.HISTORY_MASK: ("batch", "history"),
        it.LONG_HISTORY_C: ("batch", "long_history"),
        it.LONG_HISTORY_MASK: ("batch", "long_history"),
        it.CANDIDATE_KNOWN: ("batch", "candidates"),
        "scores": ("batch", "candidates"),
    }
    inputs = {name: examples[name] for name in graph.names}
    return GraphBuild(
        graph, inputs, "scores", _axes({k: v for k, v in axes.items() if k in inputs or k == "scores"})
    )


def fusion_build(tower: nn.Module) -> GraphBuild:
    graph = FusionGraph(tower)
    gen = torch.Generator().manual_seed(1)
    inputs, axes = {}, {"content": ("batch",)}
    for name in graph.names:
        k, dim = modality_shape(tower, name)
        inputs[f"{name}_feats"] = torch.randn(2, k, dim, generator=gen)
        inputs[f"{name}_mask"] = torch.tensor([[True] * k, [False] * k])
        axes[f"{name}_feats"] = axes[f"{name}_mask"] = ("batch",)
    return GraphBuild(graph, inputs, "content", _axes(axes))


def modality_shape(tower: nn.Module, name: str) -> tuple[int, int]:
    """(tokens K, width D) of one fusion modality: the cached table's, or one MiniLM token."""
    dim = int(tower.projections.proj[name][0].in_features)
    if name == "text" and tower.text is not None:
        return 1, dim
    return int(getattr(tower, f"feats_{name}").shape[1]), dim


def text_build(encoder: nn.Module, fields: int) -> GraphBuild:
    ids = torch.randint(1000, 2000, (2, fields, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :, 5:] = 0
    mask[1, -1] = 0  # an empty field
    axes = {
        "input_ids": ("batch", None, "tokens"),
        "attention_mask": ("batch", None, "tokens"),
        "text_feats": ("batch",),
    }
    return GraphBuild(
        FieldTextEncoder(encoder, fields),
        {"input_ids": ids, "attention_mask": mask},
        "text_feats",
        {name: {i: a for i, a in enumerate(dims) if a} for name, dims in axes.items()},
    )


def image_build(encoder: nn.Module) -> GraphBuild:
    from trainer.features.image import IMAGE_SIZE

    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(3))
    return GraphBuild(
        ImageTokens(encoder),
        {"pixels": pixels},
        "image_feats",
        _axes({"pixels": ("batch",), "image_feats": ("batch",)}),
    )


# ---- a whole export --------------------------------------------------------------------------------
@dataclass
class TextSetup:
    """How item text reaches the text encoder (from the dataset and the run's config)."""

    fields: list[str]
    max_length: int
    join_fields: bool  # trainable encoder: one joined text per item
    tokenizer_dir: Path  # folder with tokenizer.json (the encoder's model folder)


@dataclass
class ExportConfig:
    fp16: bool = True  # also write *.fp16.onnx
    torch_program: bool = True  # also write ranking.pt2 + ranking.fp16.pt2 (export/torch_program.py)
    text_encoder: nn.Module | None = None  # frozen mode: None = the pretrained TextEncoder
    image_encoder: nn.Module | None = None  # None = the pretrained ImageEncoder
    progress: bool = True  # one line per graph on stderr (the encoders take tens of seconds)
    ranking_only: bool = False  # the ranking graph and item table only (serving benchmarks: no encoders)


def graph_builds(
    model: nn.Module, text: TextSetup | None = None, config: ExportConfig | None = None
) -> dict[str, GraphBuild]:
    """Every graph the model has: ranking always; fusion and encoders with a content tower."""
    config = config or ExportConfig()
    builds = {"ranking": ranking_build(model)}
    tower = getattr(model, "tower", None)  # a two-tower model has none
    if config.ranking_only or tower is None or tower.table is not None:
        return builds  # no tower, or a fixed content table: no content graph to export
    builds["fusion"] = fusion_build(tower)
    names = list(tower.projections.proj)
    if "text" in names and text is not None:
        if tower.text is not None:
            encoder = tower.text.encoder
        else:
            from trainer.features.text import TextEncoder

            encoder = config.text_encoder or TextEncoder()
        builds["text_encoder"] = text_build(encoder, modality_shape(tower, "text")[0])
    if "image" in names:
        from trainer.features.image import ImageEncoder

        builds["image_encoder"] = image_build(config.image_encoder or ImageEncoder())
    return builds


def model_info(model: nn.Module) -> ModelInfo:
    cfg, schema = model.cfg, model.schema
    if is_two_tower(model):  # no content, no history, no user features: user ids and item rows
        return ModelInfo(
            d=0,
            item_dim=TwoTowerRankingGraph(model).item_dim,
            history_len=0,
            long_history_len=0,
            num_items=schema.num_items,
            num_users=schema.num_users,
            user_feature_cards=[],
        )
    modalities = {}
    if model.tower is not None and model.tower.table is None:
        for name in model.tower.projections.proj:
            k, dim = modality_shape(model.tower, name)
            modalities[name] = {"tokens": k, "dim": dim}
    return ModelInfo(
        d=cfg.content.d if model.tower is not None else 0,
        item_dim=int(model.ranker.item_dim),
        history_len=cfg.interest.short_len,
        long_history_len=cfg.interest.long_len,
        num_items=schema.num_items,
        num_users=schema.num_users,
        user_feature_cards=[int(c) for c in schema.user_feat_cards],
        modalities=modalities,
    )


def export_model(
    model: nn.Module,
    out: str | Path,
    checkpoint: dict[str, str],
    text: TextSetup | None = None,
    config: ExportConfig | None = None,
    force: bool = False,
    user_feats: np.ndarray | None = None,
) -> Manifest:
    """Write every graph, the item table, the tokenizer and manifest.json into `out`, atomically.
    `user_feats` ([num_users + 1, F], the dataset's user table) lets the lookup serve by user id."""
    config = config or ExportConfig()
    model.eval()
    builds = graph_builds(model, text, config)
    # The graphs hold standard ONNX ops only: a model trained with the fused kernel exports through SDPA.
    with standard_attention(model), atomic_dir(out, force=force) as tmp:
        graphs = {}
        for name, build in builds.items():
            start = time.perf_counter()
            graphs[name] = write_graph(name, build, tmp, config.fp16)
            if config.progress:
                print(f"export: {name} graph written ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
        programs = {}
        if config.torch_program:
            ranking = builds["ranking"]
            programs["ranking"] = write_ranking_programs(ranking.module, ranking.inputs, ranking.axes, tmp)
            if config.progress:
                print("export: ranking torch programs written", file=sys.stderr)
        table = build_item_table(
            model, model.schema.num_items, {"checkpoint_sha256": checkpoint["sha256"]}, user_feats
        )
        table.write(tmp / "item_table")
        user_table = None
        if is_two_tower(model):
            user_table = "user_table.npy"
            np.save(tmp / user_table, build_user_table(model))
            placement = build_placement(model)
            if placement is not None:
                placement.write(tmp / "item_table")
        tokenizer = None
        if "text_encoder" in graphs:
            copy_tokenizer_files(text.tokenizer_dir, tmp / "tokenizer")
            tokenizer = TokenizerInfo("tokenizer", text.max_length, list(text.fields), text.join_fields)
        manifest = Manifest(
            opset=OPSET,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            checkpoint=checkpoint,
            model=model_info(model),
            graphs=graphs,
            item_table={"dir": "item_table", "version": table.version},
            tokenizer=tokenizer,
            programs=programs,
            user_table=user_table,
        )
        manifest.write(tmp)
    return manifest


# ---- from a run folder -----------------------------------------------------------------------------
def find_dataset(run_dir: Path, data: str | None) -> Path:
    """--data, else the dataset the run was trained on (RUN/run.json). Not one it was evaluated on: the
    frozen feature buffers and user table are filled from the dataset, and other data of the same sizes
    would export silently wrong content."""
    from trainer.run import recorded_data

    if not run_dir.is_dir():
        raise MMRankError(f"{run_dir}: run folder not found (write one with `mmrank train`)")
    if data:
        return Path(data)
    return Path(recorded_data(run_dir)["path"])


def text_setup(ds, model: nn.Module) -> TextSetup | None:
    """Fields, token limit and layout the model's text features were computed with."""
    from trainer.features.store import FEATURES, META
    from trainer.features.text import text_model_path

    tower = getattr(model, "tower", None)
    if tower is None or tower.table is not None or "text" not in tower.projections.proj:
        return None
    fields = list(ds.manifest.text_fields)
    if tower.text is not None:
        return TextSetup(fields, model.cfg.content.max_text_tokens, True, text_model_path())
    meta_path = ds.root / FEATURES / META
    try:
        settings = json.loads(meta_path.read_text())["modalities"]["text"]["settings"]
        return TextSetup(list(settings["fields"]), int(settings["max_tokens"]), False, text_model_path())
    except (OSError, ValueError, KeyError) as e:
        raise MMRankError(
            f"{meta_path}: cannot read the text feature settings ({type(e).__name__}: {e})"
        ) from e


def export_run(
    run: str | Path,
    out: str | Path,
    data: str | None = None,
    force: bool = False,
    config: ExportConfig | None = None,
) -> Manifest:
    from trainer import checkpoint
    from trainer.data.samples import user_feature_table
    from trainer.data.schema import load_dataset
    from trainer.run import load_run

    run_dir = Path(run)
    ckpt = run_dir / checkpoint.BEST
    if not ckpt.is_file():
        raise MMRankError(f"{ckpt}: no best checkpoint (is {run_dir} a finished `mmrank train` run?)")
    out, data_dir = Path(out), find_dataset(run_dir, data)
    # Before the model loads; export_model reads nothing from either folder once the model is loaded.
    check_not_above(out, [run_dir, data_dir])
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise MMRankError(f"{out}: output exists and is not empty (pass --force to replace it)")
    ds = load_dataset(data_dir, validate=False)
    _, model = load_run(run_dir, ds)  # a corrupt checkpoint is a MMRankError naming the file
    info = {"path": str(ckpt.resolve()), "sha256": sha256_file(ckpt)}
    users = user_feature_table(ds) if ds.manifest.user_features else None
    return export_model(model, out, info, text_setup(ds, model), config, force, users)


def cli(args) -> int:
    manifest = export_run(
        args.run,
        args.out,
        args.data,
        args.force,
        ExportConfig(fp16=not args.no_fp16, torch_program=not args.no_torch_program),
    )
    print(
        f"export: content features and user table from the dataset {find_dataset(Path(args.run), args.data)}"
    )
    for name, g in manifest.graphs.items():
        size = (Path(args.out) / g.file).stat().st_size / 2**20
        print(f"{name}: {g.file} ({size:.1f} MiB){' + ' + g.fp16_file if g.fp16_file else ''}")
    print(
        f"export: {args.out} (opset {manifest.opset}, item table v{manifest.item_table['version']}, "
        f"{manifest.model.num_items} items)"
    )
    return 0
