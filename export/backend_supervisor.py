"""Brings a model back when one of its backend processes dies, so that the server neither fails its
calls forever nor answers "ready" for a model that can answer nothing.

The tritonserver of nvidia-pytriton 0.7.0 (Triton 2.51) runs each Python-backend model instance in a
`triton_python_backend_stub` child process. When one dies (SIGKILL, the OOM killer, a crash in a
native library), the Python backend of that release neither restarts it (the restart of non-decoupled
models was disabled in 24.06) nor reports it: the stub stays a zombie, every request to the model
waits 1 s and fails with "Stub process '<instance>' is not healthy", and the model's readiness, its
ensembles' and the server's (`/v2/models/<m>/ready`, `/v2/health/ready`) keep answering ready.

The supervisor, a thread of the launcher, watches the server's stubs in /proc: a stub's command line
names its model file (`<repo>/<model>/<version>/model.py`), its shared-memory region (which carries
the launcher's prefix, so only this server's stubs count) and its model instance. A stub that is gone
or a zombie while the server still lists its model version READY, and no live stub of the same
instance replaced it, has died (a stub the server stops itself, on an unload or a new version, exits
after its version has left READY). New stubs (a load) are listed every `rescan_s`; one that dies
before it is listed leaves a zombie without a command line, so each listing also counts the live stubs
of every Python-backend version that was READY before it and still is: fewer than the instances the
server runs for it (its config, asked once per set of stubs) means stubs died unseen. (Each listing
reads the versions' states before and after it, so a version that turns READY meanwhile is not counted
before its stubs can be listed.) Then:

- in `explicit` control mode it unloads the model at once (the model, every ensemble that uses it and
  the server's readiness turn not ready), loads it again (the newest valid table version in the
  repository: the one served before, unless a newer one was published meanwhile, which a
  `load_model` would bring too), retrying with backoff while that fails, and loads any model that was
  ready before and is not yet ready again (Triton reloads the ensembles of a loaded model itself);
- in `poll` and `none` modes the server refuses to load or unload models on request, so nothing can
  bring the model back in place: the supervisor reports the death and the launcher stops the server,
  whose exit says why, for a process manager to start it again.

The gap from a death to readiness turning false is one check interval (`interval_s`) plus two HTTP
calls on loopback; calls that reach the model in that gap fail after the backend's 1 s wait. A stub
that dies before it is listed is found by the count at the next listing (within `rescan_s`).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import MMRankError
from export import procfs

STUB = "triton_python_backend_stub"
READY = "READY"


@dataclass(frozen=True)
class BackendProcess:
    """The stub of one model instance: `<stub> <repo>/<model>/<version>/model.py <shm region> <shm
    sizes> <server pid> <backend dir> <ipc handle> <instance> ...`."""

    pid: int
    start: int  # procfs start time: the pid alone may name a later process
    model: str
    version: str
    instance: str  # e.g. item_lookup_0_0

    def alive(self) -> bool:
        return procfs.running(self.pid, self.start)

    def describe(self) -> str:
        return f"{self.instance} (pid {self.pid})"


@dataclass(frozen=True)
class UnseenDeaths:
    """Stubs of a READY model version that died before a listing saw them: a zombie has no command
    line, so only how many is known."""

    model: str
    version: str
    missing: int
    instances: int  # the instances the server runs for the version

    @property
    def instance(self) -> str:
        return f"{self.missing} of {self.instances} {self.model} instances"

    def describe(self) -> str:
        return f"{self.instance} (never listed)"


def backend_processes(server_pid: int, shm_prefix: str) -> list[BackendProcess]:
    """The server's stubs running a model instance (not the short-lived shells and argument-less
    probes the backend starts on the way)."""
    found = []
    for pid in procfs.children(server_pid):
        stat, args = procfs.stat(pid), procfs.cmdline(pid)
        if stat is None or len(args) < 9 or Path(args[0]).name != STUB or not args[2].startswith(shm_prefix):
            continue
        model_file = Path(args[1])
        found.append(
            BackendProcess(pid, stat.start, model_file.parent.parent.name, model_file.parent.name, args[8])
        )
    return found


class RepositoryControl:
    """The server's model repository API over HTTP: which model versions are in which state, load and
    unload, a loaded version's instances. Every failure is an MMRankError naming the call."""

    def __init__(self, http_url: str, timeout_s: float):
        self.http_url, self.timeout_s = http_url, timeout_s

    def _call(self, path: str, body: dict | None = None) -> bytes:
        """GET `path`, or POST `body` (JSON) where given."""
        method = "GET" if body is None else "POST"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://{self.http_url}{path}", data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            try:
                detail = json.loads(detail)["error"]  # Triton's {"error": "..."}
            except (ValueError, KeyError, TypeError):
                pass
            raise MMRankError(f"{method} {path}: {e.code} {detail}") from e
        except (urllib.error.URLError, OSError) as e:
            raise MMRankError(f"{method} {path}: {e}") from e

    def states(self) -> dict[tuple[str, str], str]:
        """(model, version) -> state (READY, LOADING, UNLOADING, UNAVAILABLE) of every indexed version."""
        index = json.loads(self._call("/v2/repository/index", {}))
        return {(m["name"], m.get("version", "")): m.get("state", "") for m in index}

    def load(self, model: str, body: dict | None = None) -> None:
        """Load (or reload) `model`; `body` as the load API takes it (e.g. a config override)."""
        self._call(f"/v2/repository/models/{model}/load", body or {})

    def unload(self, model: str) -> None:
        self._call(f"/v2/repository/models/{model}/unload", {})

    def python_instances(self, model: str, version: str) -> int:
        """How many instances (backend stubs) the loaded `version` of `model` runs in the Python backend;
        0 for other backends and ensembles. A GPU group's count is per GPU it lists."""
        config = json.loads(self._call(f"/v2/models/{model}/versions/{version}/config"))
        if config.get("backend") != "python":
            return 0
        groups = config.get("instance_group") or []
        per_gpu = [len(g.get("gpus") or []) if g.get("kind") == "KIND_GPU" else 1 for g in groups]
        return sum(int(g.get("count", 1)) * max(n, 1) for g, n in zip(groups, per_gpu, strict=True))


