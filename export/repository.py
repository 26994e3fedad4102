"""`mmrank repo --export DIR --out DIR --backend python|torch|onnxruntime|tensorrt`: a Triton model repository.

Every config is a `tritonclient.grpc.model_config_pb2.ModelConfig` built from the export manifest
(tensor names, dtypes and dims are the graphs' own, read from the ONNX files) and written with
`text_format`; `check_ensembles` verifies each ensemble's maps before anything is written. Models:

    rank            history_ids [-1], candidate_ids [-1] INT64 (+ optional user_id [1], user_feats [U])
                    -> scores [-1] FP32 (logits), candidate_known [-1] BOOL, user_known [1] BOOL,
                    item_table_version [1] INT64 (the table that answered). An ensemble over
                    item_lookup, except on the onnxruntime backend with the lookup merged (the
                    default): there `rank` is itself the native model that item_lookup would be, ids in,
                    scores out, versioned like it (one hop less between threads of the server)
      item_lookup   the item table, versioned (a version folder per table, latest version served):
                    ids -> rows, the fallbacks of model_repository/item_table.py for unknown ids and
                    users. python / torch: a Python model that checks the request's limits and runs the
                    ranking graph (or program) too, `rank`'s one step. onnxruntime `--lookup separate`:
                    the lookup graph (export/lookup_graph.py) as its own model before `ranking`.
                    tensorrt: the lookup graph before the ranking engine
      ranking       the ranking graph (the second step of `rank` where the lookup is separate)
    encode_items    ensemble: text [K] BYTES (one string per text field, "" = missing) (+ image [1]
                    BYTES, encoded image file, b"" = none) -> content [d] FP32
      tokenizer     Python: checks the request's limits, texts -> input_ids, attention_mask, text_mask
      text_encoder, image_preprocess (Python: checks the request's limits, bytes -> pixels,
                    image_mask), image_encoder, fusion

Backends: `python` runs every graph with onnxruntime inside Triton's Python backend
(model_repository/models/graph_model.py; CUDA EP on GPU instances); `torch` is `python` except that
the lookup step ranks with the exported torch program (export/torch_program.py) on the instance's GPU,
item table resident there, CUDA graphs per (batch, candidates) bucket (model_repository/torch_ranker.py;
the CPU where there is no GPU), so the stub's Python needs torch too; `onnxruntime` and `tensorrt` use
Triton's native `onnxruntime_onnx` / `tensorrt_plan` platforms for the graphs (TensorRT engines come
from export/tensorrt.py) and the native lookup graph: `rank` has no Python step; the tokenizer and
image preprocessing stay Python. Graph models run on the instance kind `--instance-kind` names.
Every model batches (the first dimension of every tensor is the batch) except the native table model
(the onnxruntime backend refuses optional inputs on a batching model): item_lookup takes whole tensors
from the batching `rank` ensemble; a native `rank` declares the batch axis in its dims and its graph
holds the batch bound itself (rows past max_batch_size are answered -inf and unknown). Graph models
have dynamic batching.
Every Python-backend version folder gets its `model.py` and a copy of the serving runtime package
(model_repository/, numpy + onnxruntime + tokenizers + Pillow, no project; torch only in torch_ranker.py,
the `torch` backend's ranking step), so the rendered folder alone deploys; its README.md says what a
stock server's Python needs.

The repository is rendered into a temporary sibling and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from common.atomic import atomic_dir
from common.errors import MMRankError
from export import lookup_graph as lg
from export.lookup_graph import ID_MAPS
from export.manifest import GRAPH_NAMES, GraphSpec, Manifest, TensorSpec, check_sha256, variant
from export.tensorrt import check_engine_file, check_engines_hold
from model_repository import item_table as it
from model_repository.item_placement import PLACEMENT
from model_repository.limits import EncodeLimits, RequestLimits

BACKENDS = ("python", "torch", "onnxruntime", "tensorrt")
PYTHON_GRAPHS = ("python", "torch")  # backends that run the ONNX graphs in the Python backend
LOOKUPS = ("merged", "separate")  # native backends: the lookup graph in the ranking graph, or before it
# Instance kinds of the graph models: auto = a GPU where the server has one (NVIDIA's containers, whose
# onnxruntime backend has CUDA), else the CPU; cpu for an onnxruntime backend without CUDA on a GPU host.
INSTANCE_KINDS = {"auto": "KIND_AUTO", "cpu": "KIND_CPU", "gpu": "KIND_GPU"}
PRECISIONS = ("fp32", "fp16")
RUNTIME = Path(__file__).resolve().parents[1] / "model_repository"  # the serving runtime package
# The one module of the leaf package the runtime imports, copied beside it.
LEAF, LEAF_MODULES = RUNTIME.parent / "common", ("__init__.py", "errors.py")
PYTHON_CODE = RUNTIME / "models"
RUNTIME_IGNORE = shutil.ignore_patterns("models", "__pycache__", "*.pyc", ".ruff_cache", "README.md")
REPOSITORY_README = RUNTIME / "README.md"
RANKING_FILE = lg.RANKING_FILE  # the ranking graph inside each table version (python, native)
RANKING_PROGRAM = "ranking.pt2"  # torch backend: the ranking program inside each item_lookup version
ABANDONED_AFTER_S = 3600  # a hidden table version older than this is a killed publisher's
ENGINES_DIR = "tensorrt"  # <export>/tensorrt/<graph>.plan, written by export/tensorrt.py
ENCODER_MODALITIES = {"text": "text_encoder", "image": "image_encoder"}
RANK, LOOKUP = "rank", "item_lookup"  # the served model; the table model where `rank` is an ensemble


@dataclass
class RenderConfig:
    backend: str = "python"
    precision: str = "fp32"  # which ONNX variant the python / onnxruntime graph models load
    max_batch_size: int = 64  # per model and per ensemble
    queue_delay_us: int = 500  # dynamic batching: how long a request may wait for others
    graph_instances: int = 1  # instances per device of each graph model
    lookup_instances: int = 1  # instances of the table model (each holds the table)
    # onnxruntime intra-op threads of the ranking graph inside the table model (python and onnxruntime
    # backends): one serves the most requests per core; on the onnxruntime backend more threads spin
    # between operators, which cuts one request's latency on an idle server at about twice the CPU per
    # call (benchmarks/results/serving_overhead_native_explore.md)
    rank_graph_threads: int = 1
    # native backends: the lookup merged into the ranking graph (onnxruntime: one model, ids in, scores
    # out) or its own model in front of it (tensorrt always: an engine cannot hold the lookup), and the
    # id -> row map of the lookup graph (export/lookup_graph.py: auto picks by the table's id span)
    lookup: str = "merged"
    id_map: str = "auto"
    instance_kind: str = "auto"  # of the graph models (INSTANCE_KINDS); TensorRT engines run on GPUs
    engines_dir: Path | None = None  # TensorRT plans; None = <export>/tensorrt
    limits: RequestLimits = field(default_factory=RequestLimits)  # bounds of one `rank` request
    encode_limits: EncodeLimits = field(default_factory=EncodeLimits)  # of one `encode_items` request
    # torch backend: where the program runs ("auto": the instance's GPU where torch sees one, else the
    # CPU), the (batch x candidates) buckets requests are padded to, and whether each bucket is a CUDA
    # graph. One user's request (the client's) fits 1xN up to the default 2,000-candidate limit; the
    # 4x and 8x buckets hold requests the lookup batches together under concurrency.
    device: str = "auto"
    buckets: str = "1x128,1x512,1x2048,4x512,8x512"
    cuda_graphs: bool = True

    def __post_init__(self):
        # Triton would take a max_batch_size of 0 as "no batching" and refuse the batched tensors at load.
        for name in ("max_batch_size", "graph_instances", "lookup_instances", "rank_graph_threads"):
            if getattr(self, name) < 1:
                raise MMRankError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.queue_delay_us < 0:
            raise MMRankError(f"queue_delay_us must be >= 0, got {self.queue_delay_us}")
        for name, allowed in (("lookup", LOOKUPS), ("id_map", ID_MAPS), ("instance_kind", INSTANCE_KINDS)):
            if getattr(self, name) not in allowed:
                raise MMRankError(f"{name} {getattr(self, name)!r}: expected one of {', '.join(allowed)}")

    @property
    def merged(self) -> bool:
        """Whether the native lookup is merged into the ranking graph (never before an engine)."""
        return self.backend == "onnxruntime" and self.lookup == "merged"

    @property
    def table_model(self) -> str:
        """The versioned model holding the item table: `rank` itself where the lookup is merged into
        the ranking graph, else item_lookup, the step of the `rank` ensemble."""
        return RANK if self.merged else LOOKUP


# ---- tensors ---------------------------------------------------------------------------------------
def _dims(spec: TensorSpec) -> list[int]:
    """Triton dims of a graph tensor: its shape without the batch axis, named axes as -1."""
    return [d if isinstance(d, int) else -1 for d in spec.shape[1:]]


def _tensor(cls, name: str, dtype: str, dims: list[int], reshape: bool = True, optional: bool = False):
    t = cls(name=name, data_type=mc.DataType.Value(dtype), dims=dims or [1])
    if not dims and reshape:  # a [batch] tensor travels as [batch, 1]
        t.reshape.SetInParent()
    if optional:
        t.optional = True
    return t


def _inputs(specs: list[TensorSpec], reshape: bool = True) -> list[mc.ModelInput]:
    return [_tensor(mc.ModelInput, s.name, s.triton_dtype, _dims(s), reshape) for s in specs]


def _outputs(specs: list[TensorSpec], reshape: bool = True) -> list[mc.ModelOutput]:
    return [_tensor(mc.ModelOutput, s.name, s.triton_dtype, _dims(s), reshape) for s in specs]


def _params(config: mc.ModelConfig, **values: object) -> None:
    for key, value in values.items():
        text = value if isinstance(value, str) else json.dumps(value)
        config.parameters[key].string_value = text


# ---- model configs ---------------------------------------------------------------------------------
def _base(name: str, rc: RenderConfig, kind: str) -> mc.ModelConfig:
    config = mc.ModelConfig(name=name, max_batch_size=rc.max_batch_size)
    count = rc.graph_instances if kind != "KIND_CPU" else 1
    config.instance_group.add(kind=mc.ModelInstanceGroup.Kind.Value(kind), count=count)
    return config


def graph_config(name: str, spec: GraphSpec, rc: RenderConfig) -> mc.ModelConfig:
    kind = "KIND_GPU" if rc.backend == "tensorrt" else INSTANCE_KINDS[rc.instance_kind]
    config = _base(name, rc, kind)
    if rc.backend in PYTHON_GRAPHS:
        config.backend = "python"
        _params(config, onnx_file="model.onnx")
    else:
        config.platform = "onnxruntime_onnx" if rc.backend == "onnxruntime" else "tensorrt_plan"
    config.input.extend(_inputs(spec.inputs))
    config.output.extend(_outputs(spec.outputs))
    config.dynamic_batching.max_queue_delay_microseconds = rc.queue_delay_us
    return config


def python_config(name: str, rc: RenderConfig, inputs, outputs, **params) -> mc.ModelConfig:
    config = _base(name, rc, "KIND_CPU")
    config.backend = "python"
    config.input.extend(inputs)
    config.output.extend(outputs)
    _params(config, **params)
    return config


def request_inputs(manifest: Manifest) -> list[mc.ModelInput]:
    """The `rank` request: history_ids, candidate_ids (+ optional user_id, user_feats), batched."""
    cards = manifest.model.user_feature_cards
    inputs = [
        _tensor(mc.ModelInput, it.HISTORY_IDS, "TYPE_INT64", [-1]),
        _tensor(mc.ModelInput, it.CANDIDATE_IDS, "TYPE_INT64", [-1]),
        _tensor(mc.ModelInput, it.USER_ID, "TYPE_INT64", [1], optional=True),
    ]
    if cards:
        inputs.append(_tensor(mc.ModelInput, it.USER_FEATS, "TYPE_INT64", [len(cards)], optional=True))
    return inputs


def flag_outputs() -> list[mc.ModelOutput]:
    """What `rank` says besides the scores, batched: candidate_known [N], user_known and
    item_table_version (the table version that answered) per row."""
    return [
        _tensor(mc.ModelOutput, it.CANDIDATE_KNOWN, "TYPE_BOOL", [-1]),
        _tensor(mc.ModelOutput, it.USER_KNOWN, "TYPE_BOOL", [1], reshape=False),
        _tensor(mc.ModelOutput, it.TABLE_VERSION, "TYPE_INT64", [1], reshape=False),
    ]


def _whole(tensors: list) -> list:
    """Batched tensors as a model without batching declares them: the batch axis in the dims."""
    out = []
    for t in tensors:
        whole = type(t)()
        whole.CopyFrom(t)
        whole.dims[:] = [-1, *t.dims]
        whole.ClearField("reshape")
        out.append(whole)
    return out


def _lookup_params(manifest: Manifest, rc: RenderConfig) -> dict:
    ranking = manifest.graph("ranking")
    widths = {t.name: t.shape[-1] for t in ranking.inputs if t.name in (it.CANDIDATE_C, it.CANDIDATE_ITEM)}
    return {
        "lookup": asdict(manifest.model.lookup()),
        "limits": asdict(rc.limits),
        "table_widths": {"d": widths.get(it.CANDIDATE_C, 0), "item_dim": widths.get(it.CANDIDATE_ITEM, 0)},
    }


def item_lookup_config(manifest: Manifest, rc: RenderConfig) -> mc.ModelConfig:
    """The versioned model that holds the item table: a Python model with the python and torch backends
    (it runs the ranking graph or program too), an ONNX graph with the native ones."""
    if rc.backend not in PYTHON_GRAPHS:
        return native_lookup_config(manifest, rc)
    ranking = manifest.graph("ranking")
    # The lookup runs the ranking graph itself (RANKING_FILE or RANKING_PROGRAM in each version folder):
    # one Python step instead of two, which is what benchmarks/results/serving_overhead.md measured the
    # time going to.
    outputs = [*_outputs(ranking.outputs), *flag_outputs()]
    params = _lookup_params(manifest, rc)
    if rc.backend == "python":
        params["graph"] = RANKING_FILE
        params["graph_threads"] = rc.rank_graph_threads
    else:
        program = manifest.programs.get("ranking")
        if program is None:
            raise MMRankError(
                "the export has no torch program of the ranking graph (export again with this version, "
                "without --no-torch-program)"
            )
        from model_repository.torch_ranker import Bucket

        Bucket.parse(rc.buckets)  # a bad bucket list fails here, not when the server loads the model
        if rc.device not in ("auto", "cuda", "cpu"):
            raise MMRankError(f"device {rc.device!r}: expected auto, cuda or cpu")
        params.update(
            program=RANKING_PROGRAM,
            program_inputs=program.inputs,
            device=rc.device,
            buckets=rc.buckets,
            cuda_graphs=rc.cuda_graphs,
        )
    config = python_config(LOOKUP, rc, request_inputs(manifest), outputs, **params)
    config.version_policy.latest.num_versions = 1  # a new table version replaces the old one
    config.instance_group[0].count = rc.lookup_instances
    if rc.backend == "torch":  # a GPU instance where the server has GPUs, else a CPU one
        config.instance_group[0].kind = mc.ModelInstanceGroup.Kind.Value("KIND_AUTO")
    # Requests queued while the instance is busy arrive in one execute() call (no added wait).
    config.dynamic_batching.max_queue_delay_microseconds = 0
    return config


def native_lookup_config(manifest: Manifest, rc: RenderConfig) -> mc.ModelConfig:
    """The table model as an `onnxruntime_onnx` model (export/lookup_graph.py): each version folder holds
    its graph (the table as initializers), the table and the ranking graph it was built with. Without
    batching (max_batch_size 0), because the onnxruntime backend refuses optional inputs on a batching
    model. Merged: `rank` itself, ids in, scores and flags out, its graph holding the batch bound;
    separate: item_lookup, whole tensors from the batching `rank` ensemble in, the ranking graph's inputs
    out (user_id and user_feats as checked_*), for the ranking step."""
    ranking = manifest.graph("ranking")
    if rc.merged:
        outputs = [*_outputs(ranking.outputs), *flag_outputs()]
    else:
        products = [t for t in ranking.inputs if t.name != it.CANDIDATE_KNOWN]
        outputs = _outputs(products, reshape=False) + flag_outputs()
        for t in outputs:
            t.name = lg.CHECKED.get(t.name, t.name)
    config = mc.ModelConfig(name=rc.table_model, platform="onnxruntime_onnx", max_batch_size=0)
    config.input.extend(_whole(request_inputs(manifest)))
    config.output.extend(_whole(outputs))
    config.instance_group.add(kind=mc.ModelInstanceGroup.Kind.Value(INSTANCE_KINDS[rc.instance_kind]))
    config.instance_group[0].count = rc.lookup_instances
    config.version_policy.latest.num_versions = 1  # a new table version replaces the old one
    _params(
        config,
        intra_op_thread_count=str(rc.rank_graph_threads),
        lookup_graph={"merged": rc.merged, "id_map": rc.id_map, "max_batch": rc.max_batch_size},
        **_lookup_params(manifest, rc),
    )
    return config


def tokenizer_config(manifest: Manifest, rc: RenderConfig) -> mc.ModelConfig:
    tok, text = manifest.tokenizer, manifest.graph("text_encoder")
    inputs = [_tensor(mc.ModelInput, "text", "TYPE_STRING", [len(tok.fields)])]
    outputs = _outputs(text.inputs, reshape=False) + _outputs(
        [manifest.graph("fusion").input("text_mask")], False
    )
    config = python_config(
        "tokenizer",
        rc,
        inputs,
        outputs,
        max_length=tok.max_length,
        join_fields=tok.join_fields,
        limits=asdict(rc.encode_limits),
    )
    config.dynamic_batching.max_queue_delay_microseconds = rc.queue_delay_us
    return config


def image_preprocess_config(manifest: Manifest, rc: RenderConfig) -> mc.ModelConfig:
    image = manifest.graph("image_encoder")
    inputs = [_tensor(mc.ModelInput, "image", "TYPE_STRING", [1])]
    outputs = _outputs(image.inputs, False) + _outputs([manifest.graph("fusion").input("image_mask")], False)
    return python_config("image_preprocess", rc, inputs, outputs, limits=asdict(rc.encode_limits))


def _step(
    config: mc.ModelConfig,
    model: mc.ModelConfig,
    reads: dict[str, str] | None = None,
    writes: dict[str, str] | None = None,
) -> None:
    """An ensemble step over `model`, every input and output mapped to the ensemble tensor of the same
    name unless `reads` (inputs) or `writes` (outputs) renames it."""
    reads, writes = reads or {}, writes or {}
    step = config.ensemble_scheduling.step.add(model_name=model.name, model_version=-1)
    for t in model.input:
        step.input_map[t.name] = reads.get(t.name, t.name)
    for t in model.output:
        step.output_map[t.name] = writes.get(t.name, t.name)


def _ensemble(name: str, rc: RenderConfig, inputs, outputs) -> mc.ModelConfig:
    config = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=rc.max_batch_size)
    config.input.extend(inputs)
    config.output.extend(outputs)
    return config


def rank_config(manifest: Manifest, lookup: mc.ModelConfig, ranking: mc.ModelConfig, rc: RenderConfig):
    outputs = [*_outputs(manifest.graph("ranking").outputs), *flag_outputs()]
    config = _ensemble("rank", rc, request_inputs(manifest), outputs)
    _step(config, lookup)
    if "scores" not in {t.name for t in lookup.output}:  # a separate lookup: a ranking step after it
        _step(config, ranking, reads=lg.CHECKED)  # the lookup's user tensors are checked_*
    return config


def encode_items_config(models: dict[str, mc.ModelConfig], rc: RenderConfig) -> mc.ModelConfig:
    names = [
        n for n in ("tokenizer", "text_encoder", "image_preprocess", "image_encoder", "fusion") if n in models
    ]
    inputs = [i for n in ("tokenizer", "image_preprocess") if n in models for i in models[n].input]
    config = _ensemble("encode_items", rc, inputs, list(models["fusion"].output))
    for name in names:
        _step(config, models[name])
    return config


def encodable(manifest: Manifest) -> bool:
    """encode_items exists when every fusion modality has an encoder graph (MMRec precomputed
    features, for one, have none) and the text encoder has its tokenizer."""
    if "fusion" not in manifest.graphs:
        return False
    if any(ENCODER_MODALITIES.get(m) not in manifest.graphs for m in manifest.model.modalities):
        return False
    return "text_encoder" not in manifest.graphs or manifest.tokenizer is not None


def build_configs(manifest: Manifest, rc: RenderConfig) -> dict[str, mc.ModelConfig]:
    """Every model of the repository, by name."""
    models = {
        name: graph_config(name, manifest.graphs[name], rc) for name in GRAPH_NAMES if name in manifest.graphs
    }
    if rc.merged:  # one native model, ids in, scores out: no ensemble hop in front of it
        models[RANK] = native_lookup_config(manifest, rc)
    else:
        models[LOOKUP] = item_lookup_config(manifest, rc)
        models[RANK] = rank_config(manifest, models[LOOKUP], models["ranking"], rc)
    if encodable(manifest):
        if "text_encoder" in models:
            models["tokenizer"] = tokenizer_config(manifest, rc)
        if "image_encoder" in models:
            models["image_preprocess"] = image_preprocess_config(manifest, rc)
        models["encode_items"] = encode_items_config(models, rc)
    else:
        for name in ("text_encoder", "image_encoder", "fusion"):
            models.pop(name, None)  # no way to feed them without the whole encode_items chain
    check_ensembles(models)
    return models


# ---- ensemble checks -------------------------------------------------------------------------------
def _compatible(a, b) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b, strict=True))


def check_ensembles(models: dict[str, mc.ModelConfig]) -> None:
    """Every ensemble step maps real tensors of its model, with matching dtypes and whole shapes (a model
    without batching declares the batch axis in its dims, as Triton lets it sit in a batching ensemble);
    every required input is fed, every ensemble output produced. Raises MMRankError naming the tensor."""
    for ens in (m for m in models.values() if m.platform == "ensemble"):
        batched = ens.max_batch_size > 0
        tensors = {t.name: (t, batched) for t in ens.input}
        for step in ens.ensemble_scheduling.step:
            where = f"ensemble {ens.name!r}, step {step.model_name!r}"
            model = models.get(step.model_name)
            if model is None:
                raise MMRankError(f"{where}: no such model in the repository")
            if 0 < model.max_batch_size < ens.max_batch_size:
                raise MMRankError(
                    f"{where}: max_batch_size {model.max_batch_size} < the ensemble's {ens.max_batch_size}"
                )
            own = model.max_batch_size > 0
            inputs, outputs = {t.name: t for t in model.input}, {t.name: t for t in model.output}
            for key, value in step.input_map.items():
                if key not in inputs:
                    raise MMRankError(f"{where}: input_map key {key!r} is not an input of the model")
                if value not in tensors:
                    raise MMRankError(
                        f"{where}: input {key!r} reads {value!r}, which no earlier step produces"
                    )
                _same(where, key, (inputs[key], own), tensors[value])
            for name, t in inputs.items():
                if name not in step.input_map and not t.optional:
                    raise MMRankError(f"{where}: required input {name!r} is not mapped")
            for key, value in step.output_map.items():
                if key not in outputs:
                    raise MMRankError(f"{where}: output_map key {key!r} is not an output of the model")
                if value in tensors:
                    raise MMRankError(
                        f"{where}: output {key!r} writes {value!r}, a tensor that already exists"
                    )
                tensors[value] = (outputs[key], own)
        for out in ens.output:
            if out.name not in tensors or out.name in {t.name for t in ens.input}:
                raise MMRankError(f"ensemble {ens.name!r}: output {out.name!r} is produced by no step")
            _same(f"ensemble {ens.name!r}", out.name, (out, batched), tensors[out.name])


def _same(where: str, name: str, want: tuple, have: tuple) -> None:
    """`want` and `have` are (tensor, batched): dtypes equal, whole shapes compatible."""
    (want, want_batched), (have, have_batched) = want, have
    if want.data_type != have.data_type:
        raise MMRankError(
            f"{where}: tensor {name!r} is {mc.DataType.Name(have.data_type)}, expected {mc.DataType.Name(want.data_type)}"
        )
    want_dims = [-1] * want_batched + list(want.dims)
    have_dims = [-1] * have_batched + list(have.dims)
    if not _compatible(want_dims, have_dims):
        raise MMRankError(f"{where}: tensor {name!r} has dims {have_dims}, expected {want_dims}")


# ---- files -----------------------------------------------------------------------------------------
PYTHON_MODELS = {
    LOOKUP: "item_lookup.py",
    "tokenizer": "tokenizer.py",
    "image_preprocess": "image_preprocess.py",
}


BYTECODE_DIR = "__pycache__"


def write_python_model(version: Path, code: str) -> None:
    """`code` (a file of model_repository/models) as version/model.py, the runtime package beside it.

    An empty *file* named __pycache__ sits in each folder Python imports from: a bytecode write there
    fails quietly (importlib ignores it), so serving never adds files to the repository, which poll
    mode would read as a changed model and reload. The server's PYTHONDONTWRITEBYTECODE alone is not
    enough: with Python 3.12 the backend stub of nvidia-pytriton 0.7.0 wrote __pycache__ folders
    although it was set (3.10 and 3.11 did not)."""
    shutil.copy2(PYTHON_CODE / code, version / "model.py")
    shutil.copytree(RUNTIME, version / RUNTIME.name, ignore=RUNTIME_IGNORE)
    (version / LEAF.name).mkdir()
    for module in LEAF_MODULES:
        shutil.copy2(LEAF / module, version / LEAF.name / module)
    for folder in (version, version / RUNTIME.name, version / LEAF.name):
        (folder / BYTECODE_DIR).write_bytes(b"")


def write_config(folder: Path, config: mc.ModelConfig) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(text_format.MessageToString(config))


def _graph_file(export_dir: Path, manifest: Manifest, name: str, rc: RenderConfig) -> tuple[Path, str]:
    if rc.backend == "tensorrt":
        engines = rc.engines_dir or export_dir / ENGINES_DIR
        plan = engines / f"{name}.plan"
        if not plan.is_file():
            raise MMRankError(
                f"{plan}: no TensorRT engine (build engines on the target GPU with "
                f"`python -m export.tensorrt --export {export_dir}`)"
            )
        return check_engine_file(plan), "model.plan"
    spec = manifest.graph(name)
    file, sha = variant(spec, rc.precision)
    if file is None:
        raise MMRankError(f"the export has no {rc.precision} variant of the {name} graph")
    return check_sha256(export_dir / file, sha), "model.onnx"


def _ranking_graph(export_dir: Path, manifest: Manifest, rc: RenderConfig) -> Path:
    """The ONNX ranking graph of the render's precision (fp32 for TensorRT, whose engines come from it)."""
    precision = "fp32" if rc.backend == "tensorrt" else rc.precision
    file, sha = variant(manifest.graph("ranking"), precision)
    return check_sha256(export_dir / file, sha)


