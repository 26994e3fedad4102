"""Start the `tritonserver` binary that ships inside the `nvidia-pytriton` wheel, on loopback only.

The wheel carries the server (`pytriton/tritonserver/bin`), its shared libraries
(`nvidia_pytriton.libs`), the Python backend (`backends/python`) and one backend stub per Python
version (`python_backend_stubs/X.Y`). The launcher assembles a backend directory for the running
interpreter's version, binds every endpoint to 127.0.0.1, waits for readiness and shuts the server
down cleanly. `pytriton` itself is never imported: its client side needs packages we do not install.

Where Triton's native onnxruntime backend is built (export/native_backend.py, `make setup`), the backend
directory holds it too (`onnxruntime/`, hard links to the build), so `platform: "onnxruntime_onnx"` models
serve beside the Python ones; a repository with such models and no build is refused before the server
starts, naming the fix.

The stub's embedded Python finds its environment through the `python` first on PATH. By default that
is this project's venv (below); `python_env` (`mmrank serve --python-env VENV`) runs the models with
another environment's Python and nothing added, with the stub built for that Python's version: a venv
holding only what the rendered repository's README lists (numpy<2, onnxruntime, tokenizers, Pillow)
serves it, as a stock server would.

The stubs of
nvidia-pytriton 0.7.0 are built with a pybind11 that predates NumPy 2's ABI: under NumPy 2 every
tensor crossing the stub is corrupted (inputs read as copies of their first element, outputs arrive
empty; measured here). So the models run in a small "stub environment", `<venv>/triton-env`: a venv
with NumPy 1.26 whose site-packages then adds this venv's (a .pth line), so the models import this
project, onnxruntime and tokenizers while NumPy resolves to 1.26. `prepare_stub_env` creates it once
(pip, from PyPI); `python -m export.triton_launcher --prepare-env` does it ahead of time.

Stopping never leaks: the server runs in a session of its own with PR_SET_PDEATHSIG, so it gets SIGTERM
when the launcher dies, even by SIGKILL; stop() (SIGINT/SIGTERM before or after ready) waits for it, then
kills whatever is left of its session (backend stubs that were still loading) and removes the shared
memory regions its Python backend created (their names carry a prefix of this launcher's own).
A SIGKILLed launcher cannot clean up; its work folder and regions carry its pid and start time, and the
next launcher removes those of launchers that no longer run (export/launcher_files.py).

While the server runs, a supervisor thread watches its backend stubs: when one dies, the model is
reloaded in place (explicit control mode) or the server is stopped, saying why (poll and none modes, which
cannot load a model on request); export/backend_supervisor.py has the details and the readiness bounds.

A bad newest item table version (one that does not read, has the wrong widths or, native, a graph file
that is not whole or holds another version) never blocks a (re)start: the python / torch lookup serves
the newest valid older table itself; for the native lookup graph (`rank` itself, or item_lookup before
a ranking model), whose versions Triton loads, the launcher checks the versions' files first
(`check_table_versions`) and, in explicit mode, loads that model with a version policy naming the newest
one that serves, then the ensembles that run it (poll and none modes cannot pass over a version, and
refuse to start with a line saying so).

The server's Python never writes bytecode (PYTHONDONTWRITEBYTECODE, and the rendered repository's own
`__pycache__` placeholder files, export/repository.py `write_python_model`, for stubs that write it
anyway): `__pycache__` folders in the version folders would read as changed models and make poll mode
reload every model.

On a host without a CUDA driver the server (a GPU build) still logs two kinds of E-level lines, whatever
its flags: "CudaDriverHelper has not been initialized" at start and "unable to create stream for
<ensemble>" at each ensemble's load (its scheduler creates a CUDA stream unconditionally). Both are
harmless there: nothing uses CUDA, the models run on the CPU and the ensembles pass tensors in CPU
memory. `mmrank serve` says so once it is ready, and `log_tail` leaves them out of error messages. The
pinned-memory pool and GPU metrics, which would log a warning and an NVML error, are switched off there.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.cpu_latency import CpuLatencyHold
from common.errors import MMRankError
from export.backend_supervisor import (
    BackendProcess,
    BackendSupervisor,
    RepositoryControl,
    SupervisorConfig,
    UnseenDeaths,
)
from export.launcher_files import make_workdir, shm_prefix
from export.native_backend import NAME as NATIVE_NAME
from export.native_backend import NativeBackend, backends_home

CONTROL_MODES = ("none", "poll", "explicit")
LOG_ERROR = re.compile(r"E\d{4} ")  # an E-level line of the server's log: "E1207 02:19:05.306 ..."
# The E-level log lines of a healthy start on a host without a CUDA driver (see the module docstring).
NO_CUDA_ERRORS = ("CudaDriverHelper has not been initialized", "unable to create stream for ")
NO_CUDA_NOTE = (
    "no CUDA driver on this host: the server logs E-level lines 'CudaDriverHelper has not been initialized' "
    "and 'unable to create stream for <ensemble>' all the same; they are harmless here (the models run on "
    "the CPU and nothing uses CUDA)"
)


@dataclass
class TritonConfig:
    """How to run the server. A port of 0 takes a free one on 127.0.0.1."""

    repository: Path
    grpc_port: int = 0
    http_port: int = 0
    metrics_port: int = 0
    # explicit: every model loads at start, load/unload on request, and a model whose backend process dies
    # is reloaded in place; poll: the server reloads changed models itself, none: never; in both a dead
    # backend process stops the server (export/backend_supervisor.py says why)
    control_mode: str = "explicit"
    poll_secs: int = 2  # repository poll interval in poll mode
    start_timeout_s: float = 180.0  # readiness wait: python-backend models import onnxruntime on load
    exit_timeout_s: int = 10  # server's own grace period for in-flight requests on shutdown
    log_file: Path | None = None  # server log; None = a file in the launcher's work folder
    extra_args: list[str] = field(default_factory=list)
    python_env: Path | None = None  # venv whose Python runs the models, nothing added; None = this project's
    # Run the models with this interpreter even under NumPy 2, without the NumPy 1.26 stub environment:
    # only models that move tensors through DLPack (the torch backend's item_lookup) read and write
    # correctly then. For GPU machines with NumPy 2 and no package index to build the stub environment.
    dlpack_only: bool = False
    # CPUs the server and its backend stubs may run on (`mmrank serve --cpus 0`); None = every CPU this
    # process may use. A request crosses several server threads (gRPC, the model instance, the response);
    # on one CPU those hand-offs skip the cross-CPU wake-ups a VM makes costly, at one CPU's throughput.
    cpus: frozenset[int] | None = None
    # Hold the machine's CPU wake-up latency limit at this many microseconds while the server runs
    # (`mmrank serve --cpu-latency-us 0`; common/cpu_latency.py, root only); None = leave the machine's
    # idle states as they are. 0 keeps idle CPUs polling: no wake-up through the hypervisor per hand-off.
    cpu_latency_us: int | None = None
    supervise: bool = True  # watch the backend processes (export/backend_supervisor.py)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)


@dataclass(frozen=True)
class TritonDistribution:
    """The files of the server distribution inside the nvidia-pytriton wheel."""

    binary: Path
    libs: Path
    python_backend: Path
    stubs: Path  # python_backend_stubs/X.Y/triton_python_backend_stub, one per Python version

    @staticmethod
    def installed() -> bool:
        """Whether nvidia-pytriton (which carries the server) is installed at all."""
        return importlib.util.find_spec("pytriton") is not None

    @classmethod
    def find(cls) -> TritonDistribution:
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise MMRankError("tritonserver not found: install nvidia-pytriton (`make setup` does)")
        root = Path(next(iter(spec.submodule_search_locations)))
        dist = root / "tritonserver"
        found = cls(
            binary=dist / "bin" / "tritonserver",
            libs=root.parent / "nvidia_pytriton.libs",
            python_backend=dist / "backends" / "python",
            stubs=dist / "python_backend_stubs",
        )
        for path in (found.binary, found.libs, found.python_backend, found.stubs):
            if not path.exists():
                raise MMRankError(f"incomplete tritonserver distribution: {path} is missing")
        return found

    def check_runs(self) -> None:
        """Run the binary for its usage text: fails when this machine cannot execute it at all
        (architecture, glibc, missing system libraries), before any model is involved."""
        env = {**os.environ, "LD_LIBRARY_PATH": str(self.libs)}
        try:
            done = subprocess.run(
                [str(self.binary), "--help"], capture_output=True, text=True, env=env, timeout=60, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise MMRankError(f"{self.binary} cannot run here ({type(e).__name__}: {e})") from e
        if "--model-repository" not in done.stdout + done.stderr:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise MMRankError(f"{self.binary} cannot run here (exit {done.returncode}: {tail[0]})")

    def stub(self, python_version: str) -> Path:
        path = self.stubs / python_version / "triton_python_backend_stub"
        if not path.is_file():
            have = sorted(p.name for p in self.stubs.iterdir())
            raise MMRankError(
                f"the tritonserver has no Python backend stub for Python {python_version} ({have})"
            )
        return path


def cuda_driver() -> bool:
    """Whether the NVIDIA driver's CUDA library loads here, as it does on a GPU host."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def error_lines(log: str) -> list[str]:
    """The E-level lines of a server log, less the ones a host without a CUDA driver always gets."""
    return [
        line
        for line in log.splitlines()
        if LOG_ERROR.match(line) and not any(known in line for known in NO_CUDA_ERRORS)
    ]


