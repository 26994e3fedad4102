"""Triton's native ONNX Runtime backend for the bundled tritonserver, built from source at set-up.

The tritonserver of nvidia-pytriton 0.7.0 (Triton 2.51.0, release 24.10) ships the python backend only.
`python -m export.native_backend --build` (what `make setup` runs) builds `libtriton_onnxruntime.so`,
the backend NVIDIA's containers run `platform: "onnxruntime_onnx"` models with, for the CPU, from:

- the upstream sources in third_party/triton_onnxruntime_backend/ (its README names the repositories,
  commits and licenses). CMake runs fully disconnected: FetchContent takes those folders, and a stand-in
  defines the googletest targets that Triton's common library declares for its unit tests (never built);
- ONNX Runtime 1.19.2's shared library (the release Triton 24.10 pins) from the PyPI wheel
  onnxruntime==1.19.2, checked against its sha256, whatever onnxruntime this venv itself runs;
- Debian's cmake, g++, ninja-build (or make), rapidjson-dev and patchelf, installed with apt-get when
  missing (as root; otherwise one line says what to install).

The result is `<venv>/triton-backends/onnxruntime/` ($MMRANK_TRITON_BACKENDS overrides the parent):
libtriton_onnxruntime.so, libonnxruntime.so.1.19.2 with its SONAME link libonnxruntime.so.1 (the
backend's RUNPATH is $ORIGIN) and BUILD.json (the cache key, the inputs, the build time). The backend is
linked against the core's stub libtritonserver.so, but the server library inside pytriton has a hashed
file name: the NEEDED entry is removed (patchelf), so the TRITONSERVER_* / TRITONBACKEND_* symbols bind
to the copy the server process has already loaded. export/triton_launcher.py links the folder into each
server's backend directory next to python/.

Cached: the key hashes the sources, the pinned wheel, the g++ and cmake versions and this file. An
unchanged key does nothing; a changed one builds in a clean build folder and replaces the output folder
in one rename, so a server never sees half a build. The wheel, the build tree and build.log stay in
`<venv>/triton-backends/.work/`. What the built backend's ONNX Runtime reads (IR version, opset) is
export/native_runtime.py, outside this file, so that editing it leaves the build cached.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from common.atomic import atomic_dir
from common.errors import MMRankError

SOURCES = Path(__file__).resolve().parents[1] / "third_party" / "triton_onnxruntime_backend"
REPOS = ("onnxruntime_backend", "backend", "core", "common")
ORT_HEADERS = "ort_headers"
ORT_VERSION = "1.19.2"
ORT_API_VERSION = 19  # the C API table the header declares; frozen from 1.19.0 on
ORT_WHEEL = f"onnxruntime-{ORT_VERSION}-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl"
ORT_WHEEL_SHA256 = "a36511dc07c5c964b916697e42e366fa43c48cdb3d3503578d78cef30417cb84"
ORT_LIBRARY = f"libonnxruntime.so.{ORT_VERSION}"
ORT_SONAME = "libonnxruntime.so.1"

HOME_ENV = "MMRANK_TRITON_BACKENDS"
NAME = "onnxruntime"  # the folder name is the backend name Triton resolves `onnxruntime_onnx` to
LIBRARY = "libtriton_onnxruntime.so"
STUB_LIBRARY = "libtritonserver.so"
STAMP = "BUILD.json"
TARGET = "triton-onnxruntime-backend"
MIN_CMAKE = (3, 17)
# Debian package -> the program that shows it is installed.
PROGRAMS = {"cmake": "cmake", "g++": "g++", "patchelf": "patchelf", "binutils": "strip"}
RAPIDJSON = Path("/usr/include/rapidjson/document.h")
# Triton's common library declares its unit tests whatever the options; they need these two targets.
GTEST_STANDIN = """cmake_minimum_required(VERSION 3.17)
project(googletest_standin NONE)
add_library(googletest_standin INTERFACE)
add_library(GTest::gtest ALIAS googletest_standin)
add_library(GTest::gtest_main ALIAS googletest_standin)
"""


def backends_home() -> Path:
    """The folder that holds the built backend folder: $MMRANK_TRITON_BACKENDS, else <venv>/triton-backends."""
    return Path(os.environ.get(HOME_ENV) or Path(sys.prefix) / "triton-backends")


@dataclass(frozen=True)
class NativeBackend:
    """A built backend folder (libtriton_onnxruntime.so and the ONNX Runtime library it loads)."""

    dir: Path

    @classmethod
    def find(cls, home: Path | None = None) -> NativeBackend:
        folder = Path(home or backends_home()) / NAME
        if not all((folder / name).is_file() for name in (LIBRARY, ORT_LIBRARY, STAMP)):
            raise MMRankError(f"the native onnxruntime backend is not built in {folder}: run `make setup`")
        return cls(folder)

    @classmethod
    def built(cls, home: Path | None = None) -> bool:
        try:
            cls.find(home)
        except MMRankError:
            return False
        return True

    def info(self) -> dict:
        return json.loads((self.dir / STAMP).read_text())

    def link_into(self, folder: Path) -> Path:
        """`folder` holding this build's files: hard links where the file system allows (copies
        elsewhere), so a rebuild, which replaces the build folder, never changes a running server's."""
        folder.mkdir(parents=True, exist_ok=True)
        for name in (LIBRARY, ORT_LIBRARY):
            try:
                os.link(self.dir / name, folder / name)
            except OSError:
                shutil.copy2(self.dir / name, folder / name)
        (folder / ORT_SONAME).symlink_to(ORT_LIBRARY)
        return folder


