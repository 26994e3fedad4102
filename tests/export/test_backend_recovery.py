"""A backend process killed under load, against the real tritonserver: the launcher's supervisor reloads
its model in place, readiness never answers ready meanwhile (it answers not ready, or leaves a probe
unanswered until the model is back; the server's state may take milliseconds to follow the supervisor's
unload and load calls), and nothing is left after stop.

Client threads call an ensemble over gRPC and a prober reads the server's readiness over HTTP while the
test SIGKILLs the stub of one of the ensemble's Python models (what the OOM killer or a crash in a
native library does): `item_lookup` for `rank` and `tokenizer` for `encode_items` of the python-backend
repository, and `tokenizer` of the repository whose graphs run on the native onnxruntime backend.
Times are only waited for (a deadline makes a broken recovery fail rather than hang); the times
themselves are measured by benchmarks/recovery.py.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import tritonclient.grpc as grpc
from server_processes import regions, wait_gone

from clients.availability import Callers, ReadinessProber
from export.backend_supervisor import RepositoryControl, SupervisorConfig, backend_processes
from export.repository import RenderConfig, render_repository
from export.triton_launcher import TritonConfig, TritonServer

# The real server, reached through getfixturevalue: conftest cannot see that these tests start it.
pytestmark = pytest.mark.slow

CALLERS = 4
DEADLINE_S = 240.0
STATE_MARGIN = 0.1  # of the down period, at each end: where the server's readiness may lag its calls


def _render(small_export, tmp_path_factory, backend: str):
    out = tmp_path_factory.mktemp(f"recovery_{backend}") / "repo"
    render_repository(small_export.out, out, RenderConfig(backend=backend, max_batch_size=4))
    return out


@pytest.fixture(scope="module")
def python_repo(small_export, tritonserver, tmp_path_factory):
    return _render(small_export, tmp_path_factory, "python")


@pytest.fixture(scope="module")
def native_repo(small_export, native_backend, tmp_path_factory):
    """The graphs on Triton's native onnxruntime backend (in the server's process): what is left to die
    is the Python preprocessing of encode_items."""
    return _render(small_export, tmp_path_factory, "onnxruntime")


def _tensor(name: str, array: np.ndarray, dtype: str) -> grpc.InferInput:
    t = grpc.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


def _rank_request() -> list[grpc.InferInput]:
    return [
        _tensor("history_ids", np.array([[1, 2, 3, 9]], np.int64), "INT64"),
        _tensor("candidate_ids", np.array([[4, 5, 6, 7]], np.int64), "INT64"),
    ]


def _encode_request() -> list[grpc.InferInput]:
    texts = np.array([["Toy Story", "A cowboy doll feels threatened."]], dtype=object)
    return [_tensor("text", texts, "BYTES"), _tensor("image", np.array([[b""]], dtype=object), "BYTES")]


# The killed model -> the ensemble the callers call, its request, the output compared.
CASES = {
    "item_lookup": ("rank", _rank_request, "scores"),
    "tokenizer": ("encode_items", _encode_request, "content"),
}


def _wait(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {DEADLINE_S:.0f} s"
        time.sleep(0.05)


def _runs(answers: list[bool]) -> list[int]:
    """Where each run of equal answers starts (indices into `answers`)."""
    return [0] + [i for i in range(1, len(answers)) if answers[i] != answers[i - 1]]


def _down_once(answers: list[bool]) -> bool:
    """Ready, then not ready, then ready for good: one down period, no flicker."""
    return [answers[i] for i in _runs(answers)] in ([True, False, True], [False, True])


def _held(probes, recovery, margin: float) -> bool:
    """A probe left unanswered through the second half of the down period (or longer): it answers after
    the reload, so it never said ready while the model was down. (Seen once in a full run, cause not
    shown: a reload alone answers every probe within milliseconds, not ready.) Its answer may come up to
    `margin` before the reload call returns, as a reloaded model reads ready before that (seen once: a
    probe held from the unload answered ready under 1 ms before the supervisor's load call returned)."""
    middle = (recovery.unloaded + recovery.ready) / 2
    return any(p.start <= middle and p.end >= recovery.ready - margin for p in probes)


def _timeline(probes, answers: list[bool], killed: float, recovery) -> str:
    """Each run of equal answers with the seconds after the kill it started at, the longest probe and
    the recovery's times: what a failure of the readiness checks needs to be read."""
    marks = {"detected": recovery.detected, "unloaded": recovery.unloaded, "ready": recovery.ready}
    longest = max(probes, key=lambda p: p.end - p.start)
    return ", ".join(
        [
            f"{'ready' if answers[i] else 'not ready'} from {probes[i].start - killed:.3f} s"
            for i in _runs(answers)
        ]
        + [f"the longest probe from {longest.start - killed:.3f} to {longest.end - killed:.3f} s"]
        + [f"{name} at {t - killed:.3f} s" for name, t in marks.items() if t is not None]
    )


@pytest.mark.parametrize(
    ("repo", "model"),
    [("python_repo", "item_lookup"), ("python_repo", "tokenizer"), ("native_repo", "tokenizer")],
)
def test_a_backend_process_killed_under_load_is_reloaded_and_readiness_says_so(request, repo, model):
    repo = request.getfixturevalue(repo)
    ensemble, inputs, output = CASES[model]
    with TritonServer(TritonConfig(repo, control_mode="explicit")) as server:
        pgid, prefix, workdir = server.process.pid, server.shm_prefix, server._workdir
        with grpc.InferenceServerClient(server.grpc_url) as client:
            want = client.infer(ensemble, inputs()).as_numpy(output)
        with (
            ReadinessProber(server.http_url, ensemble) as prober,
            Callers(server.grpc_url, ensemble, inputs, output, CALLERS) as load,
        ):
            _wait(lambda: load.good_after(0) >= 2 * CALLERS, "answers before the kill")
            stub = next(p for p in backend_processes(pgid, prefix) if p.model == model)
            killed = time.monotonic()
            os.kill(stub.pid, signal.SIGKILL)
            recoveries = server.supervisor.recoveries
            _wait(lambda: recoveries and recoveries[0].ready is not None, f"{model} reloaded")
            recovery = recoveries[0]
            _wait(lambda: load.good_after(recovery.ready) >= 2 * CALLERS, "answers after the reload")
            probes_until = time.monotonic()
        versions = RepositoryControl(server.http_url, 30).states()
        assert server.supervisor.recoveries == [recovery]  # one death, one reload, nothing else
    # Named where the supervisor's listing had shown the stub; where it had not yet, the death is found
    # by the count of live stubs instead (export/backend_supervisor.py), which names no instance.
    assert recovery.died in ([f"{model}_0_0"], [f"1 of 1 {model} instances"]), recovery.died
    assert recovery.model == model and recovery.attempts == 1
    assert killed < recovery.detected <= recovery.unloaded < recovery.ready
    assert versions[(model, "1")] == versions[(ensemble, "1")] == "READY"  # the version served before

    after_kill = [p for p in prober.probes if killed < p.start < probes_until]
    for field in ("model_ready", "server_ready"):
        # A probe the server did not answer (connection error, timeout) says nothing of readiness.
        answered = [p for p in after_kill if getattr(p, field) is not None]
        assert len(answered) >= 0.9 * len(after_kill), f"{field}: the server answered too few probes"
        answers = [getattr(p, field) for p in answered]
        timeline = _timeline(answered, answers, killed, recovery)
        # Sent after the unload and answered before the reload: a "ready" there would be a lie. The two times
        # are when the supervisor's calls returned, and the server's state moves a few milliseconds off
        # them on a loaded machine (the ensembles built on the model follow its unload after the call
        # returns; a reloaded model reads ready before its load call returns), so a margin at each end.
        margin = STATE_MARGIN * (recovery.ready - recovery.unloaded)
        down = [
            getattr(p, field)
            for p in answered
            if recovery.unloaded + margin < p.start and p.end < recovery.ready - margin
        ]
        assert True not in down, f"{field}: answered ready while the model was down: {timeline}"
        assert _down_once(answers) or (all(answers) and _held(answered, recovery, margin)), (
            f"{field}: {timeline}"
        )
    assert not any(False in (p.model_ready, p.server_ready) for p in after_kill if p.start > recovery.ready)

    failed = [c for c in load.calls if c.output is None]
    assert failed, "the kill failed no call: it did not hit the model under load"
    assert all(killed <= c.end and c.start <= recovery.ready for c in failed), "a call failed outside the gap"
    assert all(ensemble in c.error or model in c.error for c in failed), {c.error for c in failed}
    for call in (c for c in load.calls if c.output is not None):
        np.testing.assert_allclose(call.output, want, rtol=0, atol=1e-6)

    assert wait_gone(pgid) == [] and regions(prefix) == [] and not workdir.exists()


def test_a_stub_that_dies_before_it_is_listed_is_found_by_the_count(python_repo):
    """A load's new stub killed before the supervisor lists it leaves a zombie without a command line:
    the listing after it finds its version READY with fewer live stubs than instances. The supervisor
    lists only at start and after a known stub's death here (rescan_s of an hour), so the killed stub is
    never listed; a known stub killed after it makes the listing happen."""
    hour = SupervisorConfig(rescan_s=3600.0)
    with TritonServer(TritonConfig(python_repo, control_mode="explicit", supervisor=hour)) as server:
        supervisor, pgid, prefix = server.supervisor, server.process.pid, server.shm_prefix
        _wait(lambda: supervisor._next_scan > 0, "the supervisor's first listing")
        with grpc.InferenceServerClient(server.grpc_url) as client:
            client.unload_model("tokenizer")
            # The unloaded stub's exit makes the supervisor list anew: the load comes after that listing.
            _wait(
                lambda: not any(p.model == "tokenizer" for p in supervisor._known),
                "a listing after the unload",
            )
            client.load_model("tokenizer")
            new = next(p for p in backend_processes(pgid, prefix) if p.model == "tokenizer")
            os.kill(new.pid, signal.SIGKILL)
            known = next(p for p in supervisor._known if p.model == "image_preprocess")
            os.kill(known.pid, signal.SIGKILL)
            recoveries = supervisor.recoveries
            _wait(lambda: len(recoveries) == 2 and all(r.ready for r in recoveries), "both reloaded")
            states = RepositoryControl(server.http_url, 30).states()
            answer = client.infer("encode_items", _encode_request()).as_numpy("content")
    died = {r.model: r.died for r in recoveries}
    assert died == {"tokenizer": ["1 of 1 tokenizer instances"], "image_preprocess": ["image_preprocess_0_0"]}
    assert states[("tokenizer", "1")] == states[("image_preprocess", "1")] == "READY"
    assert answer.shape[0] == 1 and np.isfinite(answer).all()
