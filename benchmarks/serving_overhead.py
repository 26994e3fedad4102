"""What serving `rank` adds over the same computation in process, python and native backends side by
side, and where the served time goes.

    python benchmarks/serving_overhead.py [--calls 400] [--explore]
        [--out benchmarks/results/serving_overhead_native.md]   # + .json and .png beside it

Model: the `em3` preset's ranking graph with its history length set to L (random weights on the
ML-100K-sized schema of benchmarks/export_latency.py: latency depends on shapes, not on weights),
exported once and rendered twice with `mmrank repo` defaults: `--backend python` (`rank` = an ensemble
over item_lookup in Triton's Python backend: the numpy lookup, then the ranking graph in onnxruntime) and
`--backend onnxruntime` (`rank` = the lookup graph merged into the ranking graph, itself one native
`onnxruntime_onnx` model: no ensemble, no Python step). Both servers (the real tritonserver, loopback)
run at once, so every path's calls alternate in rounds and see the same load on a shared CPU. One user
ranks N candidates against an L-item history.

- in process, the same computation on the same thread count as served: python = `rank_inputs` + the
  ranking graph; native = the served `rank/1/model.onnx` itself. Both in this venv's onnxruntime
  (its version is in the report), and the native one again on the ONNX Runtime the server's native
  backend links (1.19.2, from the wheel its build keeps, in a child process timed in the same rounds):
  the native overhead is counted against that one where the wheel is there. Beside them, each timed
  with 0.5 ms of sleep before every call (outside the timing), as a server runs it between requests:
  what a computation timed back to back leaves out;
- served, 1 caller (sync tritonclient, the request tensors built once): p50 / p99; overhead = served p50 -
  in-process p50. The same through the project's RankingClient (clients/ranking_client.py: the ids
  checked, the request built and the answer read on every call, as a user's code calls it), over gRPC
  and over HTTP. Beside them:
  `floor` on each server (a model with the table model's interface doing no work: any Python step's
  round trip, any native step's), the native `rank` behind a one-step batching ensemble (how every other
  render serves `rank`: what the ensemble's hand-off costs) and a bare gRPC round trip
  (`is_server_live`: what the client and gRPC cost with no model at all), the native `rank` through
  the bare generated gRPC stub with the request serialized once (tritonclient's own per-call work, by
  difference), and the native `rank` and `is_server_live` over HTTP (tritonclient.http, tensors in
  binary): what Python's gRPC stack costs against the server's other endpoint;
- where the time went: Triton's per-model counters (clients/triton_metrics.py) over the 1-caller calls,
  and the CPU time each served call costs the server (its process and its backend stubs, from /proc) and
  this client process, over a run of calls of its own: what bounds throughput on a shared CPU;
- 8 concurrent callers (a client each): p50, p99, failures; as 8 threads of this process (their client
  work shares one GIL) and as 8 processes, these through tritonclient, RankingClient over gRPC and
  RankingClient over HTTP in turn (each half of the calls, the clients in the order A B C C B A);
- each client's own work in process: building the request, reading the response;
- `--perf-analyzer PATH`: the same request through Triton's C++ client, perf_analyzer (shipped as
  `bin/perf_analyzer` in the tritonclient 2.51 wheel; it loads libb64.so.0d, Debian's libb64-0d, and
  libcudart.so.12, e.g. from the nvidia-cuda-runtime-cu12 wheel through LD_LIBRARY_PATH, even for CPU
  servers), against each repository's `rank` at 1 and 8 concurrent requests, on a server of its own
  after the main run: what serving costs without the Python client and its gRPC stack;
- `--cpu-latency-us 0`: the whole run (servers, callers and in-process timings) with the machine's CPU
  wake-up latency limit held at 0 us (common/cpu_latency.py, root only): idle CPUs poll instead of
  halting, so neither a hand-off between threads nor a computation after an idle gap waits on a halted
  virtual CPU's wake-up;
- `--explore`: the native repository with other onnxruntime threading (intra_op_thread_count 2 and 0 =
  one per core; parallel execution mode with 2 inter-op threads), onnxruntime's memory arena or memory
  pattern off, 2 `rank` instances, and the lookup as its own model (item_lookup) before a ranking model
  with dynamic batching in a `rank` ensemble, each on its own server after the main run, against the
  same in-process computation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.export_latency import build_model, timed  # noqa: E402
from clients import triton_metrics  # noqa: E402
from common.cpu_latency import CpuLatencyHold  # noqa: E402
from common.errors import MMRankError  # noqa: E402
from common.provenance import record  # noqa: E402
from export import native_backend, procfs  # noqa: E402
from export.onnx_graphs import ExportConfig, export_model  # noqa: E402
from export.repository import (  # noqa: E402
    RenderConfig,
    read_config,
    render_repository,
    table_model,
    write_config,
)
from export.triton_launcher import TritonConfig, TritonServer, parse_cpus  # noqa: E402
from model_repository import item_table as it  # noqa: E402
from model_repository.ort_graph import OrtGraph  # noqa: E402

MODELS = ("rank", "item_lookup", "ranking", "floor", "rank_in_ensemble")  # the counters the report shows
STAT_PARTS = ("queue", "compute_input", "compute_infer", "compute_output")
ROUNDS = 10
NUM_ITEMS = 1682
BACKENDS = {"python": "python", "native": "onnxruntime"}  # report name -> `mmrank repo --backend`
FLOOR = "python: floor (a Python step doing no work)"
NATIVE_FLOOR = "native: floor (a native step doing no work)"
HOP = "native: rank behind a one-step ensemble (what the ensemble hop costs)"
HOP_MODEL = "rank_in_ensemble"  # MODELS names it too
GRPC = "gRPC round trip, no model (is_server_live)"
RAW = "native: served, bare gRPC stub (request built once)"
HTTP = "native: served over HTTP (tritonclient.http, binary tensors)"
HTTP_LIVE = "HTTP round trip, no model (is_server_live)"
SERVER_ORT = "native: in process, the server's ONNX Runtime"
OWN_CLIENT = "RankingClient (ids checked, request built, answer read per call)"
CPU_CALLS = 1000  # calls per path for the CPU-time table: /proc counts in clock ticks (10 ms)
OUTPUTS = ("scores", it.CANDIDATE_KNOWN, it.USER_KNOWN, it.TABLE_VERSION)  # every output `rank` answers
IDLE_S = 0.0005  # the pause before each call of the "idle before each call" in-process paths
IDLE = f" ({IDLE_S * 1e3:g} ms idle before each call)"
# --explore: label -> (RenderConfig changes, table model config parameters set after rendering)
VARIANTS = {
    "merged, intra_op 1 (default)": ({}, {}),
    "merged, intra_op 2": ({"rank_graph_threads": 2}, {}),
    "merged, intra_op 0 (onnxruntime: one per core)": ({}, {"intra_op_thread_count": "0"}),
    "merged, parallel execution, inter_op 2": ({}, {"execution_mode": "1", "inter_op_thread_count": "2"}),
    "merged, 2 instances": ({"lookup_instances": 2}, {}),
    "merged, no memory arena": ({}, {"enable_mem_arena": "0"}),
    "merged, no memory pattern": ({}, {"enable_mem_pattern": "0"}),
    "separate lookup -> ranking (dynamic batching)": ({"lookup": "separate"}, {}),
}


FLOOR_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            shape = pb_utils.get_input_tensor_by_name(request, "candidate_ids").as_numpy().shape
            scores = pb_utils.Tensor("scores", np.zeros(shape, np.float32))
            known = pb_utils.Tensor("candidate_known", np.ones(shape, bool))
            user = pb_utils.Tensor("user_known", np.zeros((shape[0], 1), bool))
            version = pb_utils.Tensor("item_table_version", np.ones((shape[0], 1), np.int64))
            responses.append(pb_utils.InferenceResponse(output_tensors=[scores, known, user, version]))
        return responses
"""


