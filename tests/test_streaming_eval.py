"""`mmrank evaluate` refuses a streaming run: its final model trained on valid and test, so only the
prequential metrics in metrics.json are held out. A tiny ID-only streaming run (no content features)."""

import json

import pytest

from common.errors import MMRankError
from mmrank.cli import main
from trainer.config import resolve
from trainer.data.synth import SynthConfig, generate
from trainer.train import evaluate_run, train

SETS = {"train.streaming": True, "train.stream_windows": 2, "train.batch_size": 64, "train.log_every": 1000}


@pytest.fixture(scope="module")
def streaming_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    data = root / "synth"
    generate(data, SynthConfig(users=50, items=40, events=3000, seed=0))
    run = root / "run"
    train(data, resolve("id_only", sets=SETS), run, progress=False)
    return data, run


def test_evaluate_refuses_a_streaming_run_and_points_at_its_prequential_metrics(streaming_run):
    data, run = streaming_run
    with pytest.raises(MMRankError, match="streaming run.*in-sample.*prequential.*metrics.json") as info:
        evaluate_run(run, data)
    assert str(run) in str(info.value)
    assert not (run / "evaluation.json").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["window"] == "test" and metrics["valid"]["window"] == "valid"


def test_the_cli_says_why_in_one_line(streaming_run, capsys):
    data, run = streaming_run
    assert main(["evaluate", "--run", str(run), "--data", str(data)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "streaming run" in err[0]
