"""The serving runtime (model_repository/) without a server: what it imports, its request limits, and
how item-table versions are published and chosen."""

import ast
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from common.errors import MMRankError, RequestError
from export.repository import add_table_version
from model_repository import item_table as it
from model_repository.limits import RequestLimits

RUNTIME = Path(__file__).resolve().parents[2] / "model_repository"
ALLOWED = {"numpy", "onnxruntime", "tokenizers", "PIL", "model_repository", "triton_python_backend_utils"}
LEAF_MODULES = {"common.errors"}  # the one module of the leaf package a rendered repository carries


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def _modules(path: Path) -> set[str]:
    return {node.module for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)}


# The torch backend's ranker is the one module that needs torch; only the lookup model imports it, and
# only when its config names a torch program, so the other repositories never need torch.
TORCH_MODULE, TORCH_USERS = RUNTIME / "torch_ranker.py", {RUNTIME / "models" / "item_lookup.py"}


@pytest.mark.parametrize("path", sorted(RUNTIME.rglob("*.py")), ids=lambda p: str(p.relative_to(RUNTIME)))
def test_the_runtime_imports_only_its_listed_dependencies(path):
    allowed = ALLOWED | ({"torch"} if path in {TORCH_MODULE, *TORCH_USERS} else set())
    outside = _imports(path) - allowed - {"common"} - set(sys.stdlib_module_names)
    assert not outside, f"{path.name} imports {sorted(outside)}: the runtime must not need the project"
    leaf = {m for m in _modules(path) if m.split(".")[0] == "common"}
    assert leaf <= LEAF_MODULES, f"{path.name} imports {sorted(leaf - LEAF_MODULES)}, not copied with it"
    if path not in TORCH_USERS:
        assert "model_repository.torch_ranker" not in _modules(path), (
            f"{path.name} must not import the torch ranker"
        )


def _request(n=3, length=4, rows=1):
    return {
        "history_ids": np.ones((rows, length), np.int64),
        "candidate_ids": np.ones((rows, n), np.int64),
        "user_id": None,
        "user_feats": None,
    }


def test_limits_refuse_with_the_input_and_the_limit():
    limits = RequestLimits(max_candidates=5, max_history=6, max_request_bytes=200)
    limits.check(_request())  # within every bound
    cases = [
        (_request(n=0), "candidate_ids is empty: send 1 to 5 candidates per user"),
        (_request(n=6), "candidate_ids has 6 candidates per user, over the limit of 5"),
        (_request(length=7), "history_ids has 7 ids per user, over the limit of 6"),
        (_request(n=5, length=6, rows=3), "request inputs hold 264 bytes, over the limit of 200"),
    ]
    for request, message in cases:
        with pytest.raises(RequestError, match=message):
            limits.check(request)
    with pytest.raises(MMRankError, match="request limit max_candidates must be >= 1"):
        RequestLimits(max_candidates=0)


def _table(d=3, version=1):
    rng = np.random.default_rng(version)
    content = rng.standard_normal((4, d)).astype(np.float32)
    return it.ItemTable(np.arange(4), content, rng.standard_normal((4, 2)).astype(np.float32), version)


def test_newest_valid_table_skips_unreadable_and_wrong_width_versions(tmp_path):
    _table(version=1).write(tmp_path / "1" / "item_table")
    _table(version=2).write(tmp_path / "2" / "item_table")
    _table(d=5, version=3).write(tmp_path / "3" / "item_table")
    (tmp_path / "4" / "item_table").mkdir(parents=True)  # an unfinished copy: no table.json
    table, served, skipped = it.newest_valid_table(tmp_path, 4, d=3, item_dim=2)
    assert served == 2 and table.version == 2
    assert skipped[0].startswith("item table version 4 skipped:") and "no table.json" in skipped[0]
    assert skipped[1] == "item table version 3 skipped: content width d is 5, the ranking graph reads 3"
    with pytest.raises(MMRankError, match="no valid item table at or below version 4"):
        it.newest_valid_table(tmp_path, 4, d=7, item_dim=2)


def test_add_table_version_checks_widths_and_publishes_whole_versions(tmp_path):
    model = tmp_path / "repo" / "item_lookup"
    _table().write(model / "1" / "item_table")
    with pytest.raises(MMRankError, match="content width d is 5, the served table's is 3"):
        add_table_version(tmp_path / "repo", _table(d=5, version=2))
    assert sorted(p.name for p in model.iterdir()) == ["1"]  # nothing published, no hidden leftovers
    final = add_table_version(tmp_path / "repo", _table(version=2))
    assert final == model / "2" and (final / "model.py").is_file()
    assert (final / "model_repository" / "item_table.py").is_file()  # the runtime travels with it
    assert (final / "common" / "errors.py").is_file()  # and the leaf module it imports
    assert it.ItemTable.read(final / "item_table").version == 2
    # table.json says the folder's number whatever the caller's table said
    third = add_table_version(tmp_path / "repo", _table(version=7))
    assert third == model / "3" and it.ItemTable.read(third / "item_table").version == 3
    # a killed publisher's hidden folder goes once it is old; a young one may still be written
    old, young = model / ".4.tmp-killed", model / ".4.tmp-writing"
    old.mkdir(), young.mkdir()
    os.utime(old, (time.time() - 7200,) * 2)
    add_table_version(tmp_path / "repo", _table())
    assert not old.exists() and young.is_dir()


