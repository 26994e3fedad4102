"""Start the `tritonserver` binary that ships inside the `nvidia-pytriton` wheel, on loopback only.

The wheel carries the server (`pytriton/tritonserver/bin`), its shared libraries
(`nvidia_pytriton.libs`), the Python backend (`backends/python`) and one backend stub per Python
version (`python_backend_stubs/X.Y`). The launcher assembles a backend directory for the running
interpreter's version, binds every endpoint to 127.0.0.1, waits for readiness and shuts the server
down cleanly. `pytriton` itself is never imported: its client side needs packages we do not install.

The stub's embedded Python finds its environment through the `python` first on PATH. The stubs of
nvidia-pytriton 0.7.0 are built with a pybind11 that predates NumPy 2's ABI: under NumPy 2 every
tensor crossing the stub is corrupted (inputs read as copies of their first element, outputs arrive
empty; measured here). So the models run in a small "stub environment", `<venv>/triton-env`: a venv
with NumPy 1.26 whose site-packages then adds this venv's (a .pth line), so the models import this
project, onnxruntime and tokenizers while NumPy resolves to 1.26. `prepare_stub_env` creates it once
(pip, from PyPI); `python -m export.triton_launcher --prepare-env` does it ahead of time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from mmrank.errors import MMRankError

CONTROL_MODES = ("none", "poll", "explicit")


@dataclass
class TritonConfig:
    """How to run the server. A port of 0 takes a free one on 127.0.0.1."""

    repository: Path
    grpc_port: int = 0
    http_port: int = 0
    metrics_port: int = 0
    control_mode: str = "none"  # none | poll | explicit (explicit loads every model at start)
    poll_secs: int = 2  # repository poll interval in poll mode
    start_timeout_s: float = 180.0  # readiness wait: python-backend models import onnxruntime on load
    exit_timeout_s: int = 10  # server's own grace period for in-flight requests on shutdown
    log_file: Path | None = None  # server log; None = a file in the launcher's work folder
    extra_args: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TritonDistribution:
    """The files of the server distribution inside the nvidia-pytriton wheel."""

    binary: Path
    libs: Path
    python_backend: Path
    stub: Path

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
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        found = cls(
            binary=dist / "bin" / "tritonserver",
            libs=root.parent / "nvidia_pytriton.libs",
            python_backend=dist / "backends" / "python",
            stub=dist / "python_backend_stubs" / version / "triton_python_backend_stub",
        )
        for path in (found.binary, found.libs, found.python_backend, found.stub):
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


def free_port() -> int:
    """A port the kernel reports free on 127.0.0.1 (bound and released, so a race is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def assemble_backends(dist: TritonDistribution, out: Path) -> Path:
    """`out/python/` with the backend library, its utils module and this Python version's stub."""
    python = out / "python"
    python.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(dist.python_backend / name, python / name)
    shutil.copy2(dist.stub, python / "triton_python_backend_stub")
    return out


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


def check_can_start() -> None:
    """Raise MMRankError saying why the installed server cannot start here: the binary does not run, or
    the stub environment cannot be prepared."""
    TritonDistribution.find().check_runs()
    prepare_stub_env()


def server_env(dist: TritonDistribution, python_bin: Path) -> dict[str, str]:
    env = os.environ.copy()
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(dist.libs), env.get("LD_LIBRARY_PATH")) if p)
    env["PATH"] = os.pathsep.join(p for p in (str(python_bin), env.get("PATH")) if p)
    return env


class TritonServer:
    """A running tritonserver process; use as a context manager or call start() / stop()."""

    def __init__(self, config: TritonConfig):
        if config.control_mode not in CONTROL_MODES:
            raise MMRankError(
                f"unknown model control mode {config.control_mode!r}; expected one of {CONTROL_MODES}"
            )
        repo = Path(config.repository)
        if not repo.is_dir():
            raise MMRankError(f"{repo}: model repository not found (render one with `mmrank repo`)")
        self.config = config
        self.repository = repo.resolve()
        self.grpc_port = config.grpc_port or free_port()
        self.http_port = config.http_port or free_port()
        self.metrics_port = config.metrics_port or free_port()
        self.process: subprocess.Popen | None = None
        self._workdir: Path | None = None
        self.log_path: Path | None = None

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
        ]
        if c.control_mode == "explicit":
            args.append("--load-model=*")
        if c.control_mode == "poll":
            args.append(f"--repository-poll-secs={c.poll_secs}")
        return [*args, *c.extra_args]

    def start(self) -> TritonServer:
        dist = TritonDistribution.find()
        python_bin = prepare_stub_env()
        self._workdir = Path(tempfile.mkdtemp(prefix="mmrank-triton-"))
        backends = assemble_backends(dist, self._workdir / "backends")
        self.log_path = Path(self.config.log_file or self._workdir / "tritonserver.log")
        with open(self.log_path, "wb") as log:
            # A session of its own, so a forced stop can end the server's backend stubs with it.
            self.process = subprocess.Popen(
                [str(dist.binary), *self.command(backends)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=server_env(dist, python_bin),
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

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

    def log_tail(self, lines: int = 8) -> str:
        """The last log lines that say something (errors first), joined on one line for error messages."""
        if self.log_path is None or not self.log_path.is_file():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        useful = [ln.strip() for ln in text if ln.strip() and not ln.startswith(("+", "|"))]
        errors = [ln for ln in useful if ln.startswith("E") or "error" in ln.lower()]
        return " | ".join((errors or useful)[-lines:])

    def stop(self) -> int | None:
        """SIGTERM, wait for the server's own exit timeout, then SIGKILL its whole session."""
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=self.config.exit_timeout_s + 15)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait()
            code = self.process.returncode
            self.process = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
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
    server = TritonServer(config)
    previous = signal.signal(signal.SIGTERM, lambda *_: server.stop())
    try:
        server.start()
        print(
            f"tritonserver ready on {server.repository}: grpc {server.grpc_url}, http {server.http_url}, "
            f"metrics 127.0.0.1:{server.metrics_port}; log {server.log_path} (Ctrl-C stops it)",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            while server.process is not None and server.process.poll() is None:
                time.sleep(0.5)
        if server.process is not None and server.process.returncode not in (None, 0):
            raise MMRankError(
                f"tritonserver exited with code {server.process.returncode}: {server.log_tail()}"
            )
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.stop()
    return 0


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