def free_port() -> int:
    """A port the kernel reports free on 127.0.0.1 (bound and released, so a race is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def assemble_backends(
    dist: TritonDistribution, out: Path, python_version: str, native: NativeBackend | None = None
) -> Path:
    """`out/python/` with the backend library, its utils module and the stub for `python_version`, and
    `out/onnxruntime/` with the `native` backend's files where one is given."""
    python = out / "python"
    python.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(dist.python_backend / name, python / name)
    shutil.copy2(dist.stub(python_version), python / "triton_python_backend_stub")
    if native is not None:
        native.link_into(out / NATIVE_NAME)
    return out


def native_models(repository: Path) -> list[str]:
    """The models of `repository` that Triton runs with the native onnxruntime backend."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    found = []
    for path in sorted(repository.glob("*/config.pbtxt")):
        try:
            config = text_format.Parse(path.read_text(), mc.ModelConfig())
        except (OSError, text_format.ParseError):
            continue  # the server names a broken config itself, with the model
        if config.platform == "onnxruntime_onnx" or config.backend == NATIVE_NAME:
            found.append(path.parent.name)
    return found


def native_backend(repository: Path) -> NativeBackend | None:
    """The built native backend, which every server gets; None where it is not built and no model of
    `repository` needs it (python-backend repositories serve without it), else MMRankError."""
    try:
        return NativeBackend.find()
    except MMRankError:
        needs = native_models(repository)
        if needs:
            raise MMRankError(
                f"{repository}: {', '.join(needs)} run on Triton's native onnxruntime backend, which is not "
                f"built (nothing in {backends_home() / NATIVE_NAME}): run `make setup`"
            ) from None
        return None


STUB_NUMPY = "numpy>=1.26,<2"
STUB_ENV = "triton-env"
READY = ".mmrank-ready"


def _numpy_major(python: str | Path) -> int:
    out = subprocess.run(
        [str(python), "-c", "import numpy; print(numpy.__version__)"],
        capture_output=True,
        text=True,
        check=False,
    )
    return int(out.stdout.split(".")[0]) if out.returncode == 0 and out.stdout else -1


def stub_env_path() -> Path:
    return Path(os.environ.get("MMRANK_TRITON_ENV", Path(sys.prefix) / STUB_ENV))


def prepare_stub_env(path: Path | None = None) -> Path:
    """The `bin/` folder whose python the backend stubs should run with (see the module docstring):
    this interpreter's own when its NumPy is 1.x, else the stub environment, created if missing."""
    import numpy

    if int(numpy.__version__.split(".")[0]) < 2:
        return Path(sys.executable).parent
    path = Path(path or stub_env_path())
    if (path / READY).is_file():
        return path / "bin"
    site_packages = next(
        p for p in map(Path, sys.path) if p.name == "site-packages" and str(p).startswith(sys.prefix)
    )
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        steps = [
            [sys.executable, "-m", "venv", str(tmp)],
            [
                str(tmp / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                STUB_NUMPY,
            ],
        ]
        for cmd in steps:
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise MMRankError(
                    f"cannot prepare tritonserver's Python environment ({' '.join(cmd[-3:])}): "
                    f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}"
                )
        own = next((tmp / "lib").glob("python3*/site-packages"))
        (own / "zz_mmrank_project.pth").write_text(f"import site; site.addsitedir({str(site_packages)!r})\n")
        if _numpy_major(tmp / "bin" / "python") != 1:
            raise MMRankError(f"{tmp}: the stub environment does not resolve NumPy 1.x")
        (tmp / READY).write_text(STUB_NUMPY + "\n")
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path / "bin"


