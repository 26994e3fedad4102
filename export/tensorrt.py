"""fp16 TensorRT engines built from the exported ONNX graphs, for `mmrank repo --backend tensorrt`.

    python -m export.tensorrt --export DIR [--out DIR/tensorrt] [--max-batch 64 --max-candidates 2000]

Run it on the serving GPU (an engine is specific to the GPU and the TensorRT version). Each graph gets
one optimization profile over its dynamic axes: batch and candidates N as ranges; the history axes
fixed at the manifest's lengths, since the lookup always pads histories to them; text tokens up to the
tokenizer's limit. Inputs and outputs stay fp32 / int64 / bool, so the Triton configs are the ONNX
ones. Attention is left to TensorRT's own fusion of the exported masked-softmax pattern (no plugin).
Writes `<graph>.plan` and `engines.json` (TensorRT version, GPU, the EngineConfig, profiles). The
defaults are the repository's (`mmrank repo` max_batch_size and request limits), and `mmrank repo
--backend tensorrt` refuses a repository that admits larger requests than the engines' profiles hold
(`check_engines_hold`): TensorRT would fail those requests at run time.

The `tensorrt` package is imported only when building; where it is missing the builder says so.
This path has not been run in this project's CI (no GPU, no TensorRT there).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from common.atomic import write_json_atomic
from common.errors import MMRankError
from export.manifest import GraphSpec, Manifest
from model_repository.limits import RequestLimits

ENGINES = "tensorrt"
ENGINE_RECORD = "engines.json"
# A serialized TensorRT engine starts with the tag "ftrt" (the little-endian uint32 0x74727466 that
# trtexec checks), its serialization and TensorRT versions following within the first 28 bytes.
PLAN_TAG = b"ftrt"
PLAN_HEADER_BYTES = 28
Shape = tuple[int, ...]


@dataclass
class EngineConfig:
    fp16: bool = True
    max_batch: int = 64  # the repository's max_batch_size
    opt_batch: int = 8  # capped at max_batch
    max_candidates: int = RequestLimits.max_candidates  # the repository's default request limit
    opt_candidates: int = 100  # capped at max_candidates
    opt_tokens: int = 32
    workspace_gib: float = 4.0


def _axis_ranges(manifest: Manifest, cfg: EngineConfig) -> dict[str, tuple[int, int, int]]:
    m = manifest.model
    max_tokens = manifest.tokenizer.max_length if manifest.tokenizer else cfg.opt_tokens
    return {
        # TensorRT refuses a profile whose opt exceeds its max: a small max caps the opt.
        "batch": (1, min(cfg.opt_batch, cfg.max_batch), cfg.max_batch),
        "candidates": (1, min(cfg.opt_candidates, cfg.max_candidates), cfg.max_candidates),
        "history": (m.history_len,) * 3,
        "long_history": (max(m.long_history_len, 1),) * 3,
        "tokens": (1, min(cfg.opt_tokens, max_tokens), max_tokens),
    }


def profile_shapes(
    spec: GraphSpec, manifest: Manifest, cfg: EngineConfig
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) shape of every graph input."""
    ranges = _axis_ranges(manifest, cfg)
    shapes = {}
    for t in spec.inputs:
        unknown = [d for d in t.shape if isinstance(d, str) and d not in ranges]
        if unknown:
            raise MMRankError(f"input {t.name!r}: no profile range for axes {unknown}")
        shapes[t.name] = tuple(
            tuple(d if isinstance(d, int) else ranges[d][i] for d in t.shape) for i in range(3)
        )
    return shapes