# ---- build steps -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildConfig:
    sources: Path = SOURCES  # the upstream folders (third_party/triton_onnxruntime_backend)
    home: Path | None = None  # where <home>/onnxruntime and <home>/.work go; None = backends_home()
    jobs: int = os.cpu_count() or 1  # parallel compile jobs
    force: bool = False  # build even when the cache key is unchanged
    install_tools: bool = True  # apt-get install missing Debian packages (as root)


@dataclass(frozen=True)
class Tools:
    compiler: str  # first line of `g++ --version`
    cmake: str  # first line of `cmake --version`
    generator: str  # Ninja where installed, else Unix Makefiles


class Progress:
    """`native backend: [elapsed] message` lines on stdout; every command's output goes to the log."""

    def __init__(self, log: Path):
        self.start = time.monotonic()
        self.log = log

    def say(self, message: str) -> None:
        print(f"native backend: [{time.monotonic() - self.start:5.1f} s] {message}", flush=True)

    def run(self, cmd: list[str], what: str, echo: re.Pattern | None = None, env: dict | None = None) -> str:
        """Run `cmd`, appending its output to the log (and echoing lines that match `echo`); its output,
        or MMRankError naming `what` and the log."""
        lines = []
        with open(self.log, "a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            try:
                proc = subprocess.Popen(
                    cmd,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    env=env,
                    errors="replace",
                )
            except OSError as e:
                raise MMRankError(f"{what} failed: cannot run {cmd[0]} ({e.strerror})") from e
            for line in proc.stdout:
                log.write(line)
                lines.append(line)
                if echo is not None and echo.match(line):
                    self.say(_build_step(line))
            code = proc.wait()
        if code != 0:
            raise MMRankError(f"{what} failed (exit {code}): see {self.log}")
        return "".join(lines)


def _build_step(line: str) -> str:
    """`[3/17] Building CXX object <path>/x.cc.o` (ninja; make prints `[ 7%]`) -> `[3/17] x.cc.o`."""
    return f"{line[: line.index(']') + 1].strip()} {Path(line.split()[-1]).name}"


def missing_packages() -> list[str]:
    """Debian packages the build needs that this machine lacks."""
    missing = [pkg for pkg, program in PROGRAMS.items() if shutil.which(program) is None]
    if not (shutil.which("ninja") or shutil.which("make")):
        missing.append("ninja-build")
    if not RAPIDJSON.is_file():
        missing.append("rapidjson-dev")
    return missing


def install_packages(missing: list[str], progress: Progress, allowed: bool) -> None:
    fix = f"install {' '.join(missing)} (Debian: apt-get install {' '.join(missing)}), then run `make setup`"
    if not allowed or os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise MMRankError(f"the build needs {', '.join(missing)}: {fix}")
    progress.say(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    wait = ["-o", "DPkg::Lock::Timeout=300"]  # other apt users on the machine: wait, do not fail
    progress.run(["apt-get", *wait, "update", "-qq"], f"apt-get update ({fix})", env=env)
    install = ["apt-get", *wait, "install", "-y", "-qq", "--no-install-recommends", *missing]
    progress.run(install, f"apt-get install ({fix})", env=env)
    still = missing_packages()
    if still:
        raise MMRankError(f"apt-get installed nothing for {', '.join(still)}: {fix}")


def find_tools(progress: Progress, install: bool) -> Tools:
    missing = missing_packages()
    if missing:
        install_packages(missing, progress, install)
    cmake = progress.run(["cmake", "--version"], "cmake --version").splitlines()[0]
    version = tuple(int(x) for x in re.findall(r"\d+", cmake)[:2])
    if version < MIN_CMAKE:
        raise MMRankError(f"{cmake}: the build needs cmake >= {'.'.join(map(str, MIN_CMAKE))}")
    compiler = progress.run(["g++", "--version"], "g++ --version").splitlines()[0]
    return Tools(compiler, cmake, "Ninja" if shutil.which("ninja") else "Unix Makefiles")


def source_commits(sources: Path) -> dict[str, str]:
    """Each upstream folder's commit (its .source-commit), after checking the folders are complete."""
    commits = {}
    for folder in (*REPOS, ORT_HEADERS):
        marker = sources / folder / ".source-commit"
        if not marker.is_file() or not (sources / folder / "LICENSE").is_file():
            raise MMRankError(f"{sources / folder}: incomplete backend sources (restore the folder from git)")
        commits[folder] = marker.read_text().strip()
    header = (sources / ORT_HEADERS / "onnxruntime_c_api.h").read_text()
    api = re.search(r"^#define ORT_API_VERSION (\d+)", header, re.M)
    if api is None or int(api.group(1)) != ORT_API_VERSION:
        raise MMRankError(
            f"{sources / ORT_HEADERS}: the header must declare ORT_API_VERSION {ORT_API_VERSION}"
        )
    return commits


def source_digest(sources: Path) -> str:
    """sha256 of every file under `sources` (path and content) but the top README: what the build reads."""
    digest = hashlib.sha256()
    for path in sorted(p for p in sources.rglob("*") if p.is_file()):
        name = path.relative_to(sources).as_posix()
        if name == "README.md":
            continue
        data = path.read_bytes()
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def build_key(sources: Path, tools: Tools) -> dict[str, str]:
    return {
        "sources_sha256": source_digest(sources),
        "ort_wheel_sha256": ORT_WHEEL_SHA256,
        "compiler": tools.compiler,
        "cmake": tools.cmake,
        "recipe_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_onnxruntime(work: Path, sources: Path, progress: Progress) -> Path:
    """A folder with include/onnxruntime_c_api.h and lib/libonnxruntime.so* of ONNX Runtime 1.19.2, the
    library from the PyPI wheel (downloaded once into work/wheels)."""
    wheel = work / "wheels" / ORT_WHEEL
    if not wheel.is_file() or _sha256(wheel) != ORT_WHEEL_SHA256:
        wheel.unlink(missing_ok=True)
        pip = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps"]
        pip += ["--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11"]
        pip += ["--implementation", "cp", f"onnxruntime=={ORT_VERSION}", "-d", str(wheel.parent)]
        progress.run(pip, f"pip download onnxruntime=={ORT_VERSION} (needs PyPI)")
        if not wheel.is_file() or _sha256(wheel) != ORT_WHEEL_SHA256:
            raise MMRankError(f"{wheel.parent}: no {ORT_WHEEL} with sha256 {ORT_WHEEL_SHA256[:16]}...")
    ort = work / "ort"
    shutil.rmtree(ort, ignore_errors=True)
    (ort / "lib").mkdir(parents=True)
    (ort / "include").mkdir()
    with zipfile.ZipFile(wheel) as z:
        (ort / "lib" / ORT_LIBRARY).write_bytes(z.read(f"onnxruntime/capi/{ORT_LIBRARY}"))
    (ort / "lib" / ORT_SONAME).symlink_to(ORT_LIBRARY)
    (ort / "lib" / "libonnxruntime.so").symlink_to(ORT_SONAME)  # what CMake's find_library looks for
    shutil.copy2(sources / ORT_HEADERS / "onnxruntime_c_api.h", ort / "include")
    progress.say(f"ONNX Runtime {ORT_VERSION} library from {wheel.name}")
    return ort


def cmake_configure(sources: Path, ort: Path, build: Path, tools: Tools) -> list[str]:
    """The configure command: CPU only, no network (every FetchContent dependency is a local folder)."""
    standin = build.parent / "googletest-standin"
    standin.mkdir(exist_ok=True)
    (standin / "CMakeLists.txt").write_text(GTEST_STANDIN)
    fetched = [f"-DFETCHCONTENT_SOURCE_DIR_REPO-{repo.upper()}={sources / repo}" for repo in REPOS[1:]]
    return [
        "cmake",
        "-S",
        str(sources / "onnxruntime_backend"),
        "-B",
        str(build),
        "-G",
        tools.generator,
        "-Wno-dev",
        "-DCMAKE_BUILD_TYPE=Release",
        "-DTRITON_ENABLE_GPU=OFF",
        "-DTRITON_ENABLE_ONNXRUNTIME_TENSORRT=OFF",
        "-DTRITON_ENABLE_ONNXRUNTIME_OPENVINO=OFF",
        f"-DTRITON_ONNXRUNTIME_INCLUDE_PATHS={ort / 'include'}",
        f"-DTRITON_ONNXRUNTIME_LIB_PATHS={ort / 'lib'}",
        "-DFETCHCONTENT_FULLY_DISCONNECTED=ON",
        *fetched,
        f"-DFETCHCONTENT_SOURCE_DIR_GOOGLETEST={standin}",
    ]


def compile_backend(
    sources: Path, ort: Path, work: Path, tools: Tools, jobs: int, progress: Progress
) -> Path:
    """The linked libtriton_onnxruntime.so, built in a clean work/build."""
    build = work / "build"
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir()
    progress.run(cmake_configure(sources, ort, build, tools), "cmake configure")
    progress.say(f"configured ({tools.generator}, {jobs} jobs)")
    steps = re.compile(r"^\s*\[\s*\d+(/\d+\]|%\])")  # ninja's [3/40] and make's [ 7%] lines
    compile_cmd = ["cmake", "--build", str(build), "--target", TARGET, "-j", str(jobs)]
    progress.run(compile_cmd, "compiling the backend", echo=steps)
    library = build / LIBRARY
    if not library.is_file():
        raise MMRankError(f"the build wrote no {LIBRARY}: see {progress.log}")
    return library


def install(library: Path, ort: Path, out: Path, stamp: dict, progress: Progress) -> None:
    """out/ = the backend (its stub NEEDED removed, stripped, checked) + the ONNX Runtime library +
    BUILD.json, replacing the previous folder in one rename."""
    with atomic_dir(out, force=True) as tmp:
        lib = tmp / LIBRARY
        shutil.copy2(library, lib)
        progress.run(["patchelf", "--remove-needed", STUB_LIBRARY, str(lib)], "patchelf --remove-needed")
        progress.run(["strip", "--strip-unneeded", str(lib)], "strip")
        needed = progress.run(["patchelf", "--print-needed", str(lib)], "patchelf --print-needed").split()
        rpath = progress.run(["patchelf", "--print-rpath", str(lib)], "patchelf --print-rpath").strip()
        if STUB_LIBRARY in needed or ORT_SONAME not in needed or rpath not in ("$ORIGIN", "${ORIGIN}"):
            raise MMRankError(
                f"{LIBRARY}: NEEDED {needed}, RUNPATH {rpath!r}; expected {ORT_SONAME}, $ORIGIN"
            )
        shutil.copy2(ort / "lib" / ORT_LIBRARY, tmp / ORT_LIBRARY)
        (tmp / ORT_SONAME).symlink_to(ORT_LIBRARY)
        (tmp / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")


@contextlib.contextmanager
def _locked(home: Path):
    """One build at a time per backends folder (a second waits, then finds the first one's result)."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build(config: BuildConfig | None = None) -> NativeBackend:
    """The backend for the current sources and tools: the cached one when its key matches, else built."""
    config = config or BuildConfig()
    home = Path(config.home or backends_home())
    work = home / ".work"
    with _locked(home):
        work.mkdir(exist_ok=True)
        progress = Progress(work / "build.log")
        progress.log.write_text(f"native backend build, {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC\n")
        tools = find_tools(progress, config.install_tools)
        commits = source_commits(config.sources)
        key = build_key(config.sources, tools)
        with contextlib.suppress(MMRankError, OSError, ValueError):
            cached = NativeBackend.find(home)
            info = cached.info()
            if info.get("key") == key and not config.force:
                progress.say(f"up to date: {cached.dir} (built {info['date']})")
                return cached
        load = os.getloadavg()[0]
        progress.say(f"building ({tools.compiler}; {tools.cmake}; log {progress.log})")
        ort = fetch_onnxruntime(work, config.sources, progress)
        library = compile_backend(config.sources, ort, work, tools, config.jobs, progress)
        seconds = round(time.monotonic() - progress.start, 1)
        stamp = {
            "key": key,
            "commits": commits,
            "onnxruntime": f"{ORT_VERSION} from PyPI {ORT_WHEEL}",
            "generator": tools.generator,
            "jobs": config.jobs,
            "build_seconds": seconds,
            "load_average_1min": round(load, 2),
            "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M UTC}",
        }
        install(library, ort, home / NAME, stamp, progress)
        progress.say(f"built {home / NAME} in {seconds} s (1-min load average {load:.2f} at the start)")
        return NativeBackend.find(home)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Build Triton's native onnxruntime backend for the bundled tritonserver (cached).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--build", action="store_true", help="build it unless the cached build is current")
    p.add_argument("--force", action="store_true", help="with --build: build even when the cache is current")
    p.add_argument("--no-install", action="store_true", help="never apt-get install missing Debian packages")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile jobs")
    p.add_argument(
        "--where", action="store_true", help="print the built backend's folder (fails if not built)"
    )
    args = p.parse_args(argv)
    if not (args.build or args.where):
        p.error("pass --build or --where")
    try:
        if args.build:
            build(BuildConfig(jobs=args.jobs, force=args.force, install_tools=not args.no_install))
        if args.where:
            print(NativeBackend.find().dir)
    except MMRankError as e:
        print(f"native backend: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