@dataclass(frozen=True)
class ModelPython:
    """The Python that runs the models: the bin/ folder put first on PATH, its X.Y version (which stub)
    and the folder of its libpython, which the stub links against (None: the system's)."""

    bin: Path
    version: str
    libdir: Path | None = None


def check_python_env(venv: Path) -> ModelPython:
    """`--python-env VENV` as a ModelPython; MMRankError when it is not a venv or its NumPy is not the 1.x
    the backend stub needs."""
    python = Path(venv) / "bin" / "python"
    if not python.is_file():
        raise MMRankError(f"--python-env {venv}: no bin/python (not a virtual environment)")
    probe = (
        "import sys, sysconfig, numpy; "
        "print(f'{sys.version_info[0]}.{sys.version_info[1]}', numpy.__version__, sysconfig.get_config_var('LIBDIR'))"
    )
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise MMRankError(f"--python-env {venv}: cannot import numpy ({tail})")
    version, numpy_version, libdir = done.stdout.split()
    if int(numpy_version.split(".")[0]) >= 2:
        raise MMRankError(
            f"--python-env {venv}: numpy {numpy_version}; the tritonserver's Python backend stub needs numpy<2"
        )
    return ModelPython(Path(venv) / "bin", version, Path(libdir))


def model_python(config: TritonConfig) -> ModelPython:
    if config.python_env is not None:
        return check_python_env(Path(config.python_env))
    libdir = sysconfig.get_config_var("LIBDIR")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    bin_dir = Path(sys.executable).parent if config.dlpack_only else prepare_stub_env()
    return ModelPython(bin_dir, version, Path(libdir) if libdir else None)


