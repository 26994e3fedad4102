"""Exported graphs on onnxruntime (CPU) vs the same modules in PyTorch eager, plus file sizes.

    python benchmarks/export_latency.py [--out benchmarks/results/export_latency.md] [--repeats 20]

Models: the `em3` and `lemur` presets' ranking graphs and the shared graphs (text and image encoders,
fusion), built with the real pretrained encoders on a random ML-100K-sized schema (1682 items, 943
users, 2 text fields, posters): latency depends on shapes and architecture, not on trained weights.
Cases: one user scoring N candidates against an L-item history, (N, L) = (100, 50) and (500, 200) (the
LEMUR ranking graph gets L for its long history as well); fusion encodes N items; the encoders run a
fixed batch (8 items x 2 fields x 64 tokens; 4 images). Each number is the median of `repeats` calls
after 3 warm-up calls, torch and onnxruntime on the same number of threads (--threads).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from common.provenance import cpu_name
from export.manifest import Manifest
from export.onnx_graphs import ExportConfig, TextSetup, export_model, graph_builds
from export.parity import random_feeds
from model_repository.ort_graph import OrtGraph

CASES = [(100, 50), (500, 200)]
NUM_ITEMS, NUM_USERS, FIELDS = 1682, 943, ["title", "overview"]


def timed(fn, calls: int, warmup: int = 20) -> list[float]:
    """Milliseconds of each of `calls` calls of `fn`, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def median_ms(fn, repeats: int) -> float:
    return statistics.median(timed(fn, repeats, warmup=3))


def build_model(preset: str, history_len: int | None = None, d: int | None = None):
    """The preset's model on the random schema; `history_len` overrides its short history length, `d`
    its content width."""
    from trainer.config import resolve
    from trainer.model.ranking_model import ModelSchema, RankingModel

    cfg = resolve(preset).model
    if history_len is not None:
        cfg.interest.short_len = history_len
    if d is not None:
        cfg.content.d = d
    gen = torch.Generator().manual_seed(0)
    n = NUM_ITEMS
    text, image = torch.randn(n + 1, 2, 384, generator=gen), torch.rand(n + 1, 1, 1280, generator=gen)
    tokens = None
    if cfg.content.encoder_mode == "trainable":
        tokens = (
            torch.randint(1000, 20000, (n + 1, 48), generator=gen),
            torch.ones(n + 1, 48, dtype=torch.int64),
        )
    schema = ModelSchema(
        n,
        NUM_USERS,
        torch.randint(0, 19, (n + 1, 1), generator=gen),
        (19,),
        (3, 21),
        {
            "text": (text, torch.ones(n + 1, 2, dtype=torch.bool)),
            "image": (image, torch.ones(n + 1, 1, dtype=torch.bool)),
        },
        tokens,
    )
    torch.manual_seed(0)
    return RankingModel(cfg, schema).eval()


def sizes_for(graph: str, n: int, length: int) -> dict[str, int]:
    if graph == "ranking":
        return {"batch": 1, "candidates": n, "history": length, "long_history": length}
    if graph == "fusion":
        return {"batch": n}
    return {"batch": 8 if graph == "text_encoder" else 4, "tokens": 64}


def measure(
    label: str, model, out: Path, text: TextSetup | None, graphs: list[str], repeats: int, cases, threads: int
) -> list[dict]:
    export_model(model, out, {"path": "random-init", "sha256": "-"}, text, ExportConfig(), force=True)
    manifest = Manifest.read(out)
    builds = graph_builds(model, text)
    rows = []
    for name in graphs:
        spec = manifest.graph(name)
        sessions = {
            p: OrtGraph(out / f, threads=threads) for p, f in (("fp32", spec.file), ("fp16", spec.fp16_file))
        }
        module = builds[name].module.eval()
        for n, length in cases if name in ("ranking", "fusion") else cases[:1]:
            sizes = sizes_for(name, n, length)
            feeds = random_feeds(name, spec, manifest.model, sizes)
            args = [torch.from_numpy(np.ascontiguousarray(feeds[t.name])) for t in spec.inputs]
            with torch.inference_mode():
                eager = median_ms(lambda: module(*args), repeats)  # noqa: B023
            ort = {p: median_ms(lambda s=s: s.run(feeds), repeats) for p, s in sessions.items()}  # noqa: B023
            rows.append(
                {
                    "model": label,
                    "graph": name,
                    "inputs": f"N={n}, L={length}"
                    if name == "ranking"
                    else f"{n} items"
                    if name == "fusion"
                    else ", ".join(f"{t.name} {list(feeds[t.name].shape)}" for t in spec.inputs[:1]),
                    "size": (out / spec.file).stat().st_size / 2**20,
                    "size16": (out / spec.fp16_file).stat().st_size / 2**20,
                    "eager": eager,
                    "fp32": ort["fp32"],
                    "fp16": ort["fp16"],
                }
            )
            print(
                f"{label:6s} {name:14s} {rows[-1]['inputs']:28s} eager {eager:8.2f} ms  ort fp32 "
                f"{ort['fp32']:8.2f} ms  fp16 {ort['fp16']:8.2f} ms",
                flush=True,
            )
    return rows


def machine() -> str:
    return (
        f"{cpu_name()}, {torch.get_num_threads()} threads; Python {platform.python_version()}, torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider)"
    )


def write_table(rows: list[dict], path: Path, command: str, repeats: int, load: tuple[float, float]) -> None:
    lines = [
        "# Exported graphs: onnxruntime CPU vs PyTorch eager",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Date: {datetime.now(UTC).date().isoformat()}; median of {repeats} calls after 3 warm-up calls.  ",
        f"1-minute load average before / after the run: {load[0]:.2f} / {load[1]:.2f} (the CPU is shared with "
        "other jobs; compare ratios within one run).",
        "",
        "Random ML-100K-sized schema with the real pretrained encoders (latency does not depend on trained "
        "weights). Ratio = eager time / onnxruntime time (> 1: onnxruntime is faster).",
        "",
        "| model | graph | inputs | size fp32 / fp16 (MiB) | eager (ms) | ORT fp32 (ms) | ORT fp16 (ms) "
        "| eager / ORT fp32 | eager / ORT fp16 |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['graph']} | {r['inputs']} | {r['size']:.2f} / {r['size16']:.2f} | {r['eager']:.2f} "
            f"| {r['fp32']:.2f} | {r['fp16']:.2f} | {r['eager'] / r['fp32']:.2f} | {r['eager'] / r['fp16']:.2f} |"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    from trainer.features.text import text_model_path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/export_latency.md")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2, help="threads for torch and for onnxruntime")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    text = TextSetup(FIELDS, 128, False, text_model_path())
    rows, load_before = [], os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        rows += measure(
            "em3",
            build_model("em3"),
            Path(tmp) / "em3",
            text,
            ["ranking", "fusion", "text_encoder", "image_encoder"],
            args.repeats,
            CASES,
            args.threads,
        )
        rows += measure(
            "lemur",
            build_model("lemur"),
            Path(tmp) / "lemur",
            None,
            ["ranking"],
            args.repeats,
            CASES,
            args.threads,
        )
    command = "python benchmarks/export_latency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_table(rows, Path(args.out), command.strip(), args.repeats, (load_before, os.getloadavg()[0]))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
