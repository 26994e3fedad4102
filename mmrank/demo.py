"""`mmrank demo`: the whole pipeline on the embedded synthetic dataset, ending in gRPC calls to Triton.

Steps, each into its own folder under OUT: data (planted-signal synth) -> features (frozen MiniLM +
EfficientNet-Lite0 cache) -> run (the `em3` preset) -> export (ONNX graphs + item table) -> repo
(Triton repository: the native onnxruntime backend's where `make setup` built it, so `rank` has no
Python step; else the python backend's) -> a real tritonserver on loopback, ranking test requests
through the gRPC client -> OUT/report.md and OUT/report.json.

A finished step is reused when the demo runs again (data and export folders are written atomically,
the run resumes or is kept), so a second `make demo` only serves and ranks; `--fresh` starts over.
The served scores are checked against the trained PyTorch model on the same inputs: the demo fails if
they differ by more than `PARITY_ATOL`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common.errors import MMRankError
from trainer.data.requests import Requests, request_groups

PARITY_ATOL = 1e-4  # fp32 graphs vs the PyTorch model (the export parity bound)


@dataclass
class DemoConfig:
    """The demo's dataset and serving sample; defaults keep the whole demo to a few minutes on 2 cores."""

    users: int = 500  # synthetic users
    items: int = 600  # synthetic items (a quarter arrive during valid/test: cold start)
    events: int = 60_000  # impressions
    seed: int = 0  # data, training and request sample
    preset: str = "em3"  # what to train
    requests: int = 200  # test requests ranked through gRPC
    timeout_s: float = 30.0  # per gRPC call
    backend: str = "auto"  # `mmrank repo --backend`; auto: onnxruntime where the native backend is built

    def repo_backend(self) -> str:
        from export.native_backend import NativeBackend

        if self.backend != "auto":
            return self.backend
        return "onnxruntime" if NativeBackend.built() else "python"


def _log(step: str, message: str) -> None:
    print(f"demo [{step}] {message}", flush=True)


class _Steps:
    """Runs the steps in order, timing each; a step that finds its output finished calls `reuse`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.reused: list[str] = []
        self._current = ""

    def run(self, name: str, fn, *args, **kwargs):
        self._current = name
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        self.seconds[name] = time.perf_counter() - t0
        _log(name, f"{'reused' if name in self.reused else 'done'} in {self.seconds[name]:.1f} s")
        return result

    def reuse(self, what: Path) -> None:
        self.reused.append(self._current)
        _log(self._current, f"reusing {what} (finished earlier; --fresh starts over)")


def make_data(out: Path, cfg: DemoConfig, steps: _Steps) -> dict:
    from trainer.data.schema import MANIFEST, Manifest
    from trainer.data.synth import SynthConfig, generate

    if (out / MANIFEST).is_file():
        steps.reuse(out)
        return Manifest.read(out).counts
    return generate(
        out, SynthConfig(users=cfg.users, items=cfg.items, events=cfg.events, seed=cfg.seed)
    ).counts


def make_features(data: Path) -> dict:
    from trainer.features.cache import build_features

    report = build_features(data)
    return {name: {"computed": r.computed, "reused": r.reused} for name, r in report.modalities.items()}


def train_model(data: Path, run: Path, cfg: DemoConfig, steps: _Steps) -> dict:
    from trainer.config import resolve
    from trainer.run import CONFIG, METRICS
    from trainer.train import train

    if (run / METRICS).is_file():
        steps.reuse(run)
        return json.loads((run / METRICS).read_text())
    return train(data, resolve(cfg.preset, seed=cfg.seed), run, resume=(run / CONFIG).is_file())


def export_model(run: Path, data: Path, out: Path, steps: _Steps) -> dict:
    from export.manifest import MANIFEST as EXPORT_MANIFEST
    from export.manifest import Manifest, sha256_file
    from export.onnx_graphs import ExportConfig, export_run
    from trainer import checkpoint

    if (out / EXPORT_MANIFEST).is_file():
        manifest = Manifest.read(out)
        if manifest.checkpoint.get("sha256") == sha256_file(run / checkpoint.BEST):
            steps.reuse(out)
            return _graph_sizes(out, manifest)
    # fp32 only: the demo serves fp32, and tracing the fp16 image encoder takes minutes on a CPU.
    return _graph_sizes(out, export_run(run, out, str(data), force=True, config=ExportConfig(fp16=False)))


def _graph_sizes(out: Path, manifest) -> dict:
    return {name: (out / g.file).stat().st_size for name, g in manifest.graphs.items()}


def model_scores(run: Path, data: Path, req: Requests) -> list[np.ndarray]:
    """The trained PyTorch model's own scores for each request (the reference for the served ones)."""
    from export.parity import training_scores
    from trainer.data.samples import user_feature_table
    from trainer.data.schema import load_dataset
    from trainer.run import load_run

    ds = load_dataset(data, validate=False)
    _, model = load_run(run, ds)
    feats = user_feature_table(ds)
    out = []
    for user, hist, cands in zip(req.users, req.histories, req.candidates, strict=True):
        h = np.zeros((1, max(len(hist), 1)), np.int64)
        if len(hist):
            h[0, -len(hist) :] = hist
        out.append(training_scores(model, h, cands[None], np.array([user]), feats[[user]])[0])
    return out