class FakePbUtils:
    """The few triton_python_backend_utils names the runtime's answer loops use."""

    class TritonError:
        INVALID_ARG, INTERNAL = "INVALID_ARGUMENT", "INTERNAL"

        def __init__(self, message, code):
            self.message, self.code = message, code

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None):
            self.tensors = {t.name: t.array for t in output_tensors or []}
            self.error = error


def test_respond_grouped_batches_equal_shapes_and_answers_each_request_in_order():
    from model_repository.responses import respond_grouped

    requests = [np.array([[1, 2]]), np.array([[3]]), np.array([[4, 5], [6, 7]]), np.array([[-1, 0]])]
    calls = []

    def read(request):
        if (request < 0).any():
            raise RequestError("x holds a negative value")
        return {"x": request, "absent": None}

    def compute(batch):
        calls.append(batch["x"].shape)
        return {"y": batch["x"] * 10}

    out = respond_grouped(FakePbUtils, requests, {"y": np.float32}, read, compute)
    assert sorted(calls) == [(1, 1), (3, 2)]  # requests 0 and 2 ran as one batch
    assert [r.tensors["y"].tolist() for r in out[:3]] == [[[10, 20]], [[30]], [[40, 50], [60, 70]]]
    assert out[0].tensors["y"].dtype == np.float32
    assert (out[3].error.code, out[3].error.message) == ("INVALID_ARGUMENT", "x holds a negative value")


BROKEN_TABLES = {
    "empty ids.npy": lambda folder: (folder / "ids.npy").write_bytes(b""),
    "table.json holding []": lambda folder: (folder / "table.json").write_text("[]"),
    'version "x"': lambda folder: (folder / "table.json").write_text(
        json.dumps({**json.loads((folder / "table.json").read_text()), "version": "x"})
    ),
    "a NaN vector": lambda folder: np.save(folder / "content.npy", np.full((4, 3), np.nan, np.float32)),
}


@pytest.mark.parametrize("case", BROKEN_TABLES)
def test_a_broken_newest_table_is_skipped_by_the_lookup_and_the_launcher(tmp_path, case):
    from tritonclient.grpc import model_config_pb2 as mc

    from export.repository import write_config
    from export.triton_launcher import check_table_versions

    model = tmp_path / "repo" / "item_lookup"
    _table(version=1).write(model / "1" / "item_table")
    BROKEN_TABLES[case](_table(version=2).write(model / "2" / "item_table"))
    table, served, skipped = it.newest_valid_table(model, 2, d=3, item_dim=2)
    assert served == 1 and table.version == 1
    assert len(skipped) == 1 and skipped[0].startswith("item table version 2 skipped: ")
    config = mc.ModelConfig(name="item_lookup")
    config.parameters["table_widths"].string_value = json.dumps({"d": 3, "item_dim": 2})
    write_config(model, config)
    found = check_table_versions(tmp_path / "repo")  # what `mmrank serve` says at start, no traceback
    assert (found.newest, found.served, found.pinned) == (2, 1, False)  # the python lookup passes over it
    assert len(found.skipped) == 1 and found.skipped[0].endswith("serving item table version 1")


def test_add_table_version_checks_against_the_newest_valid_version(tmp_path):
    model = tmp_path / "repo" / "item_lookup"
    _table(version=1).write(model / "1" / "item_table")
    (model / "2" / "item_table").mkdir(parents=True)  # a broken newest version: no table.json
    (model / "1" / "ranking.onnx").write_bytes(b"graph of version 1")
    final = add_table_version(tmp_path / "repo", _table(version=3))
    assert final == model / "3" and it.ItemTable.read(final / "item_table").version == 3
    assert (final / "ranking.onnx").read_bytes() == b"graph of version 1"  # the served version's graph
    bad = _table(version=4)
    bad.content[2, 1] = np.inf
    with pytest.raises(MMRankError, match="content has NaN or infinite values in 1 rows"):
        add_table_version(tmp_path / "repo", bad)
    assert sorted(p.name for p in model.iterdir()) == ["1", "2", "3"]  # nothing published, no leftovers


def test_the_launcher_tells_the_cpu_host_cuda_lines_from_real_errors():
    from export.triton_launcher import error_lines

    log = "\n".join(
        [
            'I1207 02:19:05.306 8205 server.cc:100] "loading: rank:1"',
            'E1207 02:19:05.306 8205 server.cc:241] "CudaDriverHelper has not been initialized."',
            'E1207 02:19:12.347 8205 ensemble_scheduler.cc:1468] "unable to create stream for rank: CUDA '
            'driver version is insufficient for CUDA runtime version"',
            "E1207 02:19:13.001 8205 model_lifecycle.cc:654] \"failed to load 'ranking' version 1\"",
            "Everything is fine",
        ]
    )
    assert error_lines(log) == [log.splitlines()[3]]