def ready_models(states: dict[tuple[str, str], str]) -> set[str]:
    return {model for (model, _), state in states.items() if state == READY}


def ready_versions(states: dict[tuple[str, str], str]) -> set[tuple[str, str]]:
    return {key for key, state in states.items() if state == READY}


@dataclass
class SupervisorConfig:
    interval_s: float = 0.1  # how often the known stubs are checked: the bound on noticing a death
    rescan_s: float = 1.0  # how often the server's children are listed anew (new stubs after a load)
    retry_s: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 30.0)  # waits after failed loads, the last repeated
    call_timeout_s: float = 300.0  # one load or unload: a python-backend model imports onnxruntime


@dataclass
class Recovery:
    """A model brought back (or being brought back) after backend processes of it died. Times are
    time.monotonic() of this process."""

    model: str
    died: list[str]  # the instances found dead
    detected: float
    unloaded: float | None = None
    ready: float | None = None
    attempts: int = 0  # loads tried
    error: str = ""  # the last failed call
    due: float = field(default=0.0, repr=False)  # when the next load may be tried


class BackendSupervisor:
    """Watches one server's backend stubs from a daemon thread (see the module docstring).

    `recover`: reload a model whose stub died (explicit control mode); otherwise call `unrecoverable`
    with the dead stubs (BackendProcess, or UnseenDeaths) and stop watching. `report` gets one line per
    event."""

    def __init__(
        self,
        server_pid: int,
        http_url: str,
        shm_prefix: str,
        *,
        recover: bool,
        unrecoverable: Callable[[list[BackendProcess | UnseenDeaths]], None],
        report: Callable[[str], None],
        config: SupervisorConfig | None = None,
    ):
        self.config = config or SupervisorConfig()
        self.server_pid, self.shm_prefix = server_pid, shm_prefix
        self.control = RepositoryControl(http_url, self.config.call_timeout_s)
        self.recover, self.unrecoverable, self.report = recover, unrecoverable, report
        self.recoveries: list[Recovery] = []
        self._pending: dict[str, Recovery] = {}
        self._wanted: set[str] = set()  # models ready before a death, to be ready again after it
        self._known: list[BackendProcess] = []
        self._counted: dict[tuple[str, str], frozenset[int]] = {}  # versions whose stubs were all seen
        self._next_scan = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="backend-supervisor", daemon=True)

    def start(self) -> BackendSupervisor:
        self._known = backend_processes(self.server_pid, self.shm_prefix)  # a stub dying from now on is known
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching; a load in flight ends with the server (stop it, then join)."""
        self._stop.set()

    def join(self, timeout_s: float = 10.0) -> None:
        self._thread.join(timeout_s)

    def _run(self) -> None:
        server = procfs.stat(self.server_pid)
        said = ""
        while not self._stop.wait(self.config.interval_s):
            if server is None or not procfs.running(self.server_pid, server.start):
                return  # the server itself ended: whoever started it sees that
            try:
                self._check()
                self._load_pending()
                said = ""
            except MMRankError as e:  # the server did not answer: try again on the next tick, say it once
                if not self._stop.is_set() and str(e) != said:
                    self.report(f"backend supervisor: {e}")
                said = str(e)

    def _check(self) -> None:
        dead = [p for p in self._known if not p.alive()]
        if not dead and time.monotonic() < self._next_scan:
            return
        before = ready_versions(self.control.states())  # their stubs had started: the listing has them
        listed = backend_processes(self.server_pid, self.shm_prefix)
        # A known stub the listing misses has died since the check above (a zombie has no command line)
        # only if it is not running: a listing is no atomic snapshot of the server's children.
        unlisted = [p for p in self._known if p not in listed and p not in dead]
        dead += [p for p in unlisted if not p.alive()]
        found = listed + [p for p in unlisted if p not in dead]
        states = self.control.states()  # raises before _known forgets the dead: they are seen again
        live = [p for p in found if p.alive()]
        instances = {(p.model, p.version, p.instance) for p in live}
        crashed: list[BackendProcess | UnseenDeaths] = [
            p
            for p in dead
            if states.get((p.model, p.version)) == READY and (p.model, p.version, p.instance) not in instances
        ]
        crashed += self._unseen(before & ready_versions(states), live, {p.model for p in crashed})
        self._known = found
        self._next_scan = time.monotonic() + self.config.rescan_s
        if self._stop.is_set():  # stopping: the stubs end with the server
            return
        if crashed and self.recover:
            self._unload(crashed, states)
        elif crashed:
            self._stop.set()
            self.unrecoverable(crashed)

    def _unseen(
        self, ready: set[tuple[str, str]], live: list[BackendProcess], crashed: set[str]
    ) -> list[UnseenDeaths]:
        """Of the versions `ready` (READY before the listing and after it), those with fewer live stubs
        than instances. The count is asked of the server once per set of live stubs (a load or a death
        changes the set); models already `crashed` are left to the known stubs."""
        self._counted = {key: pids for key, pids in self._counted.items() if key in ready}
        unseen = []
        for model, version in sorted(ready):
            stubs = [p for p in live if (p.model, p.version) == (model, version)]
            pids = frozenset(p.pid for p in stubs)
            if model in crashed or self._counted.get((model, version)) == pids:
                continue
            try:
                expected = self.control.python_instances(model, version)
            except MMRankError:  # unloaded meanwhile: the next listing looks again
                continue
            have = len({p.instance for p in stubs})
            if have >= expected:
                self._counted[(model, version)] = pids
            else:
                unseen.append(UnseenDeaths(model, version, expected - have, expected))
        return unseen

    def _unload(
        self, crashed: list[BackendProcess | UnseenDeaths], states: dict[tuple[str, str], str]
    ) -> None:
        self._wanted |= ready_models(states)
        for model in sorted({p.model for p in crashed}):
            dead = [p for p in crashed if p.model == model]
            recovery = Recovery(model, [p.instance for p in dead], time.monotonic())
            names = ", ".join(p.describe() for p in dead)
            self.report(f"backend: {names} of {model} version {dead[0].version} died; reloading {model}")
            try:
                self.control.unload(model)
                recovery.unloaded = time.monotonic()
            except MMRankError as e:  # the load below replaces it all the same
                recovery.error = str(e)
            self.recoveries.append(recovery)
            self._pending[model] = recovery

    def _load_pending(self) -> None:
        for model, recovery in list(self._pending.items()):
            if self._stop.is_set() or time.monotonic() < recovery.due:
                continue
            recovery.attempts += 1
            try:
                self.control.load(model)
            except MMRankError as e:
                if self._stop.is_set():
                    return
                retry = self.config.retry_s[min(recovery.attempts, len(self.config.retry_s)) - 1]
                recovery.error, recovery.due = str(e), time.monotonic() + retry
                self.report(f"backend: loading {model} failed ({e}); trying again in {retry:g} s")
                continue
            recovery.ready, self._next_scan = time.monotonic(), 0.0  # watch the new stubs from the next tick
            del self._pending[model]
            self.report(
                f"backend: {model} ready again, {recovery.ready - recovery.detected:.1f} s after the death"
            )
        if not self._pending and self._wanted:
            missing = self._wanted - ready_models(self.control.states())
            self._wanted = set()
            for model in sorted(missing):
                self._pending[model] = Recovery(model, [], time.monotonic())
