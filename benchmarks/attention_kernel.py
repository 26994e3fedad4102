"""Fused target attention + LEMUR cosine features (Triton) against PyTorch eager and SDPA, on a GPU.

    python benchmarks/attention_kernel.py [--out benchmarks/results] [--dtype fp16] [--quick]

Problem: B requests, N candidates each sharing one history of L vectors of width d (right-aligned, each
request with its own length in [L/2, L]), one head, k = 10 cosine features of each kind (LEMUR preset).
- eager: the reference attention (explicit scores, masked softmax, weighted sum) plus
  `similarity_features` (full [B, N, L] cosine matrix, top-k), what the model runs without a kernel;
- sdpa: torch's scaled_dot_product_attention with the same mask, attention only (no cosine features);
- fused: `mmrank::attention_cosine` (one Triton kernel: attention and both cosine features).
Forward, and forward + backward (gradients of q, history and c from random output gradients).

Times are medians of `triton.testing.do_bench` (CUDA events, warm-up first). Bytes are the fewest that
must move for the problem an implementation solves (inputs read once, outputs written once): fused and
eager read q, c, history and mask and write u and the 2k features; sdpa reads q, history and mask and
writes u. The forward+backward count adds the output gradients read, the input gradients written and
the forward's outputs read again. The copy bandwidth is measured on the same GPU (a 2 GiB
device-to-device copy, bytes read + written). Writes <out>/kernel_attention.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.provenance import code_commit  # noqa: E402
from trainer.kernels.attention_op import attention_cosine_op, attention_reference  # noqa: E402
from trainer.model.attention import attention_sdpa  # noqa: E402
from trainer.model.similarity import similarity_features  # noqa: E402

TOPK = 10
GRID = [
    (b, n, length, d)
    for b in (1, 32)
    for n in (100, 500, 2000)
    for length in (50, 200, 1000)
    for d in (64, 128)
]
QUICK = [(1, 500, 1000, 128), (32, 500, 1000, 128), (32, 2000, 1000, 128)]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def inputs(b: int, n: int, length: int, d: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, 1, n, d, device="cuda", generator=gen, dtype=dtype) * d**-0.25
    hist = torch.randn(b, length, d, device="cuda", generator=gen, dtype=dtype)
    c = torch.randn(b, n, d, device="cuda", generator=gen, dtype=dtype)
    lengths = torch.randint(length // 2, length + 1, (b,), device="cuda", generator=gen)
    mask = torch.arange(length, device="cuda")[None, :] >= (length - lengths)[:, None]
    return q, hist, c, mask


def implementations(q, hist, c, mask):
    scale = 1.0
    h = hist[:, None]
    return {
        "eager": lambda: (
            attention_reference(q, h, h, mask, scale),
            similarity_features(c, hist, mask, TOPK),
        ),
        "sdpa": lambda: (attention_sdpa(q, h, h, mask, scale),),
        "fused": lambda: attention_cosine_op(q, hist, mask, c, scale, TOPK)[:2],
    }


def kernel_only_us(q, hist, c, mask, blocks=None) -> float:
    """The forward kernel launched directly: the op's time minus this is dispatch and host overhead.
    q or c may be None: attention alone, or the cosine features alone."""
    from triton.testing import do_bench

    from trainer.kernels.attention_triton import fused_forward

    h = hist[:, None]
    with torch.no_grad():
        return 1e3 * do_bench(
            lambda: fused_forward(q, h, h, mask, 1.0, c, TOPK if c is not None else 0, blocks),
            return_mode="median",
        )


def sweep(dtype: torch.dtype) -> list[str]:
    """At the largest shape: the forward kernel for a few tile shapes (the default is the first), then
    with attention alone and cosine features alone, which splits the kernel's time between the two."""
    from trainer.kernels.attention_triton import Blocks

    q, hist, c, mask = inputs(*QUICK[-1], dtype)
    cases = [(str(b), q, c, b) for b in (Blocks(64, 64, 4, 2), Blocks(64, 64, 8, 2), Blocks(128, 64, 8, 2))]
    cases += [
        ("attention only, default tiles", q, None, None),
        ("cosine features only, default tiles", None, c, None),
    ]
    lines = []
    for label, qq, cc, blocks in cases:
        lines.append(f"{label}: {kernel_only_us(qq, hist, cc, mask, blocks):.1f} us")
        print(lines[-1], flush=True)
    return lines


