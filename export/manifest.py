"""manifest.json of an export folder: the one place that says what each graph takes and gives.

Tensor names, dtypes and shapes are read back from the written ONNX files, so the repository renderer
and the serving code never restate them. Shapes list an int for a fixed axis and a name for a dynamic
one ("batch", "candidates", "history", "tokens", ...); the first axis of every graph tensor is "batch".

    {
      "format_version": 3, "opset": 17, "created_at": "...",
      "checkpoint": {"path": ".../best.pt", "sha256": "..."},
      "model": {"d": 64, "item_dim": 64, "history_len": 20, "long_history_len": 0, "num_items": ...,
                "num_users": ..., "user_feature_cards": [3], "modalities": {"text": {"tokens": 2, "dim": 384}}},
      "graphs": {"ranking": {"file": "ranking.onnx", "fp16_file": "ranking.fp16.onnx",
                             "sha256": ..., "fp16_sha256": ..., "inputs": [...], "outputs": [...]}, ...},
      "programs": {"ranking": {"file": "ranking.pt2", "fp16_file": "ranking.fp16.pt2", "sha256": ...,
                               "fp16_sha256": ..., "inputs": ["user_id", ...], "torch": "2.13.0"}},
      "item_table": {"dir": "item_table", "version": 1},
      "tokenizer": {"dir": "tokenizer", "max_length": 128, "fields": ["title", "overview"],
                    "join_fields": false},
      "user_table": "user_table.npy"   (two-tower models: the propagated user vectors; else null)
    }
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.errors import MMRankError
from model_repository.item_table import LookupConfig

MANIFEST = "manifest.json"
# 2: the ranking graph takes candidate_known (it scores unknown candidates -inf) and `programs` is always
# there. 3: `user_table` is always there (null but for two-tower models). A manifest of another version is
# refused: export the run again.
FORMAT_VERSION = 3
# ONNX TensorProto element types <-> numpy dtype names <-> Triton data types.
ONNX_DTYPES = {1: "float32", 7: "int64", 9: "bool", 10: "float16", 6: "int32", 8: "string"}
TRITON_DTYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "bool": "TYPE_BOOL",
    "string": "TYPE_STRING",
}
GRAPH_NAMES = ("text_encoder", "image_encoder", "fusion", "ranking")


@dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, int64, bool, string
    shape: list[int | str]  # int = fixed size, str = named dynamic axis

    @property
    def triton_dtype(self) -> str:
        return TRITON_DTYPES[self.dtype]


@dataclass
class GraphSpec:
    file: str
    fp16_file: str | None
    sha256: str
    fp16_sha256: str | None
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def input(self, name: str) -> TensorSpec:
        return _by_name(self.inputs, name, "input")

    def output(self, name: str) -> TensorSpec:
        return _by_name(self.outputs, name, "output")


@dataclass
class ProgramSpec:
    """A torch.export program of a graph (export/torch_program.py), for the torch serving backend."""

    file: str
    fp16_file: str
    sha256: str
    fp16_sha256: str
    inputs: list[str]  # argument order; the same names as the graph's ONNX inputs
    torch: str  # the torch release that exported it


def _by_name(specs: list[TensorSpec], name: str, kind: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise MMRankError(f"no {kind} named {name!r} (have {[s.name for s in specs]})")


@dataclass
class ModelInfo:
    d: int
    item_dim: int  # width of an item ID row (item id + categorical embeddings); 0 = none
    history_len: int  # the short history the ranking graph is fed (the trained length)
    long_history_len: int  # 0 = the model has no long history
    num_items: int
    num_users: int
    user_feature_cards: list[int]  # cardinality of each categorical user feature (0 = unknown)
    modalities: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> tokens K, dim D

    def lookup(self) -> LookupConfig:
        """What the serving lookup needs of the model."""
        return LookupConfig(self.history_len, self.long_history_len, self.num_users, self.user_feature_cards)


@dataclass
class TokenizerInfo:
    dir: str
    max_length: int  # tokens per text, [CLS] and [SEP] included
    fields: list[str]  # text fields, in the order the `text` input lists them
    join_fields: bool  # True: one text per item, fields joined by [SEP] (trainable encoder)


@dataclass
class Manifest:
    opset: int
    created_at: str
    checkpoint: dict[str, str]
    model: ModelInfo
    graphs: dict[str, GraphSpec]
    item_table: dict[str, object]
    tokenizer: TokenizerInfo | None = None
    programs: dict[str, ProgramSpec] = field(default_factory=dict)  # graph name -> torch program
    user_table: str | None = None  # two-tower models: [num_users + 1, E] float32 .npy, row 0 = unknown
    format_version: int = FORMAT_VERSION

    def graph(self, name: str) -> GraphSpec:
        if name not in self.graphs:
            raise MMRankError(f"the export has no {name!r} graph (graphs: {sorted(self.graphs)})")
        return self.graphs[name]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def write(self, root: str | Path) -> None:
        (Path(root) / MANIFEST).write_text(self.to_json())

    @classmethod
    def read(cls, root: str | Path) -> Manifest:
        """Read and check the manifest and that every file it names exists, with one clear error."""
        root = Path(root)
        path = root / MANIFEST
        if not root.is_dir():
            raise MMRankError(f"{root}: export folder not found (write one with `mmrank export`)")
        if not path.is_file():
            raise MMRankError(f"{path}: no manifest, not an export folder (write one with `mmrank export`)")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format_version") != FORMAT_VERSION:
                raise MMRankError(
                    f"{path}: export format_version {raw.get('format_version')!r}, this version reads "
                    f"{FORMAT_VERSION}; export the run again"
                )
            manifest = cls(
                opset=raw["opset"],
                created_at=raw["created_at"],
                checkpoint=raw["checkpoint"],
                model=ModelInfo(**raw["model"]),
                graphs={name: _graph(g) for name, g in raw["graphs"].items()},
                item_table=raw["item_table"],
                tokenizer=TokenizerInfo(**raw["tokenizer"]) if raw.get("tokenizer") else None,
                programs={name: ProgramSpec(**p) for name, p in raw["programs"].items()},
                user_table=raw["user_table"],
            )
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MMRankError(f"{path}: not valid JSON ({e})") from e
        except (KeyError, TypeError, AttributeError) as e:
            raise MMRankError(
                f"{path}: manifest fields do not match the format ({type(e).__name__}: {e})"
            ) from e
        manifest.check_files(root)
        return manifest

    def check_files(self, root: Path) -> None:
        unknown = sorted(set(self.graphs) - set(GRAPH_NAMES))
        if unknown:
            raise MMRankError(f"{root / MANIFEST}: unknown graphs {unknown}")
        if "ranking" not in self.graphs:
            raise MMRankError(f"{root / MANIFEST}: no ranking graph")
        for g in [*self.graphs.values(), *self.programs.values()]:
            for name in filter(None, (g.file, g.fp16_file)):
                if not (root / name).is_file():
                    raise MMRankError(f"{root / name}: listed in the manifest but missing")
        if not (root / str(self.item_table["dir"])).is_dir():
            raise MMRankError(f"{root / str(self.item_table['dir'])}: item table folder missing")
        if self.user_table is not None and not (root / self.user_table).is_file():
            raise MMRankError(f"{root / self.user_table}: listed in the manifest but missing")
        if self.tokenizer is not None and not (root / self.tokenizer.dir).is_dir():
            raise MMRankError(f"{root / self.tokenizer.dir}: tokenizer folder missing")


def _graph(raw: dict) -> GraphSpec:
    raw = dict(raw)
    raw["inputs"] = [TensorSpec(**t) for t in raw["inputs"]]
    raw["outputs"] = [TensorSpec(**t) for t in raw["outputs"]]
    return GraphSpec(**raw)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def variant(spec: GraphSpec | ProgramSpec, precision: str) -> tuple[str | None, str | None]:
    """(file, sha256) of a graph's or program's fp32 or fp16 variant; (None, None) where it has none."""
    return (spec.fp16_file, spec.fp16_sha256) if precision == "fp16" else (spec.file, spec.sha256)


def check_sha256(path: str | Path, expected: str) -> Path:
    """`path`, after checking it is the file the manifest recorded (a truncated or swapped graph would
    otherwise render fine and fail only when the server loads it)."""
    if sha256_file(path) != expected:
        raise MMRankError(
            f"{path}: its sha256 differs from the one manifest.json records (changed or truncated since "
            "`mmrank export`); export again"
        )
    return Path(path)


def onnx_io(path: str | Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph inputs and outputs of an ONNX file, as written (initializers excluded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    inputs = [_spec(v) for v in model.graph.input if v.name not in inits]
    return inputs, [_spec(v) for v in model.graph.output]


def _spec(value) -> TensorSpec:
    t = value.type.tensor_type
    if t.elem_type not in ONNX_DTYPES:
        raise MMRankError(f"tensor {value.name!r}: ONNX element type {t.elem_type} is not supported")
    shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
    return TensorSpec(value.name, ONNX_DTYPES[t.elem_type], shape)
