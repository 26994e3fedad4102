"""Registers, spills and instruction mix of the fused attention kernels for Hopper, without a GPU.

    python benchmarks/kernel_resources.py [--out benchmarks/results/kernel_resources.md] [--d 128]

Triton compiles each kernel variant for sm_90 here (its wheel carries ptxas and cuobjdump), and
cuobjdump reads the cubin: registers per thread, stack (spilled registers), shared memory, and counts of
the instructions that tell where a kernel spends its issue slots (HGMMA = Hopper matrix units, LDL/STL
= local-memory spills, SHFL = warp shuffles, BAR = block barriers). This answers "did the cosine top-k
spill?" without a GPU; timings still need the GPU (benchmarks/attention_kernel.py).
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, do not interpret

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from trainer.kernels import attention_triton as at  # noqa: E402

POINTERS = {"Mask": "*u8", "TopI": "*i32", "TopIs": "*i32", "Lse": "*fp32", "Delta": "*fp32"}
POINTERS |= {"GRec": "*fp32", "GTop": "*fp32"}
SCALARS = {"H", "N", "L", "scale"}
COUNTED = ("HGMMA", "LDL", "STL", "SHFL", "BAR")


def signature(fn, constexprs: dict, dtype: str) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "scale":
            sig[name] = "fp32"
        elif name in SCALARS or name.startswith("s"):
            sig[name] = "i32"
        else:
            sig[name] = POINTERS.get(name, f"*{dtype}")
    return sig


def compile_variant(fn, constexprs: dict, warps: int, stages: int, dtype: str = "fp16"):
    src = ASTSource(fn=fn, signature=signature(fn, constexprs, dtype), constexprs=constexprs)
    return triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages}
    )


def resources(kernel) -> dict[str, int | str]:
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [bin_dir / "cuobjdump", "--dump-resource-usage", f.name], capture_output=True, text=True
        )
        sass = subprocess.run([bin_dir / "cuobjdump", "--dump-sass", f.name], capture_output=True, text=True)
    fields = dict(
        item.split(":") for line in usage.stdout.splitlines() if "REG:" in line for item in line.split()
    )
    ops = collections.Counter()
    for line in sass.stdout.splitlines():
        parts = line.split()
        if len(parts) > 1 and parts[0].startswith("/*") and parts[0].endswith("*/"):
            ops[parts[1].split(".")[0]] += 1
    row = {"registers": int(fields["REG"]), "stack": int(fields["STACK"]), "shared": kernel.metadata.shared}
    row |= {op: sum(v for k, v in ops.items() if op in k) for op in COUNTED}
    return row


def variants(d: int):
    """(label, kernel, constexprs, warps): forward with 64 x 64 tiles, backward at several tile shapes."""
    base = dict(D=d, DV=d, BLOCK_D=d, BLOCK_DV=d, TOPK=10, PRECISION="tf32")
    parts = (("attention", True, False), ("cosine", False, True), ("both", True, True))
    for warps in (4, 8):
        for label, attention, cosine in parts:
            fwd = base | dict(BLOCK_N=64, BLOCK_L=64, ATTENTION=attention, COSINE=cosine, BLOCK_K=16)
            yield f"forward {label}, 64 x 64", at._fwd_kernel, fwd, warps
    for n, length, warps in ((64, 64, 4), (64, 64, 8), (64, 32, 8), (32, 32, 4)):
        bwd = base | dict(BLOCK_N=n, BLOCK_L=length, ATTENTION=True, COSINE=True, SAME_KV=True)
        yield f"backward dK/dV, {n} x {length}", at._bwd_kv_kernel, bwd, warps
        yield f"backward dQ/dc, {n} x {length}", at._bwd_q_kernel, bwd, warps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", default="benchmarks/results/kernel_resources.md")
    parser.add_argument("--d", type=int, default=128, help="content width (D = DV)")
    args = parser.parse_args(argv)
    lines = [
        f"# Fused attention kernels on sm_90: resources (compiled on {platform.node() or 'this machine'}, no GPU)",
        "",
        f"`python benchmarks/kernel_resources.py --d {args.d}`; triton {triton.__version__}, fp16, tiles of"
        " candidates x history positions, 2 stages, k = 10, attention and cosine features both on unless"
        " named. Stack > 0 means spilled registers; HGMMA counts Hopper matrix instructions.",
        "",
        "| kernel | warps | registers | stack B | shared B | " + " | ".join(COUNTED) + " |",
        "|---|---|---|---|---|" + "---|" * len(COUNTED),
    ]
    for label, fn, constexprs, warps in variants(args.d):
        r = resources(compile_variant(fn, constexprs, warps, 2))
        lines.append(
            f"| {label} | {warps} | {r['registers']} | {r['stack']} | {r['shared']} | "
            + " | ".join(str(r[op]) for op in COUNTED)
            + " |"
        )
        print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