def check_can_start() -> None:
    """Raise MMRankError saying why the installed server cannot start here: the binary does not run, or
    the stub environment cannot be prepared."""
    TritonDistribution.find().check_runs()
    prepare_stub_env()


def server_env(dist: TritonDistribution, python: ModelPython) -> dict[str, str]:
    """The caller's environment with the server's and libpython's libraries, the models' python first on
    PATH, no Python path of the caller's (the models see their environment and nothing added) and no
    bytecode written."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    libs = (str(dist.libs), str(python.libdir or ""), env.get("LD_LIBRARY_PATH"))
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
    env["PATH"] = os.pathsep.join(p for p in (str(python.bin), env.get("PATH")) if p)
    return env


@dataclass(frozen=True)
class TableVersions:
    """The table model's version folders, checked at start."""

    model: str = "item_lookup"  # the versioned model: item_lookup, or the native `rank` itself
    newest: int | None = None
    served: int | None = None  # the newest version that serves
    passed_over: tuple[str, ...] = ()  # each newer version passed over, and why
    native: bool = False  # the lookup graph, whose versions Triton loads itself

    @property
    def skipped(self) -> tuple[str, ...]:
        """One line for each version passed over, naming the one that serves instead."""
        if self.served is None:
            return self.passed_over
        return tuple(f"{line}; serving item table version {self.served}" for line in self.passed_over)

    @property
    def pinned(self) -> bool:
        """Whether the table model must load with a version policy naming `served`: a native lookup
        whose newest version does not serve (Triton would try that one and fail)."""
        return self.native and self.served != self.newest