def native_lookup(config: mc.ModelConfig) -> lg.NativeLookup:
    """How a native table model's config builds its versions' graphs."""
    return lg.NativeLookup.from_params({k: v.string_value for k, v in config.parameters.items()})


def render_repository(
    export_dir: str | Path, out: str | Path, rc: RenderConfig | None = None, force: bool = False
) -> dict[str, mc.ModelConfig]:
    rc = rc or RenderConfig()
    if rc.backend not in BACKENDS:
        raise MMRankError(f"unknown backend {rc.backend!r}; expected one of {', '.join(BACKENDS)}")
    if rc.precision not in PRECISIONS:
        raise MMRankError(f"unknown precision {rc.precision!r}; expected one of {', '.join(PRECISIONS)}")
    if rc.backend == "tensorrt" and rc.precision != "fp32":
        raise MMRankError(
            "--precision picks an ONNX variant; TensorRT engines are built from the fp32 graphs with fp16 "
            "kernels allowed (`python -m export.tensorrt --help`): leave --precision at fp32"
        )
    if rc.engines_dir is not None and rc.backend != "tensorrt":
        raise MMRankError(f"--engines applies to the tensorrt backend only, not {rc.backend}")
    export_dir = Path(export_dir)
    manifest = Manifest.read(export_dir)
    models = build_configs(manifest, rc)
    sources = {name: _graph_file(export_dir, manifest, name, rc) for name in models if name in GRAPH_NAMES}
    inputs = [export_dir]
    if rc.backend == "tensorrt":
        engines = rc.engines_dir or export_dir / ENGINES_DIR
        check_engines_hold(engines, manifest, rc.max_batch_size, rc.limits.max_candidates)
        inputs.append(engines)
    with atomic_dir(out, force=force, inputs=inputs) as tmp:
        for name, config in models.items():
            write_config(tmp / name, config)
            version = tmp / name / "1"
            version.mkdir()
            if name in sources:
                src, dst = sources[name]
                shutil.copy2(src, version / dst)
                if rc.backend in PYTHON_GRAPHS:
                    write_python_model(version, "graph_model.py")
            if name in PYTHON_MODELS and config.backend == "python":
                write_python_model(version, PYTHON_MODELS[name])
        lookup, first = models[rc.table_model], tmp / rc.table_model / "1"
        table_dir = export_dir / str(manifest.item_table["dir"])
        shutil.copytree(table_dir, first / lg.TABLE_DIR)
        if "program" in lookup.parameters:
            file, sha = variant(manifest.programs["ranking"], rc.precision)
            shutil.copy2(check_sha256(export_dir / file, sha), first / RANKING_PROGRAM)
        else:  # the ranking graph the lookup scores with or (separate native lookup) feeds
            shutil.copy2(_ranking_graph(export_dir, manifest, rc), first / RANKING_FILE)
        if lookup.platform == "onnxruntime_onnx":
            table = it.ItemTable.read(table_dir)
            native_lookup(lookup).write(first, table, 1)  # the version a response names: the folder
        if "tokenizer" in models:
            shutil.copytree(export_dir / manifest.tokenizer.dir, tmp / "tokenizer" / "1" / "tokenizer")
        shutil.copy2(export_dir / "manifest.json", tmp / "export_manifest.json")
        shutil.copy2(REPOSITORY_README, tmp / "README.md")
    return models


