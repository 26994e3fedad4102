"""The `mmrank` console script: one entry point for data, training, export, serving and load tests.

What each command writes is described in docs/design.md. Handlers are imported lazily so `--help`
stays fast and a subcommand whose dependencies are heavy (torch, tritonclient) costs nothing to the
others.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Callable

from common.errors import MMRankError

Handler = str  # "package.module:function", resolved at call time
# Options taking comma-separated item ids. argparse takes a value starting with "-" for an option unless it
# is one plain negative number, so `--candidates -1,2` would be an error: such a value is attached to its
# option (`--candidates=-1,2`) before parsing. The server flags unknown ids, negative ones among them.
ID_LISTS = ("--history", "--candidates")
NEGATIVE_IDS = re.compile(r"-\d[\d,\s-]*")


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.ArgumentDefaultsHelpFormatter(prog, max_help_position=36)


def _add(sub, name: str, help_: str, handler: Handler, build: Callable[[argparse.ArgumentParser], None]):
    p = sub.add_parser(name, help=help_, description=help_, formatter_class=_formatter)
    build(p)
    p.set_defaults(_handler=handler)
    return p


def _data_synth(p):
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument("--users", type=int, default=2000, help="number of users")
    p.add_argument("--items", type=int, default=3000, help="number of items (arriving over time)")
    p.add_argument("--events", type=int, default=200_000, help="number of impressions (clicks + non-clicks)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes")
    p.add_argument("--image-size", type=int, default=32, help="side of the rendered RGB item images")
    p.add_argument(
        "--chunk-events",
        type=int,
        default=1_000_000,
        help="events per chunk and Parquet part (bounds memory; whole 8192-event RNG blocks, the data "
        "does not depend on it)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output folder")


def _data_ml100k(p):
    p.add_argument("--src", default="../shared/data/ml100k_tmdb_posters", help="MovieLens-100K + TMDB folder")
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument(
        "--neutral",
        choices=["drop", "negative"],
        default="drop",
        help="what rating 3 becomes (>=4 is a click, <=2 a non-click)",
    )
    p.add_argument("--valid-frac", type=float, default=0.1, help="share of events (by time) in valid")
    p.add_argument("--test-frac", type=float, default=0.1, help="share of events (by time) in test")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")


def _data_mmrec(p):
    p.add_argument("--src", required=True, help="folder holding NAME.inter and optional *_feat.npy")
    p.add_argument("--name", required=True, help="dataset name (the NAME of NAME.inter)")
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument(
        "--neg-ratio", type=int, default=4, help="sampled negatives per positive in training samples"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the negative sampler")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")


def _features(p):
    p.add_argument("--data", required=True, help="dataset folder (canonical form)")
    p.add_argument("--batch-size", type=int, default=64, help="items per encoder batch")
    p.add_argument(
        "--runtime",
        choices=["auto", "onnxruntime", "torch"],
        default="auto",
        help="encoder runtime; auto = the one benchmarks/encoder_runtime.py measured faster "
        "(onnxruntime; graphs exported once to $MMRANK_CACHE/onnx, default ~/.cache/mmrank)",
    )
    p.add_argument("--max-text-tokens", type=int, default=128, help="tokens kept per text field")


def _train(p):
    p.add_argument("--data", required=True, help="dataset folder")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset", help="preset name (see trainer/presets)")
    g.add_argument("--config", help="JSON config file")
    p.add_argument("--out", required=True, help="run folder (config.json, metrics.json, checkpoints)")
    p.add_argument("--seed", type=int, default=None, help="override the config's seed")
    p.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field (dotted path), repeatable",
    )


def _ablation(p):
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument(
        "--presets", required=True, help="comma-separated preset names; the first is the AUC-gain base"
    )
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one run per preset and seed")
    p.add_argument("--out", required=True, help="folder for runs/PRESET/seedS, ablation.md and ablation.json")
    p.add_argument("--epochs", type=int, default=None, help="override every preset's epochs")
    p.add_argument(
        "--max-steps", type=int, default=None, help="stop each run after this many optimizer steps"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field (dotted path) in every run, repeatable",
    )


def _evaluate(p):
    p.add_argument("--run", required=True, help="run folder written by `mmrank train`")
    p.add_argument("--data", required=True, help="dataset folder")


def _export(p):
    p.add_argument("--run", required=True, help="run folder written by `mmrank train`")
    p.add_argument("--out", required=True, help="export folder (ONNX graphs, item table, manifest)")
    p.add_argument(
        "--data",
        default=None,
        help="the run's dataset folder (None: the one it trained on, which RUN/run.json records)",
    )
    p.add_argument("--no-fp16", action="store_true", help="skip the *.fp16.onnx variants")
    p.add_argument(
        "--no-torch-program",
        action="store_true",
        help="skip ranking.pt2 / ranking.fp16.pt2 (the torch serving backend's programs)",
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")


def _repo(p):
    p.add_argument("--export", required=True, help="folder written by `mmrank export`")
    p.add_argument("--out", required=True, help="Triton model repository to render")
    p.add_argument(
        "--backend",
        choices=["python", "torch", "onnxruntime", "tensorrt"],
        default="python",
        help="how Triton runs the graphs (torch: the ranking step runs the exported torch program on the "
        "GPU, the stub's Python needs torch)",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "fp16"],
        default="fp32",
        help="ONNX variant of the graphs (python / onnxruntime backends) and torch program variant (torch); "
        "tensorrt engines choose fp16 kernels when built",
    )
    p.add_argument(
        "--engines",
        default=None,
        help="tensorrt backend: folder of `python -m export.tensorrt` (default: EXPORT/tensorrt)",
    )
    p.add_argument(
        "--device",
        choices=["auto", "cuda", "cpu"],
        default="auto",
        help="torch backend: where the ranking program runs (auto: the instance's GPU if torch sees one)",
    )
    p.add_argument(
        "--buckets",
        default="1x128,1x512,1x2048,4x512,8x512",
        help="torch backend: BATCHxCANDIDATES shapes requests are padded to (one CUDA graph each on a GPU)",
    )
    p.add_argument("--no-cuda-graphs", action="store_true", help="torch backend: run every bucket eagerly")
    p.add_argument(
        "--lookup",
        choices=["merged", "separate"],
        default="merged",
        help="onnxruntime backend: the item lookup graph merged into the ranking graph (one model, ids in, "
        "scores out) or its own model before it (tensorrt: always before the engine)",
    )
    p.add_argument(
        "--id-map",
        choices=["auto", "dense", "search"],
        default="auto",
        help="native backends: the lookup graph's id -> row map (dense: 4 bytes per id up to the largest; "
        "search: a binary search, for sparse ids; auto: dense while the ids span at most 16x the rows)",
    )
    p.add_argument(
        "--instance-kind",
        choices=["auto", "cpu", "gpu"],
        default="auto",
        help="where the graph models run: auto = a GPU where the server has one (NVIDIA's containers), else "
        "the CPU; cpu for an onnxruntime backend without CUDA (this project's build) on a GPU host",
    )
    p.add_argument(
        "--rank-threads",
        type=int,
        default=1,
        help="onnxruntime intra-op threads of the ranking step (python and onnxruntime backends): 1 serves "
        "the most requests per core; on the onnxruntime backend more threads cut one request's latency on an "
        "idle server at about twice the CPU per call (docs/serving.md)",
    )
    p.add_argument(
        "--lookup-instances",
        type=int,
        default=1,
        help="instances of the model holding the table (item_lookup; on the onnxruntime backend `rank` "
        "itself, the whole ranking): more let concurrent requests run side by side on more cores, at one "
        "table's memory each (docs/serving.md)",
    )
    p.add_argument(
        "--graph-instances",
        type=int,
        default=1,
        help="instances per device of each graph model (encoders, fusion)",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=64,
        help="max_batch_size of every model (the native rank, which cannot batch: the users its graph ranks "
        "per request, the rest answered -inf)",
    )
    p.add_argument("--max-candidates", type=int, default=2000, help="candidate ids per user in one request")
    p.add_argument(
        "--max-history",
        type=int,
        default=1000,
        help="history ids per user in one request (the model reads the most recent L)",
    )
    p.add_argument("--max-request-bytes", type=int, default=4 << 20, help="input bytes of one rank request")
    p.add_argument("--max-encode-items", type=int, default=256, help="items of one encode_items request")
    p.add_argument(
        "--max-text-bytes", type=int, default=64 << 10, help="UTF-8 bytes of one text field to encode"
    )
    p.add_argument("--max-image-bytes", type=int, default=8 << 20, help="bytes of one encoded image file")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")


def _table_publish(p):
    p.add_argument("--repo", required=True, help="Triton model repository (any backend) to publish into")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--export", help="an `mmrank export` of the served model: its item table")
    g.add_argument(
        "--items",
        help=".npz with ids [M] and content [M, d] (e.g. encode_items vectors) added to the served table; "
        "for a two-tower model with an item graph (freedom, em3_mmrec) the items' features by modality "
        "instead (e.g. text_feat [M, 384], image_feat [M, 4096]), placed through its kNN graph",
    )
    p.add_argument(
        "--url",
        help="Triton gRPC address (host:port or grpc://host:port): ask it to load the new version and "
        "wait until rank answers with it",
    )
    p.add_argument("--wait", type=float, default=120.0, help="--url: seconds to wait for the new version")


def _analyze(p):
    p.add_argument(
        "--runs",
        required=True,
        help="comma-separated run folders; the first is the ID-only baseline (e.g. id_only,em3)",
    )
    p.add_argument("--data", required=True, help="the dataset the runs were trained on")
    p.add_argument("--out", required=True, help="folder for analysis.md and analysis.json")
    p.add_argument("--sample", type=int, default=2000, help="cold-start and popular items sampled")
    p.add_argument("--k", type=int, default=3, help="neighbours per item")
    p.add_argument("--seed", type=int, default=0, help="seed of the item samples")


def _serve(p):
    p.add_argument("--repo", required=True, help="Triton model repository")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (127.0.0.1)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (127.0.0.1)")
    p.add_argument("--metrics-port", type=int, default=8002, help="metrics port (127.0.0.1)")
    p.add_argument(
        "--control-mode",
        choices=["explicit", "poll", "none"],
        default="explicit",
        help="model control. explicit: load_model(name) loads a new item-table version, and a model whose "
        "backend process dies is reloaded in place; poll: the server loads new versions itself but cannot "
        "reload a model in place, so a dead backend process stops it (exit 1, for a process manager to "
        "restart); none: as poll, without loading new versions",
    )
    p.add_argument(
        "--log", help="server log file; without one the log goes to a temporary folder removed on exit"
    )
    p.add_argument(
        "--python-env",
        help="venv whose Python runs the models, nothing added (numpy<2, onnxruntime, tokenizers, Pillow: "
        "the repository's README); default: this project's environment",
    )
    p.add_argument(
        "--cpus",
        help="CPUs the server and its backend processes run on, e.g. 0 or 0-3 (as taskset -c); default: "
        "all. One CPU keeps a request's hand-offs between server threads on one CPU: lower latency on a "
        "VM, one CPU's throughput (docs/serving.md)",
    )
    p.add_argument(
        "--cpu-latency-us",
        type=int,
        default=None,
        help="hold the machine's CPU wake-up latency limit at this many microseconds while the server runs "
        "(PM QoS, /dev/cpu_dma_latency; root only). 0 keeps idle CPUs polling instead of halting: lower "
        "latency per request, above all on a VM, for the power of CPUs that never rest (docs/serving.md); "
        "default: the machine's own idle states",
    )


def _rank(p):
    p.add_argument(
        "--url",
        default="127.0.0.1:8001",
        help="Triton address: host:port or grpc://host:port for gRPC, http://host:port for HTTP (the server's "
        "--http-port)",
    )
    p.add_argument("--history", required=True, help="comma-separated item ids, oldest first")
    p.add_argument("--candidates", required=True, help="comma-separated candidate item ids")
    p.add_argument("--user", type=int, help="user id (default: none, the unknown-user fallback)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per call")


def _loadtest(p):
    p.add_argument(
        "--url",
        default="127.0.0.1:8001",
        help="Triton address (loopback only), host:port for gRPC or http://host:port for HTTP: e.g. `mmrank "
        "serve --repo build/demo/repo`, the demo's repository (native onnxruntime where `make setup` built "
        "that backend)",
    )
    p.add_argument("--out", required=True, help="folder for locust's CSV and HTML, summary.json and the plot")
    p.add_argument(
        "--data",
        default="build/demo/data",
        help="dataset folder (canonical form) the served model was trained on; the default is `make demo`'s",
    )
    p.add_argument(
        "--users", default="1,2,4,8", help="comma-separated concurrent simulated users, one ramp step each"
    )
    p.add_argument("--duration", type=float, default=20.0, help="seconds per step (concurrency level)")
    p.add_argument("--candidates", type=int, default=100, help="N, candidates per request")
    p.add_argument("--history", type=int, default=50, help="L, history items per request")
    p.add_argument("--requests", type=int, default=1000, help="distinct test requests drawn from --data")
    p.add_argument("--seed", type=int, default=0, help="seed of the request sample")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per call; a slower call fails")


def _demo(p):
    p.add_argument("--out", default="build/demo", help="folder for every artefact of the demo")
    p.add_argument("--users", type=int, default=500, help="synthetic users")
    p.add_argument("--items", type=int, default=600, help="synthetic items")
    p.add_argument("--events", type=int, default=60_000, help="synthetic impressions")
    p.add_argument("--seed", type=int, default=0, help="seed of data, training and request sample")
    p.add_argument("--requests", type=int, default=200, help="test requests ranked through gRPC")
    p.add_argument(
        "--backend",
        choices=["auto", "python", "onnxruntime"],
        default="auto",
        help="the repository's backend; auto: onnxruntime (native, no Python step in rank) where `make setup` "
        "built Triton's onnxruntime backend, else python",
    )
    p.add_argument("--fresh", action="store_true", help="delete OUT first instead of reusing finished steps")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmrank", description="End-to-end multimodal ranking (EM3 + LEMUR).", formatter_class=_formatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data = sub.add_parser("data", help="build a dataset in the canonical form", formatter_class=_formatter)
    dsub = data.add_subparsers(dest="source", required=True, metavar="SOURCE")
    _add(
        dsub,
        "synth",
        "planted-signal synthetic dataset (the embedded default)",
        "trainer.data.synth:cli",
        _data_synth,
    )
    _add(dsub, "ml100k", "MovieLens-100K + TMDB overviews + posters", "trainer.data.ml100k:cli", _data_ml100k)
    _add(
        dsub, "mmrec", "MMRec-format folder (NAME.inter + *_feat.npy)", "trainer.data.mmrec:cli", _data_mmrec
    )
    _add(
        sub,
        "features",
        "frozen-encoder feature cache (text + image)",
        "trainer.features.cache:cli",
        _features,
    )
    _add(sub, "train", "train a model (preset or config)", "trainer.train:cli", _train)
    _add(sub, "evaluate", "evaluate a run on a dataset", "trainer.train:cli_evaluate", _evaluate)
    _add(sub, "ablation", "train presets x seeds and tabulate mean +- std", "trainer.ablation:cli", _ablation)
    _add(
        sub,
        "analyze",
        "EM3 §4.5 embedding analyses (cold-start ID neighbours, content neighbours)",
        "trainer.analysis:cli",
        _analyze,
    )
    _add(sub, "export", "export ONNX graphs and the item table", "export.onnx_graphs:cli", _export)
    _add(sub, "repo", "render a Triton model repository", "export.repository:cli", _repo)
    table = sub.add_parser(
        "table", help="item table versions of a live repository", formatter_class=_formatter
    )
    tsub = table.add_subparsers(dest="source", required=True, metavar="ACTION")
    _add(
        tsub,
        "publish",
        "publish the next item table version (validated, atomic) into a repository",
        "export.table_publish:cli",
        _table_publish,
    )
    _add(sub, "serve", "start tritonserver on a model repository", "export.triton_launcher:cli", _serve)
    _add(sub, "rank", "rank candidates through the gRPC endpoint", "clients.cli:cli", _rank)
    _add(sub, "loadtest", "locust load test of rank over gRPC or HTTP", "clients.loadtest:cli", _loadtest)
    _add(sub, "demo", "the whole pipeline on the synthetic dataset", "mmrank.demo:cli", _demo)
    return parser


def _resolve(handler: Handler) -> Callable[[argparse.Namespace], int | None]:
    module, _, func = handler.partition(":")
    return getattr(importlib.import_module(module), func)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line, with id lists that start with a negative id attached to their option."""
    joined: list[str] = []
    for arg in argv:
        if joined and joined[-1] in ID_LISTS and NEGATIVE_IDS.fullmatch(arg):
            joined[-1] = f"{joined[-1]}={arg}"
        else:
            joined.append(arg)
    return build_parser().parse_args(joined)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    name = " ".join(x for x in (args.command, getattr(args, "source", None)) if x)
    try:
        return int(_resolve(args._handler)(args) or 0)
    except (MMRankError, OSError) as e:  # OSError: a path the command could not read or write
        print(f"mmrank {name}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mmrank {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
