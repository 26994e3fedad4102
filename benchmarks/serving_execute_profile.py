"""Where item_lookup's time goes inside the backend stub: execute(), its input reads and its lookup + graph.

    python benchmarks/serving_execute_profile.py [--calls 500] [--out benchmarks/results/serving_execute_profile.md]

The repository of benchmarks/serving_overhead.py (em3, L=50, N=100, python backend), rendered into a
temporary folder whose item_lookup `model.py` is then wrapped with perf_counter timers around
`execute`, `_read` and `_lookup` (this copy only; the runtime itself has no timers). One caller sends
`rank` back to back; the stub logs its timings after the calls, Triton's statistics give queue /
compute input / infer / output over the same calls. Subtracting execute() from compute_infer leaves the
request's and response's passage between the server and the stub; the same lookup + graph timed in
the benchmark's own process (after the server stopped) is the in-process reference.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.export_latency import machine, timed  # noqa: E402
from benchmarks.serving_overhead import build, in_process, model_stats, request, request_tensors  # noqa: E402
from common.provenance import code_commit  # noqa: E402
from export.repository import RenderConfig  # noqa: E402
from export.triton_launcher import TritonConfig, TritonServer  # noqa: E402

WARMUP = 100
TIMED = ("execute", "_read", "_lookup")


WRAPPERS = """
    _timings = {{}}

    def _timed(self, name, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        values = self._timings.setdefault(name, [])
        values.append(time.perf_counter() - start)
        if name == "execute" and len(values) == {last}:
            for key, timed in self._timings.items():
                line = " ".join(f"{{v * 1e6:.1f}}" for v in timed[{warmup}:])
                pb_utils.Logger.log_warn(f"TIMING {{key}} {{line}}")
        return out
"""


def instrument(model_py: Path, calls: int) -> None:
    """Rename each timed method to `<name>_timed` and put a timing wrapper in its place; after WARMUP +
    `calls` executions the stub logs every timing (microseconds), one line per method."""
    src = model_py.read_text()
    wrappers = WRAPPERS.format(last=WARMUP + calls, warmup=WARMUP)
    for name in TIMED:
        src = src.replace(f"    def {name}(self, ", f"    def {name}_timed(self, ")
        wrappers += (
            f"\n    def {name}(self, arg):\n        return self._timed({name!r}, self.{name}_timed, arg)\n"
        )
    src = src.replace("class TritonPythonModel:\n", "class TritonPythonModel:" + wrappers + "\n", 1)
    model_py.write_text("import time\n" + src)


def main(argv: list[str] | None = None) -> int:
    import tritonclient.grpc as grpc

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--out", default="benchmarks/results/serving_execute_profile.md")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mmrank-profile-") as tmp:
        export = build(Path(tmp), 50, RenderConfig(backend="python"))
        instrument(Path(tmp) / "repo" / "item_lookup" / "1" / "model.py", args.calls)
        with TritonServer(TritonConfig(Path(tmp) / "repo", control_mode="explicit")) as server:
            client = grpc.InferenceServerClient(server.grpc_url)
            hist, cands = request(100, 50, 1682)
            inputs = request_tensors(grpc, hist, cands)
            for _ in range(WARMUP):
                client.infer("rank", inputs)
            before = model_stats(client)
            served = []
            for _ in range(args.calls):
                start = time.perf_counter()
                client.infer("rank", inputs)
                served.append((time.perf_counter() - start) * 1e6)
            after = model_stats(client)
            time.sleep(1.0)  # the stub's log line
            log = server.log_path.read_text(errors="replace")
        local = timed(
            in_process(export, hist, cands, RenderConfig.rank_graph_threads)["lookup + graph"], args.calls
        )
    inside = {
        m.group(1): np.array([float(v) for v in m.group(2).split()])
        for m in re.finditer(r"TIMING (\w+) ([0-9. ]+)", log)
    }
    stats = {k: (after["item_lookup"][k] - before["item_lookup"][k]) for k in after["item_lookup"]}
    per = {
        k: stats[k] / stats["count"] / 1e3
        for k in ("queue", "compute_input", "compute_infer", "compute_output")
    }
    rows = [
        ("`rank` through gRPC, client side (p50)", float(np.median(served))),
        ("item_lookup queue (mean, Triton)", per["queue"]),
        ("item_lookup compute_input (mean, Triton)", per["compute_input"]),
        ("item_lookup compute_infer (mean, Triton)", per["compute_infer"]),
        ("  of it, execute() in the stub (mean)", float(inside["execute"].mean())),
        ("    of it, reading the inputs + limits (`_read`, mean)", float(inside["_read"].mean())),
        ("    of it, lookup + ranking graph (`_lookup`, mean)", float(inside["_lookup"].mean())),
        (
            "  compute_infer - execute(): server <-> stub passage",
            per["compute_infer"] - float(inside["execute"].mean()),
        ),
        ("item_lookup compute_output (mean, Triton)", per["compute_output"]),
        ("the same lookup + ranking graph in this process (mean)", float(np.mean(local)) * 1e3),
    ]
    lines = [
        "# Inside item_lookup: where the served time goes (python backend, N=100, L=50)",
        "",
        f"Command: `python benchmarks/serving_execute_profile.py --calls {args.calls}`  ",
        f"Commit: {code_commit()}  ",
        f"Machine: {machine()}",
        "",
        "| part | us |",
        "|---|---:|",
        *[f"| {name} | {value:.0f} |" for name, value in rows],
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