def check_table_fits(table: it.ItemTable, served: it.ItemTable) -> None:
    """A new table must have the served one's widths (the ranking graph's content and item-token
    dims, the user-feature columns); raises MMRankError naming the first that differs."""
    widths = {
        "content width d": (table.d, served.d),
        "item token width": (table.item_dim, served.item_dim),
        "user_feats columns": tuple(
            None if t.user_feats is None else t.user_feats.shape[1] for t in (table, served)
        ),
    }
    for name, (new, old) in widths.items():
        if new != old:
            raise MMRankError(f"the new item table's {name} is {new}, the served table's is {old}")


def read_config(model: Path) -> mc.ModelConfig | None:
    """The config of the model folder `model`; None without one; MMRankError naming the file where it
    does not parse."""
    path = Path(model) / "config.pbtxt"
    if not path.is_file():
        return None
    try:
        return text_format.Parse(path.read_text(), mc.ModelConfig())
    except (OSError, UnicodeDecodeError, text_format.ParseError) as e:
        raise MMRankError(f"{path}: not a model config ({type(e).__name__}: {e})") from e


def config_widths(config: mc.ModelConfig | None) -> tuple[int | None, int | None]:
    """(d, item_dim) the ranking graph reads, from the table model's config; (None, None) without one."""
    if config is None:
        return None, None
    widths = json.loads(config.parameters["table_widths"].string_value)
    return widths["d"], widths["item_dim"]