def check_table_versions(repository: Path) -> TableVersions:
    """Which table version serves and which newer ones are passed over. The python / torch
    lookup passes over an unreadable or wrong-width table itself (model_repository/models/item_lookup.py
    serves the newest valid one in its place); of the native lookup graph, Triton loads the versions
    itself, so the launcher passes over a version whose graph is not whole (export/lookup_graph.py
    `check_files`: it parses, the server's ONNX Runtime reads it, it holds its version, its external
    data is all there), without loading it: a version's graph holds the table, and a full check
    (`NativeLookup.check`, run when `mmrank table publish` writes a version) would hold it in this
    process beside the server. MMRankError where no native version serves."""
    from export.lookup_graph import check_files
    from export.repository import config_widths, is_native, read_config, table_model
    from model_repository import item_table as it

    model = table_model(repository)
    config = read_config(model)
    versions = it.table_versions(model) if config is not None else []
    if not versions:
        return TableVersions(model.name)
    if not is_native(config):
        try:
            _, served, skipped = it.newest_valid_table(model, versions[-1], *config_widths(config))
        except MMRankError as e:
            return TableVersions(model.name, versions[-1], passed_over=(str(e),))
        return TableVersions(model.name, versions[-1], served, tuple(skipped))
    skipped = []
    for version in reversed(versions):
        try:
            check_files(model / str(version), version)
        except MMRankError as e:
            skipped.append(f"item table version {version} skipped: {e}")
            continue
        return TableVersions(model.name, versions[-1], version, tuple(skipped), native=True)
    raise MMRankError(f"{model}: no item table version serves ({'; '.join(skipped)})")


def dependents(repository: Path, name: str) -> set[str]:
    """The ensembles of the repository that run `name`, directly or through another ensemble."""
    from export.repository import read_config

    configs = {p.parent.name: read_config(p.parent) for p in repository.glob("*/config.pbtxt")}
    found: set[str] = set()
    while True:
        more = {
            model
            for model, config in configs.items()
            if model not in found
            and any(step.model_name in found | {name} for step in config.ensemble_scheduling.step)
        }
        if not more:
            return found
        found |= more


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def parse_cpus(text: str, option: str = "--cpus") -> frozenset[int]:
    """'0', '0-3' or '0,2-3' -> those CPU numbers, each one this process may run on; MMRankError naming
    `option` and the problem otherwise."""
    allowed = os.sched_getaffinity(0)
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError:
            raise MMRankError(f"{option} {text!r}: expected CPU numbers such as 0, 0-3 or 0,2-3") from None
        if low < 0 or high < low:
            raise MMRankError(f"{option} {text!r}: {part.strip()!r} is not a CPU range")
        cpus.update(range(low, high + 1))
    if not cpus <= allowed:
        raise MMRankError(
            f"{option} {text!r}: CPU {min(cpus - allowed)} is not one this process may use "
            f"({', '.join(map(str, sorted(allowed)))})"
        )
    return frozenset(cpus)


def _die_with(parent: int, cpus: frozenset[int] | None = None):
    """preexec_fn for the server: SIGTERM when `parent` (the launcher) dies, however it dies; on `cpus`
    where given (its threads and the backend stubs it starts inherit them)."""
    libc = ctypes.CDLL(None, use_errno=True)  # loaded in the parent: nothing to import after fork

    def arm() -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())  # the launcher defers signals around the fork
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os._exit(1)
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    return arm


@contextlib.contextmanager
def signals_deferred():
    """SIGINT and SIGTERM wait until the block ends (a second Ctrl-C must not interrupt a shutdown)."""
    stops = {signal.SIGINT, signal.SIGTERM}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _open_log(path: Path):
    try:
        return open(path, "wb")
    except OSError as e:
        raise MMRankError(f"{path}: cannot write the server log ({e.strerror})") from e


