"""`mmrank table publish` into python and native repositories, and what a (re)start does with a bad
newest native version (export/triton_launcher.py `check_table_versions`), without a server: the tests
against the real server are in test_native_serving.py."""

import json
import shutil

import numpy as np
import pytest
from conftest import NUM_ITEMS

from common.errors import MMRankError
from export.repository import RenderConfig, native_lookup, read_config, render_repository, table_model
from export.triton_launcher import TritonConfig, TritonServer, check_table_versions, dependents, free_port
from mmrank.cli import main
from model_repository import item_table as it


@pytest.fixture(scope="module", params=["python", "onnxruntime"])
def rendered(request, small_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("publish") / request.param
    render_repository(small_export.out, out, RenderConfig(backend=request.param))
    return out


@pytest.fixture
def repo(rendered, tmp_path):
    """A copy of the rendered repository of this test's own: what one test publishes, no other sees."""
    return shutil.copytree(rendered, tmp_path / "repo", symlinks=True)


def _items(tmp_path, ids, d=16, seed=0, name="items.npz"):
    path = tmp_path / name
    content = np.random.default_rng(seed).standard_normal((len(ids), d)).astype(np.float32)
    np.savez(path, ids=np.asarray(ids, np.int64), content=content)
    return path, content


def test_publish_an_item_set_and_an_export(repo, small_export, tmp_path, capsys):
    model = table_model(repo)  # the native `rank` itself, or the python backend's item_lookup
    assert model.name == (
        "rank" if read_config(repo / "rank").platform == "onnxruntime_onnx" else "item_lookup"
    )
    new_id = NUM_ITEMS + 7
    items, content = _items(tmp_path, [new_id, 3])
    assert main(["table", "publish", "--repo", str(repo), "--items", str(items)]) == 0
    assert f"published {model.name} version 2" in capsys.readouterr().out
    assert dependents(repo, model.name) == (set() if model.name == "rank" else {"rank"})  # loaded after it
    table = it.ItemTable.read(model / "2" / "item_table")
    rows, known = table.rows_of(np.array([new_id, 3]))
    assert known.all() and np.array_equal(table.content[rows], content)
    config = read_config(model)
    if config.platform == "onnxruntime_onnx":  # the version's graph answers as the numpy lookup does
        native_lookup(config).check(model / "2", 2, (16, 12))
    assert main(["table", "publish", "--repo", str(repo), "--export", str(small_export.out)]) == 0
    assert it.ItemTable.read(model / "3" / "item_table").version == 3
    assert sorted(p.name for p in model.iterdir() if p.name != "config.pbtxt") == ["1", "2", "3"]


def test_publish_refuses_what_does_not_fit_with_one_line(repo, small_export, tmp_path, capsys):
    model = table_model(repo)
    other = tmp_path / "other"
    shutil.copytree(small_export.out, other)
    meta = json.loads((other / "item_table" / "table.json").read_text())
    meta["source"]["checkpoint_sha256"] = "f" * 64
    (other / "item_table" / "table.json").write_text(json.dumps(meta))
    wide, _ = _items(tmp_path, [NUM_ITEMS + 1], d=17, name="wide.npz")
    good, content = _items(tmp_path, [NUM_ITEMS + 1, NUM_ITEMS + 2])
    files = {
        "junk.npz": b"not a zip",
        "cut.npz": good.read_bytes()[:200],
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    np.save(tmp_path / "array.npy", content)
    np.savez(tmp_path / "float_ids.npz", ids=np.array([31.9, 32.2]), content=content)
    np.savez(tmp_path / "int_content.npz", ids=np.array([31, 32]), content=np.ones((2, 16), np.int64))
    np.savez(tmp_path / "no_content.npz", ids=np.array([31, 32]))
    np.savez(tmp_path / "nan.npz", ids=np.array([31, 32]), content=content * np.nan)
    np.savez(tmp_path / "twice.npz", ids=np.array([31, 31]), content=content)
    cases = {
        ("--export", str(other)): "the export is of checkpoint ffffffffffff",
        ("--items", str(wide)): "must be [M] and [M, 16]",
        ("--items", str(tmp_path / "junk.npz")): "not an item set",
        ("--items", str(tmp_path / "cut.npz")): "not an item set",
        ("--items", str(tmp_path / "array.npy")): "a single array, not an item set",
        ("--items", str(tmp_path / "float_ids.npz")): "ids are float64",
        ("--items", str(tmp_path / "int_content.npz")): "content is int64",
        ("--items", str(tmp_path / "no_content.npz")): "content is none",
        ("--items", str(tmp_path / "nan.npz")): "NaN or infinite values",
        ("--items", str(tmp_path / "twice.npz")): "positive and distinct",
    }
    for args, message in cases.items():
        assert main(["table", "publish", "--repo", str(repo), *args]) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("mmrank table publish: error:") and message in err, err
    assert sorted(p.name for p in model.iterdir()) == ["1", "config.pbtxt"]  # nothing, no leftovers


def test_a_corrupt_config_and_a_server_that_is_down_are_one_line(repo, tmp_path, capsys):
    items, _ = _items(tmp_path, [NUM_ITEMS + 1])
    publish = ["table", "publish", "--repo", str(repo), "--items", str(items)]
    # The version is published (and kept) before the server is asked for it.
    assert main([*publish, "--url", f"127.0.0.1:{free_port()}", "--wait", "1"]) == 1
    err = capsys.readouterr().err.strip()
    model = table_model(repo)
    assert err.count("\n") == 0 and f"the server cannot load {model.name} version 2" in err
    assert it.ItemTable.read(model / "2" / "item_table").version == 2
    assert main([*publish, "--url", "http://127.0.0.1:8000"]) == 1  # refused before publishing
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "expected the server's gRPC address" in err, err
    assert sorted(p.name for p in model.iterdir()) == ["1", "2", "config.pbtxt"]
    config = model / "config.pbtxt"
    config.write_text(config.read_text() + "\nnot a field {")
    for args in (publish, ["serve", "--repo", str(repo)]):
        assert main(args) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"{config}: not a model config (ParseError" in err, err


def test_a_bad_newest_native_version_is_passed_over_at_start(small_export, tmp_path):
    repo = tmp_path / "repo"
    render_repository(small_export.out, repo, RenderConfig(backend="onnxruntime"))
    model = repo / "rank"  # the native model `rank` itself holds the table versions
    assert check_table_versions(repo).served == 1 and not check_table_versions(repo).pinned
    shutil.copytree(model / "1", model / "2")  # a hand-copied folder: its graph answers version 1
    (model / "3").mkdir()  # an unfinished copy
    found = check_table_versions(repo)
    assert (found.newest, found.served, found.native, found.pinned) == (3, 1, True, True)
    assert "item table version 3 skipped:" in found.skipped[0]
    assert "holds item_table_version 1, expected 2" in found.skipped[1]
    assert all(line.endswith("serving item table version 1") for line in found.skipped)
    for mode in ("poll", "none"):  # Triton would load version 3 and fail: refused up front
        with pytest.raises(MMRankError, match=f"cannot pass over a version in {mode} mode") as refused:
            TritonServer(TritonConfig(repo, control_mode=mode))
        assert "serving" not in str(refused.value)  # it serves nothing: the server does not start
    server = TritonServer(TritonConfig(repo, control_mode="explicit"))
    loads = [a for a in server.command(tmp_path) if a.startswith("--load-model")]
    assert "--load-model=ranking" in loads and "--load-model=*" not in loads
    assert "--load-model=rank" not in loads and found.model == "rank"  # loaded after, pinned
    assert dependents(repo, "rank") == set()
    for version in ("2", "3"):
        shutil.rmtree(model / version)
    (model / "1" / "model.onnx").write_bytes(b"cut")
    with pytest.raises(MMRankError, match="no item table version serves"):
        check_table_versions(repo)


def test_one_publish_reads_the_served_table_once_and_the_new_one_back_once(repo, tmp_path, monkeypatch):
    items, _ = _items(tmp_path, [NUM_ITEMS + 1])
    read, folders = it.ItemTable.read.__func__, []

    def counted(cls, folder):
        folders.append(folder.parent.name)
        return read(cls, folder)

    monkeypatch.setattr(it.ItemTable, "read", classmethod(counted))  # the real read, counted
    assert main(["table", "publish", "--repo", str(repo), "--items", str(items)]) == 0
    assert folders[0] == "1" and folders[1].startswith(".2.tmp-") and len(folders) == 2