def is_native(config: mc.ModelConfig | None) -> bool:
    """Whether the table model is the native lookup graph (each version folder a built graph)."""
    return config is not None and config.platform == "onnxruntime_onnx"


def table_model(repo: str | Path) -> Path:
    """The folder of `repo`'s versioned table model: `rank` where it is the native graph itself
    (RenderConfig.table_model), else item_lookup."""
    rank = Path(repo) / RANK
    return rank if is_native(read_config(rank)) else Path(repo) / LOOKUP


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a folder too: its entries are what a rename publishes
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_version(tmp: Path, served: Path, table: it.ItemTable, config: mc.ModelConfig | None) -> None:
    """The new version's folder: the ranking graph or program of the served version, the table (with the
    served version's item placement, model_repository/item_placement.py, where it has one), and
    model.py with the runtime (python / torch backend: the lookup ranks too) or the lookup graph built
    from them (native), read back (the native graph loaded and probed: `NativeLookup.check`), then
    synced to disk files first, folders bottom-up, so no crash after the rename leaves a published
    version with empty files."""
    for name in (RANKING_FILE, RANKING_PROGRAM):
        if (served / name).is_file():
            shutil.copy2(served / name, tmp / name)
    table.write(tmp / lg.TABLE_DIR)
    written = it.ItemTable.read(tmp / lg.TABLE_DIR)  # what a server will read, before it can see it
    placement = served / lg.TABLE_DIR / PLACEMENT  # the model's item graph, for the next new items
    if placement.is_dir():
        shutil.copytree(placement, tmp / lg.TABLE_DIR / PLACEMENT)
    if is_native(config):
        build = native_lookup(config)
        build.write(tmp, written, written.version)
        build.check(tmp, written.version, config_widths(config), written)
    else:
        write_python_model(tmp, PYTHON_MODELS[LOOKUP])
    for path in sorted(tmp.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        _fsync(path)
    _fsync(tmp)


def _sweep_abandoned(model: Path) -> None:
    """Remove hidden version folders a killed publisher left behind. Only old ones: a younger one may
    belong to a publisher still writing."""
    cutoff = time.time() - ABANDONED_AFTER_S
    for tmp in model.glob(".*.tmp-*"):
        with contextlib.suppress(OSError):
            if tmp.is_dir() and tmp.stat().st_mtime < cutoff:
                shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class ServedTable:
    """What a repository's table model serves, read once per publish: its config, the newest valid
    table (`newest_valid_table`, the one a server serves) and its version, and the number the next
    version gets (after the newest folder, valid or not)."""

    model: Path  # <repo>/rank or <repo>/item_lookup (`table_model`)
    config: mc.ModelConfig | None
    table: it.ItemTable
    version: int
    next: int


def served_table(repo: str | Path) -> ServedTable:
    """What `repo`'s table model serves; MMRankError without one, or where no version reads."""
    model = table_model(repo)
    versions = it.table_versions(model) if model.is_dir() else []
    if not versions:
        raise MMRankError(
            f"{model}: not a model folder of item table versions (render one with `mmrank repo`)"
        )
    config = read_config(model)
    table, version, _ = it.newest_valid_table(model, versions[-1], *config_widths(config))
    return ServedTable(model, config, table, version, versions[-1] + 1)


def add_table_version(repo: str | Path, table: it.ItemTable, served: ServedTable | None = None) -> Path:
    """Publish `table` as the next version of the table model, for any backend: checked (finite values; the
    widths of the served version, `served` where the caller has read it), written in a hidden folder
    (`_write_version`: a native version's graph is built there, loaded and probed), then renamed into
    place in one step, so a server in poll or explicit mode only ever sees complete, valid versions
    (and serves it after a (re)load of that model, without a restart). A failed write leaves nothing
    behind. `mmrank table publish` (export/table_publish.py) is its command line."""
    served = served or served_table(repo)
    table.check_finite()  # the arrays may have changed since the table was built
    check_table_fits(table, served.table)
    model, number = served.model, served.next
    _sweep_abandoned(model)
    # A name of its own: a second publisher must not write into (or delete) this one's folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{number}.tmp-", dir=model))
    tmp.chmod(0o755)
    final = model / str(number)
    try:
        _write_version(tmp, model / str(served.version), replace(table, version=number), served.config)
        tmp.rename(final)  # the server sees the version folder only once it is complete
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and final.exists():
            raise MMRankError(f"{final}: another writer published version {number} first; try again") from e
        raise
    _fsync(model)  # the rename itself
    return final


def cli(args) -> int:
    limits = RequestLimits(args.max_candidates, args.max_history, args.max_request_bytes)
    encode_limits = EncodeLimits(args.max_encode_items, args.max_text_bytes, args.max_image_bytes)
    rc = RenderConfig(
        backend=args.backend,
        precision=args.precision,
        max_batch_size=args.max_batch_size,
        limits=limits,
        encode_limits=encode_limits,
        device=args.device,
        buckets=args.buckets,
        engines_dir=Path(args.engines) if args.engines else None,
        cuda_graphs=not args.no_cuda_graphs,
        lookup=args.lookup,
        id_map=args.id_map,
        instance_kind=args.instance_kind,
        rank_graph_threads=args.rank_threads,
        lookup_instances=args.lookup_instances,
        graph_instances=args.graph_instances,
    )
    models = render_repository(args.export, args.out, rc, force=args.force)
    print(f"repo: {args.out} ({args.backend}, {args.precision}): {', '.join(sorted(models))}")
    return 0