def add_floor_model(repo: Path) -> None:
    """`floor`: the python item_lookup's config (inputs, outputs, batching, instances) without its
    parameters, and a model that answers at once."""
    config = (repo / "item_lookup" / "config.pbtxt").read_text()
    config = re.sub(
        r'parameters \{\n  key: "[^"]*"\n  value \{\n    string_value: .*\n  \}\n\}\n', "", config
    )
    (repo / "floor" / "1").mkdir(parents=True)
    (repo / "floor" / "config.pbtxt").write_text(config.replace('name: "item_lookup"', 'name: "floor"', 1))
    (repo / "floor" / "1" / "model.py").write_text(FLOOR_MODEL)


def add_native_floor(repo: Path) -> None:
    """`floor` in a native repository: the native `rank`'s config (without its optional inputs) over a
    graph of its interface that does no work (constant scores and flags of the request's shape)."""
    import onnx
    from onnx import TensorProto, helper

    from export.native_runtime import fit_native_runtime

    config = read_config(table_model(repo))
    config.name = "floor"
    config.ClearField("parameters")
    del config.input[2:]  # history_ids and candidate_ids only
    nodes = [
        helper.make_node("Shape", [it.CANDIDATE_IDS], ["n"]),
        helper.make_node("Shape", [it.CANDIDATE_IDS], ["b"], start=0, end=1),
        helper.make_node("Concat", ["b", "one"], ["b1"], axis=0),
    ]
    outputs = []
    for name, dtype, value, shape in (
        ("scores", TensorProto.FLOAT, 0.0, "n"),
        (it.CANDIDATE_KNOWN, TensorProto.BOOL, True, "n"),
        (it.USER_KNOWN, TensorProto.BOOL, False, "b1"),
        (it.TABLE_VERSION, TensorProto.INT64, 1, "b1"),
    ):
        fill = helper.make_tensor(f"{name}_fill", dtype, [1], [value])
        nodes.append(helper.make_node("ConstantOfShape", [shape], [name], value=fill))
        dims = ["batch", "candidates"] if shape == "n" else ["batch", 1]
        outputs.append(helper.make_tensor_value_info(name, dtype, dims))
    inputs = [helper.make_tensor_value_info(t.name, TensorProto.INT64, ["batch", "n"]) for t in config.input]
    one = onnx.numpy_helper.from_array(np.array([1], np.int64), "one")
    graph = helper.make_graph(nodes, "floor", inputs, outputs, initializer=[one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (repo / "floor" / "1").mkdir(parents=True)
    onnx.save(fit_native_runtime(model), repo / "floor" / "1" / "model.onnx")
    write_config(repo / "floor", config)


def add_native_ensemble(repo: Path, export: Path) -> None:
    """HOP_MODEL: a batching ensemble whose one step is the native `rank`, as `rank` itself is over the
    table model of every other render (`export.repository.rank_config`): what that hand-off adds."""
    from export.manifest import Manifest
    from export.repository import rank_config

    rc = RenderConfig(backend="onnxruntime")
    config = rank_config(Manifest.read(export), read_config(table_model(repo)), None, rc)
    config.name = HOP_MODEL
    write_config(repo / HOP_MODEL, config)
    (repo / HOP_MODEL / "1").mkdir()


def own_client(backend: str, protocol: str = "grpc") -> str:
    """The path name of `rank` served by `backend` to the project's own client over `protocol`."""
    return f"{backend}: served{' over HTTP' if protocol == 'http' else ''}, {OWN_CLIENT}"


def percentiles(ms: list[float]) -> tuple[float, float]:
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def request(n: int, length: int, num_items: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.integers(1, num_items + 1, (1, length)).astype(np.int64),
        rng.integers(1, num_items + 1, (1, n)).astype(np.int64),
    )


def in_process(export: Path, hist: np.ndarray, cands: np.ndarray, threads: int) -> dict[str, Callable]:
    """The python backend's computation in process: the numpy lookup + the ranking graph, and the graph
    alone."""
    from export.manifest import Manifest

    manifest = Manifest.read(export)
    table = it.ItemTable.read(export / "item_table")
    lookup = manifest.model.lookup()
    spec = manifest.graph("ranking")
    graph = OrtGraph(export / spec.file, threads=threads)
    feeds = it.rank_inputs(table, lookup, hist, cands)
    graph_feeds = {t.name: feeds[t.name] for t in spec.inputs}

    def whole():
        f = it.rank_inputs(table, lookup, hist, cands)
        graph.run({t.name: f[t.name] for t in spec.inputs})

    return {"lookup + graph": whole, "graph only": lambda: graph.run(graph_feeds)}


def native_in_process(model: Path, hist: np.ndarray, cands: np.ndarray, threads: int) -> Callable:
    """The native backend's computation in process: the served lookup + ranking graph file itself."""
    graph = OrtGraph(model, threads=threads)
    feeds = {it.HISTORY_IDS: hist, it.CANDIDATE_IDS: cands}
    return lambda: graph.run(feeds)


CHILD = """
import json, sys, time
sys.path[:0] = sys.argv[1:3]  # the unpacked wheel's onnxruntime first, then this repository
import numpy as np
import onnxruntime
from model_repository.ort_graph import OrtGraph
graph = OrtGraph(sys.argv[3], threads=int(sys.argv[4]))
feeds = dict(np.load(sys.argv[5]))
print(json.dumps(onnxruntime.__version__), flush=True)
for line in sys.stdin:
    calls, warmup = map(int, line.split())
    for _ in range(warmup):
        graph.run(feeds)
    ms = []
    for _ in range(calls):
        start = time.perf_counter()
        graph.run(feeds)
        ms.append((time.perf_counter() - start) * 1e3)
    print(json.dumps(ms), flush=True)
"""


class ServerRuntime:
    """The native computation timed in a child process on the ONNX Runtime the server's native backend
    links (its wheel unpacked from the backend build's cache): a path of `one_caller` whose calls are
    timed there, batch by batch, in the same rounds as the others."""

    def __init__(self, model: Path, hist: np.ndarray, cands: np.ndarray, threads: int, tmp: Path):
        wheel = native_backend.backends_home() / ".work" / "wheels" / native_backend.ORT_WHEEL
        if not wheel.is_file():
            raise FileNotFoundError(f"{wheel} (kept by `make setup`'s native backend build)")
        site = tmp / "server-onnxruntime"
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site, [n for n in z.namelist() if n.startswith("onnxruntime/")])
        feeds = tmp / "server-onnxruntime-feeds.npz"
        np.savez(feeds, **{it.HISTORY_IDS: hist, it.CANDIDATE_IDS: cands})
        root = str(Path(__file__).resolve().parents[1])
        command = [sys.executable, "-c", CHILD, str(site), root, str(model), str(threads), str(feeds)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.version = json.loads(self._line())

    def _line(self) -> str:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the timing process exited with code {self.process.wait()}")
        return line

    def timed(self, calls: int, warmup: int) -> list[float]:
        self.process.stdin.write(f"{calls} {warmup}\n")
        self.process.stdin.flush()
        return json.loads(self._line())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


class Idle:
    """`fn` timed after `pause_s` of sleep before each call, outside the timing: a computation in
    process as a server runs it, between requests rather than back to back (caches, branch predictors
    and the idle core cool down in between)."""

    def __init__(self, fn: Callable, pause_s: float = IDLE_S):
        self.fn, self.pause_s = fn, pause_s

    def timed(self, calls: int, warmup: int) -> list[float]:
        for _ in range(warmup):
            self.fn()
        out = []
        for _ in range(calls):
            time.sleep(self.pause_s)
            start = time.perf_counter()
            self.fn()
            out.append((time.perf_counter() - start) * 1e3)
        return out


def timed_batch(fn, calls: int, warmup: int) -> list[float]:
    """`calls` timings (ms) of `fn` after `warmup` untimed calls; a ServerRuntime or an Idle path times
    itself."""
    return (
        fn.timed(calls, warmup) if isinstance(fn, ServerRuntime | Idle) else timed(fn, calls, warmup=warmup)
    )


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the process and its children (a server's backend stubs); a stub that
    ended between the listing and the read counts nothing."""
    stats = (procfs.stat(p) for p in [pid, *procfs.children(pid)])
    return sum(s.cpu for s in stats if s is not None) / os.sysconf("SC_CLK_TCK")


def cpu_per_call(fn: Callable, server: TritonServer, calls: int = CPU_CALLS) -> dict[str, float]:
    """ms per call of wall time, of the server's CPU (process and stubs) and of this process's CPU (the
    client and its gRPC threads), over `calls` back-to-back calls."""
    timed(fn, 0, warmup=20)
    pid = server.process.pid
    before = (time.perf_counter(), _cpu_seconds(pid), time.process_time())
    for _ in range(calls):
        fn()
    after = (time.perf_counter(), _cpu_seconds(pid), time.process_time())
    wall, server_cpu, client = (b - a for a, b in zip(before, after, strict=True))
    return {"wall": wall / calls * 1e3, "server": server_cpu / calls * 1e3, "client": client / calls * 1e3}


def request_tensors(grpc, hist, cands):
    out = []
    for name, arr in ((it.HISTORY_IDS, hist), (it.CANDIDATE_IDS, cands)):
        t = grpc.InferInput(name, list(arr.shape), "INT64")
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


def model_stats(client) -> dict[str, dict[str, float]]:
    """Cumulative {model: {part: ns, "count": n}} from Triton's statistics endpoint."""
    out = {}
    for s in client.get_inference_statistics(as_json=True)["model_stats"]:
        if s["name"] in MODELS:
            inf = s["inference_stats"]
            parts = {p: float(inf.get(p, {}).get("ns", 0)) for p in STAT_PARTS}
            parts["count"] = float(inf.get("success", {}).get("count", 0))
            parts["success_ns"] = float(inf.get("success", {}).get("ns", 0))
            out[s["name"]] = parts
    return out


def export_em3(out: Path, history_len: int) -> Path:
    export = out / "export"
    model = build_model("em3", history_len=history_len)
    config = ExportConfig(fp16=False, torch_program=False, ranking_only=True, progress=False)
    export_model(model, export, {"path": "random-init", "sha256": "0" * 64}, None, config)
    return export


def build(out: Path, history_len: int, rc: RenderConfig) -> Path:
    """The em3 export in out/export, rendered with `rc` into out/repo; the export folder."""
    export = export_em3(out, history_len)
    render_repository(export, out / "repo", rc)
    return export


def render_variant(export: Path, repo: Path, changes: dict, params: dict[str, str]) -> Path:
    render_repository(export, repo, RenderConfig(backend="onnxruntime", **changes))
    model = table_model(repo)
    config = read_config(model)
    for key, value in params.items():
        config.parameters[key].string_value = value
    write_config(model, config)
    return repo


def _metrics(server: TritonServer) -> str:
    return f"127.0.0.1:{server.metrics_port}"


def serve(repo: Path, cpus: frozenset[int] | None) -> TritonServer:
    return TritonServer(TritonConfig(repo, control_mode="explicit", cpus=cpus)).start()


def one_caller(paths: dict[str, Callable], calls: int, servers: dict[str, TritonServer]) -> tuple:
    """Every path's calls in alternating rounds: ({path: ms}, {server: Triton's counters per model})."""
    for fn in paths.values():
        timed_batch(fn, 0, warmup=20)
    before = {name: triton_metrics.settled_scrape(_metrics(s)) for name, s in servers.items()}
    ms: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(ROUNDS):
        for name, fn in paths.items():
            ms[name] += timed_batch(fn, calls // ROUNDS, warmup=2)
    times = {}
    for name, server in servers.items():
        after = triton_metrics.settled_scrape(_metrics(server))
        times[name] = {m: asdict(t) for m, t in triton_metrics.per_request(before[name], after).items()}
    return ms, times


def callers(url: str, inputs_of: Callable, calls: int, n: int) -> tuple[list[float], int]:
    """`n` concurrent callers, a client each, `calls` calls of `rank` each: (ms, failures)."""
    import tritonclient.grpc as grpc

    clients = [grpc.InferenceServerClient(url) for _ in range(n)]
    inputs = inputs_of(grpc)
    for c in clients:
        timed(lambda c=c: c.infer("rank", inputs), 0, warmup=20)
    failures = []

    def one(c) -> list[float]:
        def call():
            try:
                c.infer("rank", inputs, client_timeout=10)
            except Exception as e:  # every failure counts, whatever its kind
                failures.append(e)

        return timed(call, calls, warmup=0)

    with ThreadPoolExecutor(n) as pool:
        ms = [t for part in pool.map(one, clients) for t in part]
    return ms, len(failures)


CLIENTS = {"tritonclient": "grpc", "RankingClient": "grpc", "RankingClient over HTTP": "http"}  # -> protocol


def client_url(server: TritonServer, client: str) -> str:
    return f"http://{server.http_url}" if CLIENTS[client] == "http" else server.grpc_url


def rank_call(url: str, hist: np.ndarray, cands: np.ndarray, client: str = "tritonclient") -> Callable:
    """One caller's `rank` call of this request, raising on failure: tritonclient's `infer` with the
    request tensors built once, or the project's RankingClient (clients/ranking_client.py: ids checked,
    request built and the answer read on every call, as a user calls it; the url picks gRPC or HTTP)."""
    if client != "tritonclient":
        from clients.ranking_client import ClientConfig, RankingClient

        ranking = RankingClient(ClientConfig(url=url, timeout_s=10, retries=0))
        return lambda: ranking.rank(hist[0], cands[0])
    import tritonclient.grpc as grpc

    triton = grpc.InferenceServerClient(url)
    inputs = request_tensors(grpc, hist, cands)
    return lambda: triton.infer("rank", inputs, client_timeout=10)


def _process_caller(url: str, hist: np.ndarray, cands: np.ndarray, calls: int, barrier, client: str) -> tuple:
    """One caller process: warm up, wait for the others, then `calls` timed calls: (ms, failures)."""
    call_rank = rank_call(url, hist, cands, client)
    timed(call_rank, 0, warmup=20)
    barrier.wait()
    failures = 0

    def call():
        nonlocal failures
        try:
            call_rank()
        except Exception:  # every failure counts, whatever its kind
            failures += 1

    return timed(call, calls, warmup=0), failures


def caller_processes(
    url: str, hist, cands, calls: int, n: int, client: str = "tritonclient"
) -> tuple[list[float], int]:
    """`n` callers in processes of their own (no client shares a GIL), each through `client` (CLIENTS):
    (ms, failures)."""
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(n, mp_context=context) as pool:
        barrier = manager.Barrier(n)
        args = [(url, hist, cands, calls, barrier, client)] * n
        parts = list(pool.map(_process_caller, *zip(*args, strict=True)))
    return [t for ms, _ in parts for t in ms], sum(f for _, f in parts)


def process_row(backend: str, client: str) -> str:
    """The 8-process row of `backend`'s server called through `client` (CLIENTS)."""
    return backend if client == "tritonclient" else f"{backend} ({client})"


def clients_in_turn(servers: dict[str, TritonServer], hist, cands, calls: int) -> dict[str, tuple]:
    """8 caller processes per server and client (CLIENTS), `calls` calls each in two halves, the clients
    in turn (A B C C B A) so the run's drift falls on each alike: {row: (ms, failures)}."""
    parts: dict[str, tuple[list[float], int]] = {}
    for client in (*CLIENTS, *reversed(CLIENTS)):
        for name, server in servers.items():
            row = process_row(name, client)
            ms, failures = caller_processes(client_url(server, client), hist, cands, calls // 2, 8, client)
            before_ms, before_failures = parts.get(row, ([], 0))
            parts[row] = (before_ms + ms, before_failures + failures)
    return parts


def bare_stub(url: str, hist: np.ndarray, cands: np.ndarray) -> Callable:
    """`rank` through the generated gRPC stub with a request serialized once: what tritonclient's own
    per-call work (request building, result wrapping) adds, by difference."""
    import grpc as grpcio
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name="rank")
    for name, arr in ((it.HISTORY_IDS, hist), (it.CANDIDATE_IDS, cands)):
        request.inputs.add(name=name, datatype="INT64", shape=list(arr.shape))
        request.raw_input_contents.append(arr.tobytes())
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpcio.insecure_channel(url))
    return lambda: stub.ModelInfer(request)


def http_rank(url: str, hist: np.ndarray, cands: np.ndarray) -> tuple[Callable, Callable]:
    """`rank` and `is_server_live` over Triton's HTTP endpoint, tensors in and out as binary data."""
    import tritonclient.http as http

    client = http.InferenceServerClient(url)
    inputs = []
    for name, arr in ((it.HISTORY_IDS, hist), (it.CANDIDATE_IDS, cands)):
        inputs.append(http.InferInput(name, list(arr.shape), "INT64"))
        inputs[-1].set_data_from_numpy(arr, binary_data=True)
    outputs = [http.InferRequestedOutput(n, binary_data=True) for n in OUTPUTS]
    return (lambda: client.infer("rank", inputs, outputs=outputs)), client.is_server_live


def client_side(hist, cands, result) -> dict[str, float]:
    """p50 ms of the client's own work on this request and `result` (a native `rank` answer): tritonclient
    building the two request tensors and reading the four outputs; RankingClient checking the ids and
    building the request, and reading the answer."""
    import tritonclient.grpc as grpc

    from clients.grpc_transport import infer_request, response_outputs
    from clients.rank_protocol import checked

    response = result.get_response()
    p50 = {
        "tritonclient: build request tensors": lambda: request_tensors(grpc, hist, cands),
        "tritonclient: read response outputs": lambda: [result.as_numpy(n) for n in OUTPUTS],
        "RankingClient: check ids, build request": lambda: infer_request(
            "rank", checked(hist[0], cands[0], None), True
        ),
        "RankingClient: read answer": lambda: response_outputs(response, "rank"),
    }
    return {name: float(np.median(timed(fn, 2000))) for name, fn in p50.items()}


def measure(args, tmp: Path) -> dict:
    import tritonclient.grpc as grpc

    export = export_em3(tmp, args.history)
    repos = {name: tmp / name for name in BACKENDS}
    for name, backend in BACKENDS.items():
        render_repository(export, repos[name], RenderConfig(backend=backend))
    add_floor_model(repos["python"])
    add_native_floor(repos["native"])
    add_native_ensemble(repos["native"], export)
    hist, cands = request(args.candidates, args.history, NUM_ITEMS)
    threads = RenderConfig.rank_graph_threads
    native_file = table_model(repos["native"]) / "1" / "model.onnx"
    local = {
        "python: in process": in_process(export, hist, cands, threads)["lookup + graph"],
        "native: in process": native_in_process(native_file, hist, cands, threads),
    }
    for backend in BACKENDS:
        local[f"{backend}: in process{IDLE}"] = Idle(local[f"{backend}: in process"])
    try:
        local[SERVER_ORT] = ServerRuntime(native_file, hist, cands, threads, tmp)
    except FileNotFoundError as e:
        print(f"no in-process row on the server's ONNX Runtime: {e} is missing", file=sys.stderr)
    servers = {name: serve(repo, args.server_cpus) for name, repo in repos.items()}
    try:
        clients = {name: grpc.InferenceServerClient(s.grpc_url) for name, s in servers.items()}
        inputs = request_tensors(grpc, hist, cands)
        over_http, http_live = http_rank(servers["native"].http_url, hist, cands)
        served = {  # path -> (server, call)
            "python: served": ("python", lambda: clients["python"].infer("rank", inputs)),
            "native: served": ("native", lambda: clients["native"].infer("rank", inputs)),
            **{
                own_client(name, CLIENTS[client]): (
                    name,
                    rank_call(client_url(s, client), hist, cands, client),
                )
                for client in CLIENTS
                if client != "tritonclient"
                for name, s in servers.items()
            },
            FLOOR: ("python", lambda: clients["python"].infer("floor", inputs)),
            NATIVE_FLOOR: ("native", lambda: clients["native"].infer("floor", inputs)),
            HOP: ("native", lambda: clients["native"].infer(HOP_MODEL, inputs)),
            RAW: ("native", bare_stub(servers["native"].grpc_url, hist, cands)),
            GRPC: ("native", lambda: clients["native"].is_server_live()),
            HTTP: ("native", over_http),
            HTTP_LIVE: ("native", http_live),
        }
        paths = {**local, **{name: call for name, (_, call) in served.items()}}
        ms, times = one_caller(paths, args.calls, servers)
        cpu = {name: cpu_per_call(call, servers[server]) for name, (server, call) in served.items()}
        result = clients["native"].infer("rank", inputs)
        eight = {
            name: callers(s.grpc_url, lambda g: request_tensors(g, hist, cands), args.calls, 8)
            for name, s in servers.items()
        }
        processes = clients_in_turn(servers, hist, cands, args.calls)
    finally:
        for server in servers.values():
            server.stop()
        if SERVER_ORT in local:
            local[SERVER_ORT].close()
    results = {
        "one": {name: percentiles(v) for name, v in ms.items()},
        "eight": {name: (*percentiles(v), fails) for name, (v, fails) in eight.items()},
        "eight_processes": {name: (*percentiles(v), fails) for name, (v, fails) in processes.items()},
        "triton": times,
        "cpu": cpu,
        "client": client_side(hist, cands, result),
    }
    if SERVER_ORT in local:
        results["server_onnxruntime"] = local[SERVER_ORT].version
    if args.perf_analyzer:
        results["perf_analyzer"] = {
            name: alone(repo, args.server_cpus, args.perf_analyzer, hist, cands, tmp)
            for name, repo in repos.items()
        }
    if args.explore:
        results["explore"] = explore(export, tmp, hist, cands, local["native: in process"], args)
    return results


PA_CONCURRENCY = (1, 8)
PA_COLUMNS = {  # perf_analyzer's CSV column (us) -> report key (ms)
    "p50 latency": "p50",
    "p99 latency": "p99",
    "Server Queue": "queue",
    "Server Compute Infer": "infer",
    "Network+Server Send/Recv": "network_and_server",
}


def perf_analyzer(binary: str, url: str, hist: np.ndarray, cands: np.ndarray, tmp: Path) -> dict:
    """{concurrency: {p50, p99, queue, infer, network_and_server (ms), throughput}} of `rank` at `url`
    measured by perf_analyzer with this request; RuntimeError naming the failure otherwise. A `rank`
    without batching (the native model) takes the batch axis in the shapes perf_analyzer sends."""
    import tritonclient.grpc as grpc

    with grpc.InferenceServerClient(url) as client:
        batched = client.get_model_config("rank").config.max_batch_size > 0
    lead = [] if batched else [1]
    data = {
        name: {"content": arr[0].tolist(), "shape": [*lead, arr.shape[1]]}
        for name, arr in ((it.HISTORY_IDS, hist), (it.CANDIDATE_IDS, cands))
    }
    inputs, csv = tmp / "perf_analyzer_input.json", tmp / f"perf_analyzer_{url.rsplit(':', 1)[1]}.csv"
    inputs.write_text(json.dumps({"data": [data]}))
    low, high = PA_CONCURRENCY
    command = [
        binary,
        "-m",
        "rank",
        "-i",
        "grpc",
        "-u",
        url,
        *(["-b", "1"] if batched else []),
        "--input-data",
        str(inputs),
        "--shape",
        f"{it.HISTORY_IDS}:{','.join(map(str, data[it.HISTORY_IDS]['shape']))}",
        "--shape",
        f"{it.CANDIDATE_IDS}:{','.join(map(str, data[it.CANDIDATE_IDS]['shape']))}",
        "--concurrency-range",
        f"{low}:{high}:{high - low}",
        "--measurement-interval",
        "5000",
        "--stability-percentage",
        "20",
        "-f",
        str(csv),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or not csv.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"perf_analyzer exited {done.returncode}: {' / '.join(tail)}")
    header, *rows = [line.split(",") for line in csv.read_text().splitlines() if line]
    out = {}
    for row in rows:
        values = dict(zip(header, row, strict=True))
        out[int(values["Concurrency"])] = {
            "throughput": float(values["Inferences/Second"]),
            **{key: float(values[column]) / 1e3 for column, key in PA_COLUMNS.items()},
        }
    return out


def alone(repo: Path, cpus, binary: str, hist: np.ndarray, cands: np.ndarray, tmp: Path) -> dict:
    """perf_analyzer against `repo` on a server of its own, as one server per host is deployed."""
    server = serve(repo, cpus)
    try:
        return perf_analyzer(binary, server.grpc_url, hist, cands, tmp)
    finally:
        server.stop()


def explore(export: Path, tmp: Path, hist, cands, local: Callable, args: argparse.Namespace) -> dict:
    """Each VARIANTS entry on its own server: 1 caller against the in-process native computation, 8
    caller processes, the CPU time per call and, with `binary`, perf_analyzer at 1 and 8 concurrent
    requests; the servers on `args.server_cpus`."""
    import tritonclient.grpc as grpc

    calls, binary = args.calls, args.perf_analyzer
    out = {}
    for label, (changes, params) in VARIANTS.items():
        repo = render_variant(export, tmp / f"variant{len(out)}", changes, params)
        server = serve(repo, args.server_cpus)
        try:
            client = grpc.InferenceServerClient(server.grpc_url)
            inputs = request_tensors(grpc, hist, cands)

            def served(c=client, x=inputs):
                return c.infer("rank", x)

            ms, times = one_caller({"in process": local, "served": served}, calls, {"native": server})
            eight, fails = caller_processes(server.grpc_url, hist, cands, calls, 8)
            cpu = cpu_per_call(served, server)
            cpp = perf_analyzer(binary, server.grpc_url, hist, cands, tmp) if binary else None
        finally:
            server.stop()
        out[label] = {
            "one": {name: percentiles(v) for name, v in ms.items()},
            "eight": (*percentiles(eight), fails),
            "triton": times["native"],
            "cpu": cpu,
            **({"perf_analyzer": cpp} if cpp else {}),
        }
        print(f"explore: {label}: {out[label]['one']}", file=sys.stderr)
    return out


def _cpus(text: str) -> frozenset[int]:
    try:
        return parse_cpus(text, "CPUs")
    except MMRankError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--out", default="benchmarks/results/serving_overhead_native.md", help=".md; .json, .png beside"
    )
    p.add_argument("--calls", type=int, default=400, help="measured calls per path and per caller")
    p.add_argument("--candidates", type=int, default=100, help="N")
    p.add_argument("--history", type=int, default=50, help="L")
    p.add_argument(
        "--explore", action="store_true", help="also measure the native threading/batching variants"
    )
    p.add_argument(
        "--perf-analyzer",
        default=None,
        help="path of Triton's perf_analyzer: also measure both servers with its C++ client",
    )
    p.add_argument(
        "--server-cpus",
        type=_cpus,
        default=None,
        help="CPUs every server of the run is kept on, as `mmrank serve --cpus` (e.g. 0); default: all. "
        "The callers run on any CPU",
    )
    p.add_argument(
        "--cpu-latency-us",
        type=int,
        default=None,
        help="hold the machine's CPU wake-up latency limit at this many microseconds for the whole run, "
        "in-process timings included (as `mmrank serve --cpu-latency-us`; root only); default: the "
        "machine's own idle states",
    )
    args = p.parse_args(argv)
    try:
        hold = (
            contextlib.nullcontext() if args.cpu_latency_us is None else CpuLatencyHold(args.cpu_latency_us)
        )
        with hold:
            results = measured(
                "benchmarks/serving_overhead.py", argv, "mmrank-overhead-", lambda tmp: measure(args, tmp)
            )
    except MMRankError as e:
        print(f"serving_overhead: error: {e}", file=sys.stderr)
        return 1
    results["settings"] = {
        "candidates": args.candidates,
        "history": args.history,
        "calls": args.calls,
        "server_cpus": sorted(args.server_cpus) if args.server_cpus else None,
        "cpu_latency_us": args.cpu_latency_us,
    }
    save(results, Path(args.out), write_report, plot)
    return 0


def measured(script: str, argv: list[str] | None, prefix: str, measure: Callable[[Path], dict]) -> dict:
    """`measure(tmp)` in a temporary folder, with the provenance of `python script argv` (and the load
    average after it) under "provenance"."""
    provenance = record(["python", script, *(argv if argv is not None else sys.argv[1:])])
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        results = measure(Path(tmp))
    results["provenance"] = {**provenance, "load_average_1min_after": os.getloadavg()[0]}
    return results


def save(results: dict, out: Path, write_report: Callable, plot: Callable) -> None:
    """The results as out (.md report), .json and .png beside it; the report printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    write_report(results, out)
    plot(results, out.with_suffix(".png"))
    print(out.read_text())


# ---- report ----------------------------------------------------------------------------------------
def in_process_p50(r: dict, backend: str) -> float:
    """The in-process p50 a backend's overhead is counted against: the native one on the server's own
    ONNX Runtime where that row was measured."""
    if backend == "native" and SERVER_ORT in r["one"]:
        return r["one"][SERVER_ORT][0]
    return r["one"][f"{backend}: in process"][0]


def _served(backend: str, client: str) -> str:
    return f"{backend}: served" if client == "tritonclient" else own_client(backend, CLIENTS[client])


def overheads(r: dict, client: str = "tritonclient") -> dict[str, float]:
    """{backend: served p50 - in-process p50} of the 1-caller rows of `client` (CLIENTS)."""
    return {b: r["one"][_served(b, client)][0] - in_process_p50(r, b) for b in BACKENDS}


def _own_client_lines(r: dict) -> list[str]:
    """The overheads through the project's client, over each protocol a run has rows of."""
    parts = []
    for client, protocol in CLIENTS.items():
        if client == "tritonclient" or own_client("native", protocol) not in r["one"]:  # older runs
            continue
        over = overheads(r, client)
        parts.append(
            f"over {'HTTP' if protocol == 'http' else 'gRPC'}: python {over['python']:.3f} ms, native "
            f"{over['native']:.3f} ms (native / python = {over['native'] / over['python']:.2f})"
        )
    if not parts:
        return []
    return [
        "Through the project's client (clients/ranking_client.py, every call checking the ids, building "
        "the request and reading the answer, as `mmrank rank`, the demo and the load test call it): "
        + "; ".join(parts)
        + ".",
        "",
    ]


def _triton_rows(times: dict) -> list[str]:
    rows = []
    for model, t in times.items():
        if model in MODELS:
            rows.append(
                f"| {model} | {t['requests']} | {t['batch']:.2f} | {t['queue_us'] / 1e3:.3f} "
                f"| {t['compute_us'] / 1e3:.3f} | {t['infer_us'] / 1e3:.3f} | {t['request_us'] / 1e3:.3f} |"
            )
    return rows


def _perf_analyzer_rows(r: dict) -> list[str]:
    if "perf_analyzer" not in r:
        return []
    lines = [
        "",
        "The same `rank` request through Triton's C++ client (perf_analyzer, gRPC, 5 s windows until "
        "stable), each repository on a server of its own after the main run; overhead = its p50 minus the "
        "in-process p50 above:",
        "",
        "| server | concurrent requests | p50 (ms) | p99 (ms) | requests/s | overhead at p50 (ms) "
        "| queue (ms) | infer (ms) | network + server send/recv (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, levels in r["perf_analyzer"].items():
        local = in_process_p50(r, name)
        for concurrency, v in sorted(levels.items(), key=lambda kv: int(kv[0])):
            over = f"{v['p50'] - local:.3f}" if int(concurrency) == 1 else ""
            lines.append(
                f"| {name} | {concurrency} | {v['p50']:.3f} | {v['p99']:.3f} | {v['throughput']:.1f} | {over} "
                f"| {v['queue']:.3f} | {v['infer']:.3f} | {v['network_and_server']:.3f} |"
            )
    return lines


def _reference(r: dict) -> str:
    if SERVER_ORT not in r["one"]:
        return "; the native one against this venv's onnxruntime (the server's wheel was not there)"
    venv = r["one"]["native: served"][0] - r["one"]["native: in process"][0]
    return (
        f"; the native one against the same graph on the server's ONNX Runtime {r['server_onnxruntime']} "
        f"(against this venv's onnxruntime: {venv:.3f} ms)"
    )


def _floor_lines(r: dict, over: dict[str, float]) -> list[str]:
    """What no native overhead can go below in this run (a native step that does no work), and what the
    transport under the Python client adds."""
    floor, grpc = r["one"][NATIVE_FLOOR][0], r["one"][GRPC][0]
    lines = [
        f"A native model doing no work costs {floor:.3f} ms served (a gRPC round trip with no model "
        f"{grpc:.3f} ms) against half the python backend's overhead, {over['python'] / 2:.3f} ms: the "
        "native overhead can be at most half the python one only where that floor is under it.",
        "",
    ]
    if HOP in r["one"]:
        hop = r["one"][HOP][0] - r["one"]["native: served"][0]
        lines += [
            f"The native `rank` behind a one-step batching ensemble, as every other render serves `rank`: "
            f"{r['one'][HOP][0]:.3f} ms, {hop:+.3f} ms against calling it directly.",
            "",
        ]
    if HTTP in r["one"]:
        http, live = r["one"][HTTP][0], r["one"][HTTP_LIVE][0]
        native = http - in_process_p50(r, "native")
        lines += [
            f"The same native `rank` over HTTP from this Python process: {http:.3f} ms served against "
            f"{r['one']['native: served'][0]:.3f} over gRPC, an overhead of {native:.3f} ms (native over "
            f"HTTP / python over gRPC = {native / over['python']:.2f}); a round trip with no model {live:.3f} "
            f"ms against {grpc:.3f}: what Python's gRPC stack costs per call.",
            "",
        ]
    idle = {b: r["one"].get(f"{b}: in process{IDLE}") for b in BACKENDS}
    if all(idle.values()):
        gap = {b: r["one"][f"{b}: served"][0] - idle[b][0] for b in BACKENDS}
        lines += [
            f"Served p50 minus the in-process p50 with {IDLE_S * 1e3:g} ms idle before each call: python "
            f"{gap['python']:.3f} ms, native {gap['native']:.3f} ms (native / python = "
            f"{gap['native'] / gap['python']:.2f}): the part of the overhead that is not the computation "
            "running colder between requests than back to back.",
            "",
        ]
    return lines


def _cpu_rows(r: dict) -> list[str]:
    lines = [
        "",
        f"CPU time per served call ({CPU_CALLS} back-to-back calls of each path after the rounds; server: "
        "tritonserver and its backend stubs, from /proc; client: this process, its gRPC threads "
        "included). On a shared CPU the sum bounds the calls per second, and so the latency at 8 callers:",
        "",
        "| path | wall (ms) | server CPU (ms) | client CPU (ms) |",
        "|---|---:|---:|---:|",
    ]
    return lines + [
        f"| {name} | {v['wall']:.3f} | {v['server']:.3f} | {v['client']:.3f} |"
        for name, v in r["cpu"].items()
    ]


def _explore_cpp_rows(variants: dict) -> list[str]:
    """The variants through perf_analyzer, where it ran; overhead against the variant's in-process p50."""
    if not any("perf_analyzer" in v for v in variants.values()):
        return []
    lines = [
        "",
        "The same variants through Triton's C++ client (perf_analyzer, on the same servers after the rows "
        "above):",
        "",
        "| variant | 1 request: p50 (ms) | overhead (ms) | 8 concurrent: p50 (ms) | p99 (ms) | requests/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, v in variants.items():
        one, eight = v["perf_analyzer"][1], v["perf_analyzer"][8]
        local = v["one"]["in process"][0]
        lines.append(
            f"| {label} | {one['p50']:.3f} | {one['p50'] - local:.3f} | {eight['p50']:.3f} | {eight['p99']:.3f} "
            f"| {eight['throughput']:.1f} |"
        )
    return lines


def _placement(s: dict) -> str:
    cpus = s.get("server_cpus")
    if not cpus:
        return "Servers and callers on every CPU."
    listed = ",".join(map(str, cpus))
    return f"Every server on CPU {listed} (`mmrank serve --cpus {listed}`, its backend stubs too); callers on any CPU."


def _idle_states(s: dict) -> str:
    us = s.get("cpu_latency_us")
    if us is None:
        return "Idle CPUs in the machine's own idle states (no wake-up latency limit held)."
    return (
        f"The CPU wake-up latency limit held at {us} us for the whole run, in-process timings included "
        f"(`--cpu-latency-us {us}`, /dev/cpu_dma_latency){': idle CPUs poll instead of halting' if us == 0 else ''}."
    )


def write_report(r: dict, path: Path) -> None:
    import onnxruntime

    prov, s = r["provenance"], r["settings"]
    over = overheads(r)
    lines = [
        "# Serving overhead, python and native backends: `rank` vs the same computation in process",
        "",
        f"Command: `{prov['command']}`  ",
        f"Commit: {prov['commit']}  ",
        f"Machine: {prov['machine']}; onnxruntime {onnxruntime.__version__} in process (the native backend "
        "links ONNX Runtime 1.19.2)  ",
        f"Date: {prov['date']}; 1-minute load average before / after: {prov['load_average_1min']:.2f} / "
        f"{prov['load_average_1min_after']:.2f} (a shared CPU inflates every number, p99 most)",
        "",
        f"em3 ranking graph (L={s['history']}), N={s['candidates']} candidates, one user per request; "
        "`mmrank repo` defaults. python: rank = an ensemble over item_lookup (Python backend: numpy lookup + "
        "ranking graph, 1 onnxruntime thread). native: rank = the lookup graph merged into the ranking "
        "graph, itself one onnxruntime_onnx model (intra_op_thread_count 1): no ensemble, no Python step. Both "
        "servers up at once, "
        f"{s['calls']} calls of every path in {ROUNDS} alternating rounds. {_placement(s)} "
        f"{_idle_states(s)}",
        "",
        "| path | p50 (ms) | p99 (ms) |",
        "|---|---:|---:|",
        *[f"| {name} | {p50:.3f} | {p99:.3f} |" for name, (p50, p99) in r["one"].items()],
        "",
        "| 8 callers (a client each) | p50 (ms) | p99 (ms) | failures |",
        "|---|---:|---:|---:|",
        *[
            f"| {name}: served, {where} | {p50:.3f} | {p99:.3f} | {f} |"
            for key, where in (("eight", "8 threads of this process"), ("eight_processes", "8 processes"))
            for name, (p50, p99, f) in r[key].items()
        ],
        "",
        f"**Overhead (served p50, 1 caller, minus in-process p50): python {over['python']:.3f} ms, native "
        f"{over['native']:.3f} ms** (native / python = {over['native'] / over['python']:.2f}){_reference(r)}.",
        "",
        *_own_client_lines(r),
        *_floor_lines(r, over),
        "Where the time went (1 caller; Triton's counters per model, mean per request; an ensemble's "
        "request time is its whole server-side time):",
        "",
        "| server: model | requests | batch | queue (ms) | compute (ms) | of it infer (ms) | request (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, times in r["triton"].items():
        lines += [row.replace("| ", f"| {name}: ", 1) for row in _triton_rows(times)]
    lines += _cpu_rows(r)
    lines += _perf_analyzer_rows(r)
    lines += ["", "The client's own work, in process (p50 ms):", "", "| part | ms |", "|---|---:|"]
    lines += [f"| {name} | {ms:.3f} |" for name, ms in r["client"].items()]
    if "explore" in r:
        local = r["explore"]
        lines += [
            "",
            "Native variants, each on its own server after the main run (1 caller: served vs the same "
            "in-process computation, back to back, in alternating rounds; 8 callers, a client process each):",
            "",
            "| variant | in process p50 | served p50 | served p99 | overhead | 8 callers p50 | 8 callers p99 "
            "| failures | table model compute (ms) | server CPU per call (ms) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for label, v in local.items():
            (lp50, _), (sp50, sp99) = v["one"]["in process"], v["one"]["served"]
            p50, p99, fails = v["eight"]
            table = v["triton"].get("item_lookup") or v["triton"].get("rank", {})  # rank: the native model
            compute = table.get("compute_us", float("nan")) / 1e3
            lines.append(
                f"| {label} | {lp50:.3f} | {sp50:.3f} | {sp99:.3f} | {sp50 - lp50:.3f} | {p50:.3f} | {p99:.3f} "
                f"| {fails} | {compute:.3f} | {v['cpu']['server']:.3f} |"
            )
        lines += _explore_cpp_rows(local)
    lines.append("")
    path.write_text("\n".join(lines))


def _label(client: str) -> str:
    return client if CLIENTS[client] == "http" else f"{client} over gRPC"


def _grouped(ax, x: np.ndarray, bars: dict[str, list[float]]) -> None:
    width = 0.8 / len(bars)
    for i, (label, values) in enumerate(bars.items()):
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, values, width, label=label)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    names = list(BACKENDS)
    x = np.arange(len(names))
    clients = [c for c in CLIENTS if all(_served(b, c) in r["one"] for b in names)]  # older runs: fewer
    bars = {"in process": [in_process_p50(r, b) for b in names]}
    bars |= {f"served, {_label(c)}": [r["one"][_served(b, c)][0] for b in names] for c in clients}
    _grouped(left, x, bars)
    left.set_xticks(x, names)
    left.set_ylabel("ms")
    left.set_title("p50, 1 caller (N=100, L=50)")
    left.legend(fontsize=7)
    eight = {f"8 threads, {_label('tritonclient')}": [r["eight"][b][1] for b in names]}
    for c in clients:
        rows = [process_row(b, c) for b in names]
        if all(row in r["eight_processes"] for row in rows):
            eight[f"8 processes, {_label(c)}"] = [r["eight_processes"][row][1] for row in rows]
    _grouped(right, x, eight)
    right.set_xticks(x, names)
    right.set_title("p99, 8 callers")
    right.legend(fontsize=7)
    us = r["settings"].get("cpu_latency_us")
    held = "" if us is None else f", CPU wake-up latency held at {us} us"
    fig.suptitle(f"rank served vs in process (load average {r['provenance']['load_average_1min']:.1f}{held})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