def serve_and_rank(repo: Path, req: Requests, timeout_s: float) -> tuple[list[np.ndarray], np.ndarray, dict]:
    from clients.ranking_client import ClientConfig, RankingClient
    from export.triton_launcher import TritonConfig, TritonServer

    t0 = time.perf_counter()
    with TritonServer(TritonConfig(repo)) as server:
        start_s = time.perf_counter() - t0
        _log("serve", f"tritonserver ready in {start_s:.1f} s: grpc {server.grpc_url}")
        with RankingClient(ClientConfig(url=server.grpc_url, timeout_s=timeout_s)) as client:
            client.rank(req.histories[0], req.candidates[0], req.users[0])  # warm-up: first-call setup
            scores, latency = [], []
            for user, hist, cands in zip(req.users, req.histories, req.candidates, strict=True):
                t = time.perf_counter()
                scores.append(client.rank(hist, cands, user).scores)
                latency.append(time.perf_counter() - t)
    return scores, np.array(latency) * 1e3, {"server_start_s": start_s, "url": server.grpc_url}


def summarise(
    req: Requests, served: list[np.ndarray], reference: list[np.ndarray], lat_ms: np.ndarray
) -> dict:
    from trainer.metrics import auc, gauc

    labels = np.concatenate(req.labels)
    scores = np.concatenate(served)
    groups = np.repeat(np.arange(len(served)), [len(s) for s in served])
    diff = float(np.abs(scores - np.concatenate(reference)).max())
    return {
        "requests": len(served),
        "candidates": int(scores.size),
        "served_auc": auc(labels, scores),
        "served_gauc_request": gauc(labels, scores, groups),
        "max_abs_diff_vs_pytorch": diff,
        "latency_ms": {
            "p50": float(np.percentile(lat_ms, 50)),
            "p95": float(np.percentile(lat_ms, 95)),
            "p99": float(np.percentile(lat_ms, 99)),
            "mean": float(lat_ms.mean()),
        },
    }


def report_markdown(report: dict) -> str:
    m, s, d = report["metrics"]["test"], report["serving"], report["data"]
    lat = s["latency_ms"]
    lines = [
        "# mmrank demo",
        "",
        f"Data: synthetic, {d['users']} users, {d['items']} items, {d['events']} events "
        f"(train {d['train']}, valid {d['valid']}, test {d['test']}).",
        f"Model: preset `{report['config']['preset']}`, test AUC {m['auc']:.4f}, GAUC {m['gauc']:.4f}, "
        f"cold-start AUC {m['cold_auc']:.4f} (trainer's evaluation).",
        "",
        f"Served through Triton ({report['serving']['backend']} backend, {report['machine']}): "
        f"{s['requests']} test requests, {s['candidates']} candidates over gRPC.",
        "",
        "| served AUC | served request GAUC | max abs diff vs PyTorch | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|---|",
        f"| {s['served_auc']:.4f} | {s['served_gauc_request']:.4f} | {s['max_abs_diff_vs_pytorch']:.2e} "
        f"| {lat['p50']:.2f} | {lat['p95']:.2f} | {lat['p99']:.2f} |",
        "",
        "Step times (s): "
        + ", ".join(
            f"{k} {v:.1f}{' (reused)' if k in report['reused'] else ''}" for k, v in report["seconds"].items()
        ),
        "",
    ]
    return "\n".join(lines)


def run_demo(out: str | Path, cfg: DemoConfig | None = None, fresh: bool = False) -> dict:
    from common.atomic import write_json_atomic
    from common.provenance import machine
    from export.manifest import Manifest
    from export.repository import RenderConfig, render_repository

    cfg = cfg or DemoConfig()
    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    data, run, export, repo = out / "data", out / "run", out / "export", out / "repo"
    steps = _Steps()
    counts = steps.run("data", make_data, data, cfg, steps)
    features = steps.run("features", make_features, data)
    metrics = steps.run("train", train_model, data, run, cfg, steps)
    sizes = steps.run("export", export_model, run, data, export, steps)
    backend = cfg.repo_backend()
    steps.run("repo", render_repository, export, repo, RenderConfig(backend=backend), True)
    info = Manifest.read(export).model
    req = request_groups(data, max(info.history_len, info.long_history_len), cfg.requests, cfg.seed)
    served, lat_ms, server = steps.run("serve", serve_and_rank, repo, req, cfg.timeout_s)
    reference = model_scores(run, data, req)
    serving = {**summarise(req, served, reference, lat_ms), **server, "backend": backend}
    report = {
        "config": asdict(cfg),
        "machine": machine(),
        "data": counts,
        "features": features,
        "metrics": {k: metrics[k] for k in ("valid", "test", "train")},
        "graph_bytes": sizes,
        "serving": serving,
        "seconds": steps.seconds,
        "reused": steps.reused,
    }
    write_json_atomic(out / "report.json", report)
    (out / "report.md").write_text(report_markdown(report))
    if serving["max_abs_diff_vs_pytorch"] > PARITY_ATOL:
        raise MMRankError(
            f"served scores differ from the PyTorch model by {serving['max_abs_diff_vs_pytorch']:.2e} "
            f"(> {PARITY_ATOL}); see {out / 'report.md'}"
        )
    return report


def cli(args) -> int:
    cfg = DemoConfig(
        users=args.users,
        items=args.items,
        events=args.events,
        seed=args.seed,
        requests=args.requests,
        backend=args.backend,
    )
    report = run_demo(args.out, cfg, fresh=args.fresh)
    print(report_markdown(report))
    print(
        f"demo: report in {Path(args.out) / 'report.md'}; serve it yourself with "
        f"`mmrank serve --repo {Path(args.out) / 'repo'}`"
    )
    return 0