def problem_bytes(b: int, n: int, length: int, d: int, size: int, cosine: bool, backward: bool) -> int:
    reads = (b * n * d * (2 if cosine else 1) + b * length * d) * size + b * length
    writes = b * n * d * size + (b * n * 2 * TOPK * size if cosine else 0)
    total = reads + writes
    if backward:
        # read the inputs and outputs again with the output gradients; write one gradient per input
        total += reads + 2 * writes + (reads - b * length)
    return total


def problem_flops(b: int, n: int, length: int, d: int, cosine: bool, backward: bool) -> int:
    matmuls = 3 if cosine else 2  # scores, probabilities x values, (cosines)
    fwd = 2 * b * n * length * d * matmuls
    return fwd * (3 if backward else 1)  # the backward has about twice the forward's products


def copy_bandwidth() -> float:
    from triton.testing import do_bench

    src = torch.empty(2**30, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def time_case(b: int, n: int, length: int, d: int, dtype: torch.dtype) -> list[dict]:
    from triton.testing import do_bench

    q, hist, c, mask = inputs(b, n, length, d, dtype)
    rows = []
    for backward in (False, True):
        leaves = [q, hist, c]
        for x in leaves:
            x.requires_grad_(backward)
        for name, fn in implementations(q, hist, c, mask).items():
            if backward:
                outs = fn()
                grads = [torch.randn_like(o) for o in outs]

                def run(fn=fn, grads=grads):
                    torch.autograd.backward(fn(), grads)

                ms = do_bench(run, grad_to_none=leaves, return_mode="median")
            else:
                with torch.no_grad():
                    ms = do_bench(fn, return_mode="median")
            cosine = name != "sdpa"
            size = q.element_size()
            rows.append(
                {
                    "B": b, "N": n, "L": length, "d": d, "impl": name,
                    "mode": "fwd+bwd" if backward else "fwd",
                    "us": ms * 1e3,
                    "bytes": problem_bytes(b, n, length, d, size, cosine, backward),
                    "flops": problem_flops(b, n, length, d, cosine, backward),
                }
            )  # fmt: skip
        torch.cuda.empty_cache()
    for x in leaves:
        x.requires_grad_(False)
    rows.append(
        {
            "B": b,
            "N": n,
            "L": length,
            "d": d,
            "impl": "kernel",
            "mode": "fwd",
            "us": kernel_only_us(q, hist, c, mask),
        }
    )
    return rows


def table(rows: list[dict], copy_bw: float) -> str:
    by_key = {(r["B"], r["N"], r["L"], r["d"], r["mode"], r["impl"]): r for r in rows}
    lines = [
        "| B | N | L | d | mode | eager us | sdpa us | fused us | kernel us | fused / sdpa | eager / fused "
        "| fused GB/s | % of copy BW | fused TFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b, n, length, d, mode, impl in by_key:
        if impl != "fused":
            continue
        kern = by_key.get((b, n, length, d, mode, "kernel"))
        kern_us = f"{kern['us']:.1f}" if kern else "-"
        f = by_key[(b, n, length, d, mode, "fused")]
        e = by_key[(b, n, length, d, mode, "eager")]
        s = by_key[(b, n, length, d, mode, "sdpa")]
        gbs = f["bytes"] / (f["us"] * 1e-6) / 1e9
        lines.append(
            f"| {b} | {n} | {length} | {d} | {mode} | {e['us']:.1f} | {s['us']:.1f} | {f['us']:.1f} | {kern_us} "
            f"| {f['us'] / s['us']:.2f} | {e['us'] / f['us']:.1f} | {gbs:.0f} | {100 * gbs * 1e9 / copy_bw:.0f} "
            f"| {f['flops'] / (f['us'] * 1e-6) / 1e12:.0f} |"
        )
    return "\n".join(lines)


def backward_ratios(rows: list[dict]) -> str:
    fused = {(r["B"], r["N"], r["L"], r["d"], r["mode"]): r["us"] for r in rows if r["impl"] == "fused"}
    ratios = [(key[:4], fused[(*key[:4], "fwd+bwd")] / fused[key] - 1.0) for key in fused if key[4] == "fwd"]
    worst = max(ratios, key=lambda x: x[1])
    best = min(ratios, key=lambda x: x[1])
    return (
        f"Fused backward / forward (fwd+bwd time minus fwd, over fwd): {best[1]:.2f} at B,N,L,d = {best[0]} "
        f"to {worst[1]:.2f} at {worst[0]}."
    )


def plot(rows: list[dict], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5), sharey=True)
    for ax, mode in zip(axes, ("fwd", "fwd+bwd"), strict=True):
        cases = sorted(
            {(r["B"], r["N"], r["L"], r["d"]) for r in rows if r["mode"] == mode},
            key=lambda x: (x[3], x[0] * x[1] * x[2]),
        )
        for impl, marker in (("eager", "o"), ("sdpa", "s"), ("fused", "^")):
            us = [
                next(
                    r["us"]
                    for r in rows
                    if (r["B"], r["N"], r["L"], r["d"]) == case and r["mode"] == mode and r["impl"] == impl
                )
                for case in cases
            ]
            ax.plot(range(len(cases)), us, marker=marker, label=impl)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"{b}x{n}x{ln} d{d}" for b, n, ln, d in cases], rotation=90, fontsize=6)
        ax.set_yscale("log")
        ax.set_title(f"{mode} ({device})")
        ax.set_ylabel("microseconds (median)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--out", default="benchmarks/results", help="folder for kernel_attention.{md,json,png}"
    )
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--quick", action="store_true", help="three shapes instead of the 36-shape grid")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "attention_kernel: needs a CUDA GPU (the kernels' CPU tests are in tests/kernels)",
            file=sys.stderr,
        )
        return 2
    import triton

    device = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth()
    print(f"{device}: device copy {copy_bw / 1e12:.2f} TB/s", flush=True)
    sweep_lines = sweep(DTYPES[args.dtype])
    rows = []
    for case in QUICK if args.quick else GRID:
        rows += time_case(*case, DTYPES[args.dtype])
        last = {r["impl"]: r["us"] for r in rows[-7:] if r["mode"] == "fwd"}
        print(f"{case}: fwd " + ", ".join(f"{k} {v:.1f} us" for k, v in last.items()), flush=True)
    # The same case twice, to show the run-to-run spread of these medians.
    again = time_case(*(QUICK[-1]), DTYPES[args.dtype])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python "
        + " ".join(
            [
                Path(__file__).as_posix().split("/")[-2] + "/attention_kernel.py",
                *(argv if argv is not None else sys.argv[1:]),
            ]
        ),
        "device": device,
        "copy_bandwidth_TBps": copy_bw / 1e12,
        "dtype": args.dtype,
        "topk": TOPK,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "commit": code_commit(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (out / "kernel_attention.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "repeat": again}, indent=1)
    )
    repeat = {(r["impl"], r["mode"]): r["us"] for r in again}
    first = {(r["impl"], r["mode"]): r["us"] for r in rows if (r["B"], r["N"], r["L"], r["d"]) == QUICK[-1]}
    spread = ", ".join(f"{k[0]} {k[1]} {first[k]:.1f} / {v:.1f} us" for k, v in repeat.items() if k in first)
    md = [
        "# Fused target attention + cosine features (Triton) vs eager and SDPA",
        "",
        f"`{meta['command']}` on {device} (measured device copy {copy_bw / 1e12:.2f} TB/s), {args.dtype}, "
        f"one head, k = {TOPK}; torch {meta['torch']}, triton {meta['triton']}, Python {meta['python']}, "
        f"commit {meta['commit']}, {meta['date']}. Medians of triton.testing.do_bench. sdpa computes attention "
        "only; eager and fused compute attention and both cosine features.",
        "",
        table(rows, copy_bw),
        "",
        backward_ratios(rows),
        "",
        f"Run-to-run spread, {QUICK[-1]} measured twice (first / second): {spread}.",
        "",
        "'kernel us' is the forward kernel launched directly (no custom op, no allocation reuse): the",
        "difference to 'fused us' is dispatch and host overhead. Tile shapes at the largest case, forward kernel:",
        "",
        *[f"- {line}" for line in sweep_lines],
        "",
        "![kernel timings](kernel_attention.png)",
        "",
    ]
    (out / "kernel_attention.md").write_text("\n".join(md))
    plot(rows, out / "kernel_attention.png", device)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