class TritonServer:
    """A running tritonserver process; use as a context manager or call start() / stop()."""

    def __init__(self, config: TritonConfig, report: Callable[[str], None] | None = None):
        if config.control_mode not in CONTROL_MODES:
            raise MMRankError(
                f"unknown model control mode {config.control_mode!r}; expected one of {CONTROL_MODES}"
            )
        repo = Path(config.repository)
        if not repo.is_dir():
            raise MMRankError(f"{repo}: model repository not found (render one with `mmrank repo`)")
        self.config = config
        self.report = report or _to_stderr  # the supervisor's event lines
        self.repository = repo.resolve()
        self.grpc_port = config.grpc_port or free_port()
        self.http_port = config.http_port or free_port()
        self.metrics_port = config.metrics_port or free_port()
        self.process: subprocess.Popen | None = None
        self._workdir: Path | None = None
        self.log_path: Path | None = None
        self.shm_prefix = shm_prefix(self)
        self.supervisor: BackendSupervisor | None = None
        self.failure: str | None = None  # why the launcher stopped the server itself
        self.latency_hold = None if config.cpu_latency_us is None else CpuLatencyHold(config.cpu_latency_us)
        self.tables = check_table_versions(self.repository)
        self.skipped = self.tables.skipped  # bad newest table versions, said at start
        if self.tables.pinned and config.control_mode != "explicit":
            raise MMRankError(
                f"{self.tables.model}: {self.tables.passed_over[0]}: the native lookup cannot pass over a "
                f"version in {config.control_mode} mode (Triton loads the newest): remove it, or serve with "
                f"--control-mode explicit, which loads version {self.tables.served}"
            )

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def command(self, backends: Path) -> list[str]:
        c = self.config
        args = [
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={c.exit_timeout_s}",
            f"--model-control-mode={c.control_mode}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]
        if c.control_mode == "explicit" and self.tables.pinned:  # the table model and rank come after
            later = {self.tables.model, *dependents(self.repository, self.tables.model)}
            models = sorted(p.parent.name for p in self.repository.glob("*/config.pbtxt"))
            args += [f"--load-model={name}" for name in models if name not in later]
        elif c.control_mode == "explicit":
            args.append("--load-model=*")
        if c.control_mode == "poll":
            args.append(f"--repository-poll-secs={c.poll_secs}")
        if not cuda_driver():  # neither can work; each would log a warning or an error at start
            args += ["--pinned-memory-pool-byte-size=0", "--allow-gpu-metrics=false"]
        return [*args, *c.extra_args]

    def start(self) -> TritonServer:
        try:
            dist = TritonDistribution.find()
            python = model_python(self.config)
            native = native_backend(self.repository)
            if self.latency_hold is not None:
                self.latency_hold.acquire()
            with signals_deferred():  # the process handle is recorded before a stop can ask for it
                self._workdir = make_workdir()
                backends = assemble_backends(dist, self._workdir / "backends", python.version, native)
                self.log_path = Path(self.config.log_file or self._workdir / "tritonserver.log")
                with _open_log(self.log_path) as log:
                    # A session of its own, so a stop can end the server's backend stubs with it.
                    self.process = subprocess.Popen(
                        [str(dist.binary), *self.command(backends)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=server_env(dist, python),
                        start_new_session=True,
                        preexec_fn=_die_with(os.getpid(), self.config.cpus),
                    )
            self._wait_ready()
            if self.tables.pinned:
                self._load_pinned()
            if self.config.supervise:
                self.supervisor = self._supervise()
        except BaseException:
            self.stop()
            raise
        return self

    def _load_pinned(self) -> None:
        """The table model with a version policy naming the version that serves (the repository's
        config otherwise), then the ensembles that run it, which keep that version loaded."""
        from google.protobuf import json_format

        from export.repository import read_config

        model = self.tables.model
        config = read_config(self.repository / model)
        config.version_policy.Clear()
        config.version_policy.specific.versions.append(self.tables.served)
        control = RepositoryControl(self.http_url, self.config.start_timeout_s)
        control.load(model, {"parameters": {"config": json_format.MessageToJson(config)}})
        for name in sorted(dependents(self.repository, model)):
            control.load(name)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.start_timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise MMRankError(f"tritonserver exited with code {code} while starting: {self.log_tail()}")
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            time.sleep(0.25)
        raise MMRankError(
            f"tritonserver not ready after {self.config.start_timeout_s:.0f} s: {self.log_tail()}"
        )

    def _supervise(self) -> BackendSupervisor:
        return BackendSupervisor(
            self.process.pid,
            self.http_url,
            self.shm_prefix,
            recover=self.config.control_mode == "explicit",
            unrecoverable=self._backend_died,
            report=self.report,
            config=self.config.supervisor,
        ).start()

    def _backend_died(self, dead: list[BackendProcess | UnseenDeaths]) -> None:
        """In poll or none mode: no model can be loaded on request, so stop the server, saying why."""
        names = ", ".join(p.describe() for p in dead)
        self.failure = (
            f"the backend process of {names} died; in model control mode {self.config.control_mode!r} the "
            "server cannot reload a model in place (explicit mode does), so the launcher stopped it"
        )
        self.report(f"backend: {self.failure}")
        process = self.process
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)

    def log_tail(self, lines: int = 8) -> str:
        """The last E-level lines of the log (`error_lines`), else the last lines that say something,
        joined on one line for error messages."""
        if self.log_path is None or not self.log_path.is_file():
            return "(no log)"
        text = self.log_path.read_text(errors="replace")
        useful = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith(("+", "|"))]
        errors = [ln.strip() for ln in error_lines(text)]
        return " | ".join((errors or useful)[-lines:])

    def stop(self) -> int | None:
        """SIGTERM and wait for the server's own exit timeout (SIGKILL after it), then SIGKILL what is
        left of its session and remove its shared-memory regions. Signals wait until it is done."""
        with signals_deferred():
            code = None
            if self.supervisor is not None:  # first, so that the stubs' exits read as no deaths
                self.supervisor.stop()
            if self.process is not None:
                if self.process.poll() is None:
                    self.process.send_signal(signal.SIGTERM)
                    try:
                        self.process.wait(timeout=self.config.exit_timeout_s + 15)
                    except subprocess.TimeoutExpired:
                        self.process.kill()
                        self.process.wait()
                with contextlib.suppress(ProcessLookupError):  # stubs still loading outlive the server
                    os.killpg(self.process.pid, signal.SIGKILL)
                code = self.process.returncode
                self.process = None
            if self.supervisor is not None:
                self.supervisor.join()
                self.supervisor = None
            for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
                region.unlink(missing_ok=True)
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None
            if self.latency_hold is not None:
                self.latency_hold.release()
        return code

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def serve(config: TritonConfig) -> int:
    """Run the server in the foreground until Ctrl-C or SIGTERM; returns the server's exit code."""
    for what, port in (
        ("grpc", config.grpc_port),
        ("http", config.http_port),
        ("metrics", config.metrics_port),
    ):
        if port and not _port_free(port):
            raise MMRankError(f"--{what}-port {port}: 127.0.0.1:{port} is already in use")
    server = TritonServer(config, report=lambda line: print(line, flush=True))
    for line in server.skipped:
        print(f"{server.tables.model}: {line}", flush=True)
    # SIGTERM stops like Ctrl-C, at any moment; SIGINT is set too, since a shell starting a background
    # job (`mmrank serve &` in a script) hands it down ignored and `kill -INT` would then do nothing.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            server.start()
            print(
                f"tritonserver ready on {server.repository}: grpc {server.grpc_url}, "
                f"http {server.http_url}, metrics 127.0.0.1:{server.metrics_port}; log {server.log_path} "
                "(Ctrl-C stops it)",
                flush=True,
            )
            if not cuda_driver():
                print(f"tritonserver: {NO_CUDA_NOTE}", flush=True)
            if server.latency_hold is not None:
                print(f"tritonserver: {server.latency_hold.describe()} while it runs", flush=True)
            while server.process.poll() is None:
                time.sleep(0.5)
            raise MMRankError(
                server.failure
                or f"tritonserver exited with code {server.process.returncode}: {server.log_tail()}"
            )
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def cli(args) -> int:
    """`mmrank serve`: the repository on loopback, in the foreground."""
    log = Path(args.log) if args.log else None
    return serve(
        TritonConfig(
            Path(args.repo),
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            metrics_port=args.metrics_port,
            control_mode=args.control_mode,
            log_file=log,
            python_env=Path(args.python_env) if args.python_env else None,
            cpus=parse_cpus(args.cpus) if args.cpus else None,
            cpu_latency_us=args.cpu_latency_us,
        )
    )


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="tritonserver from nvidia-pytriton, on loopback")
    p.add_argument("--prepare-env", action="store_true", help="create the stub environment and exit")
    args = p.parse_args(argv)
    if not args.prepare_env:
        p.error("pass --prepare-env (serving is `mmrank serve --repo DIR`)")
    print(f"stub python: {prepare_stub_env() / 'python'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
