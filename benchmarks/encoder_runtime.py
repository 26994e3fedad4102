"""Frozen-encoder runtime: PyTorch eager vs onnxruntime (CPU EP) on batches of texts and of images.

    python benchmarks/encoder_runtime.py [--batch 64 --tokens 16 64 128 --repeats 7]

Inputs are random but shaped like the real thing: token ids padded to `tokens` with lengths spread over
[tokens/4, tokens], and normalised 224 x 224 pixels; the encoders' cost does not depend on the values.
ML-100K titles are about 16 tokens, overviews about 64 (median) and the cache keeps at most 128.
The two runtimes are timed alternately, call by call, so load from other processes on a shared CPU
falls on both alike; the minimum is the least disturbed call. Prints a markdown table and writes it, with
the command and the machine, to benchmarks/results/encoder_runtime.md. The result decides
`AUTO_RUNTIME` in trainer/features/runtime.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from common.provenance import cpu_name  # noqa: E402
from trainer.features.image import IMAGE_SIZE, ImageEncoder  # noqa: E402
from trainer.features.runtime import TorchRunner, onnx_runner, sha256_files  # noqa: E402
from trainer.features.text import TextEncoder  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "encoder_runtime.md"
HEADER = [
    "| encoder | batch | runtime | p50 = median (ms) | p95 (ms) | min (ms) | items/s (at p50) "
    "| max abs diff ORT vs torch |",
    "|---|---|---|---:|---:|---:|---:|---:|",
]


def text_batch(batch: int, tokens: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    lengths = rng.integers(max(2, tokens // 4), tokens + 1, size=batch)
    lengths[0] = tokens
    ids = rng.integers(1000, 30000, size=(batch, tokens)).astype(np.int64)
    mask = (np.arange(tokens)[None, :] < lengths[:, None]).astype(np.int64)
    ids[:, 0] = 101  # [CLS]
    ids[np.arange(batch), lengths - 1] = 102  # [SEP]
    return ids * mask, mask


def image_batch(batch: int, rng: np.random.Generator) -> tuple[np.ndarray]:
    return (rng.standard_normal((batch, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32),)


def time_alternately(runners: dict, inputs, repeats: int, warmup: int) -> dict[str, np.ndarray]:
    """Milliseconds per call for each runner, the runners called in turn within every repeat."""
    for _ in range(warmup):
        for run in runners.values():
            run(*inputs)
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run(*inputs)
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: np.array(t) for name, t in times.items()}


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--batch", type=int, default=64, help="items per call")
    p.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 128], help="padded text lengths to time")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per runtime and case")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    p.add_argument("--onnx-dir", default=None, help="exported graph cache (default $MMRANK_CACHE/onnx)")
    p.add_argument("--out", default=str(RESULTS), help="markdown file for the table")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(0)
    text, image = TextEncoder(), ImageEncoder()
    cases = [
        (text, "text", text_batch(args.batch, t, rng), f"{args.batch} texts x {t} tok") for t in args.tokens
    ]
    cases.append((image, "image", image_batch(args.batch, rng), f"{args.batch} images 224 px"))
    load_before = os.getloadavg()[0]
    rows = []
    for module, name, inputs, shape in cases:
        runners = {
            "torch": TorchRunner(module),
            "onnxruntime": onnx_runner(module, name, sha256_files(module.weights_files), args.onnx_dir),
        }
        parity = float(np.abs(runners["onnxruntime"](*inputs) - runners["torch"](*inputs)).max())
        for runtime, ms in time_alternately(runners, inputs, args.repeats, args.warmup).items():
            p50, p95 = np.percentile(ms, [50, 95])
            rows.append(
                f"| {name} | {shape} | {runtime} | {p50:.1f} | {p95:.1f} | {ms.min():.1f} "
                f"| {args.batch / (p50 / 1000.0):.1f} | {parity:.2e} |"
            )
            print(rows[-1], flush=True)
    write_results(Path(args.out), rows, args, (load_before, os.getloadavg()[0]), argv)
    return 0


def write_results(out: Path, rows: list[str], args, load: tuple[float, float], argv) -> None:
    machine = (
        f"{cpu_name()}, {os.cpu_count()} logical CPUs; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); onnxruntime {ort.__version__} (CPUExecutionProvider, "
        f"default threads); Python {platform.python_version()}"
    )
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python", os.path.relpath(sys.argv[0]), *(shlex.quote(a) for a in given)])
    text = [
        "# Encoder runtime: PyTorch vs onnxruntime (CPU)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}  ",
        f"Repeats: {args.repeats} timed calls per runtime after {args.warmup} warm-up, runtimes alternating "
        f"call by call. 1-min load average {load[0]:.2f} before, {load[1]:.2f} after (the CPU is shared).",
        "",
        *HEADER,
        *rows,
        "",
    ]
    print("\n" + "\n".join(HEADER + rows))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