def engine_record(engines: Path) -> tuple[EngineConfig, dict[str, str]]:
    """The EngineConfig the engines in `engines` were built with and the sha256 of the ONNX graph each
    was built from, from their engines.json."""
    path = Path(engines) / ENGINE_RECORD
    try:
        raw = json.loads(path.read_text())
        return EngineConfig(**raw["config"]), {n: e["onnx_sha256"] for n, e in raw["engines"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise MMRankError(
            f"{path}: unreadable engine record ({type(e).__name__}: {e}); build the engines with "
            "`python -m export.tensorrt`"
        ) from e


def check_engines_hold(engines: Path, manifest: Manifest, max_batch: int, max_candidates: int) -> None:
    """Raise MMRankError where the engines in `engines` were not built from the graphs of `manifest`'s
    export, or where a repository of `max_batch` rows and `max_candidates` candidates per request admits
    requests outside their profiles."""
    built, sources = engine_record(engines)
    for name, spec in manifest.graphs.items():
        if sources.get(name) != spec.sha256:
            raise MMRankError(
                f"{Path(engines) / ENGINE_RECORD}: no engine built from this export's {name} graph "
                f"(rebuild them with `python -m export.tensorrt --export EXPORT`)"
            )
    for what, want, have, flag in (
        ("rows per batch (max_batch_size)", max_batch, built.max_batch, "--max-batch"),
        ("candidates per user (max_candidates)", max_candidates, built.max_candidates, "--max-candidates"),
    ):
        if want > have:
            raise MMRankError(
                f"the repository admits {want} {what}, the TensorRT engines in {engines} hold at most "
                f"{have}: rebuild them with `python -m export.tensorrt {flag} {want}` or lower the limit"
            )


def check_engine_file(path: Path) -> Path:
    """`path`, after checking that it starts like a serialized TensorRT engine: any other file named
    `.plan` would render into a repository that fails only when the server loads it."""
    with open(path, "rb") as f:
        head = f.read(PLAN_HEADER_BYTES)
    if len(head) < PLAN_HEADER_BYTES or head[: len(PLAN_TAG)] != PLAN_TAG:
        found = f"{len(head)} bytes" if len(head) < PLAN_HEADER_BYTES else f"it starts with {head[:4]!r}"
        raise MMRankError(
            f"{path}: not a TensorRT engine (an engine starts with {PLAN_TAG!r} in a {PLAN_HEADER_BYTES}-byte "
            f"header; {found}); build engines on the target GPU with `python -m export.tensorrt`"
        )
    return Path(path)


def _tensorrt():
    try:
        import tensorrt
    except ImportError as e:
        raise MMRankError(
            "TensorRT not installed (pip install tensorrt, on a machine with an NVIDIA GPU)"
        ) from e
    return tensorrt


def build_engine(onnx_path: Path, shapes: dict[str, tuple[Shape, Shape, Shape]], cfg: EngineConfig) -> bytes:
    trt = _tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise MMRankError(f"{onnx_path}: TensorRT cannot parse the graph ({errors})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.workspace_gib * 2**30))
    if cfg.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise MMRankError(f"{onnx_path}: TensorRT failed to build an engine (see its log above)")
    return bytes(plan)


def build_engines(
    export_dir: str | Path, out: str | Path | None = None, cfg: EngineConfig | None = None
) -> Path:
    """One engine per graph of the export, from the fp32 ONNX (TensorRT picks fp16 kernels itself)."""
    cfg = cfg or EngineConfig()
    trt = _tensorrt()
    export_dir = Path(export_dir)
    manifest = Manifest.read(export_dir)
    out = Path(out) if out else export_dir / ENGINES
    out.mkdir(parents=True, exist_ok=True)
    # A build that fails part way must not leave new plans beside the old record, which vouches for them.
    (out / ENGINE_RECORD).unlink(missing_ok=True)
    record = {"tensorrt": trt.__version__, "config": asdict(cfg), "engines": {}}
    for name, spec in manifest.graphs.items():
        shapes = profile_shapes(spec, manifest, cfg)
        tmp = out / f".{name}.plan.tmp"
        tmp.write_bytes(build_engine(export_dir / spec.file, shapes, cfg))
        tmp.replace(out / f"{name}.plan")
        record["engines"][name] = {"onnx_sha256": spec.sha256, "profile": shapes}
    try:
        import torch

        record["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        record["gpu"] = None
    write_json_atomic(out / ENGINE_RECORD, record)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="fp16 TensorRT engines from an export folder")
    p.add_argument("--export", required=True, help="folder written by `mmrank export`")
    p.add_argument("--out", default=None, help="engine folder (default: EXPORT/tensorrt)")
    p.add_argument("--max-batch", type=int, default=EngineConfig.max_batch)
    p.add_argument("--max-candidates", type=int, default=EngineConfig.max_candidates)
    args = p.parse_args(argv)
    try:
        out = build_engines(
            args.export, args.out, EngineConfig(max_batch=args.max_batch, max_candidates=args.max_candidates)
        )
    except MMRankError as e:
        print(f"export.tensorrt: error: {e}", file=sys.stderr)
        return 1
    print(f"engines: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
