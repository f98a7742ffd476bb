"""The engine: llama.cpp's own `llama-server`, built from the sources the pinned llama-cpp-python vendors.

The server and the quantizer are then the same llama.cpp. The build happens once per machine and is
cached in `~/.cache/kiln/llama-server-<version>/` (override with `KILN_CACHE_DIR`): the sdist of the
installed llama-cpp-python is fetched with pip, unpacked, and only the `llama-server` target is
compiled. It is written to a temporary folder and renamed into place, so a half-finished build is
never mistaken for a finished one; a second call finds the binary and returns at once.

    python -m pipeline.serve.engine        # builds if needed, prints the binary path

This module uses the standard library only, so the Makefile can run it before anything else.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from pipeline.layout import cache_dir

BINARY_ENV = "KILN_LLAMA_SERVER"  # a llama-server binary to use instead of the cached build


class EngineUnavailable(RuntimeError):
    """llama-server could not be found or built; the message says why."""


def cache_root() -> Path:
    return cache_dir()


def llama_cpp_version() -> str:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError as exc:
        raise EngineUnavailable("llama-cpp-python is not installed, so its llama.cpp version is unknown") from exc


def build_dir(version: str | None = None) -> Path:
    return cache_root() / f"llama-server-{version or llama_cpp_version()}"


def binary_path(version: str | None = None) -> Path:
    return build_dir(version) / "bin" / "llama-server"


def locate() -> Path:
    """The llama-server binary to run: $KILN_LLAMA_SERVER, else the cached build. Never builds."""
    override = os.environ.get(BINARY_ENV)
    if override:
        path = Path(override)
        if not os.access(path, os.X_OK):
            raise EngineUnavailable(f"{BINARY_ENV}={override} is not an executable file")
        return path
    path = binary_path()
    if not path.exists():
        raise EngineUnavailable(
            f"llama-server is not built yet ({path} is missing): run `python -m pipeline.serve.engine`"
        )
    return path


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, cwd=cwd)
    if result.returncode != 0:
        raise EngineUnavailable(f"`{' '.join(cmd)}` failed with exit code {result.returncode}")


def _fetch_sdist(version: str, into: Path) -> Path:
    """The llama-cpp-python source archive of exactly `version` (it vendors llama.cpp)."""
    downloads = cache_root() / "sdist"
    downloads.mkdir(parents=True, exist_ok=True)
    found = sorted(downloads.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not found:
        _run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps"]
            + ["--dest", str(downloads), f"llama-cpp-python=={version}"]
        )
        found = sorted(downloads.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not found:
        raise EngineUnavailable(f"pip did not leave llama_cpp_python-{version}.tar.gz in {downloads}")
    with tarfile.open(found[0]) as archive:
        archive.extractall(into, filter="data")
    return into / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"


def build(version: str | None = None, jobs: int = 2) -> Path:
    """Build llama-server for the installed llama-cpp-python unless the cache already holds it."""
    version = version or llama_cpp_version()
    final = build_dir(version)
    if (final / "bin" / "llama-server").exists():
        return final / "bin" / "llama-server"
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise EngineUnavailable(f"building llama-server needs `{tool}` on PATH")
    cache_root().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"llama-server-{version}-", dir=cache_root()) as tmp:
        source = _fetch_sdist(version, Path(tmp) / "src")
        if not (source / "CMakeLists.txt").exists():
            raise EngineUnavailable(f"the llama-cpp-python {version} sdist has no vendored llama.cpp at {source}")
        out = Path(tmp) / "build"
        _run(
            ["cmake", "-S", str(source), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF"]
            + ["-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON"]
            + ["-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON"]
        )
        _run(["cmake", "--build", str(out), "--config", "Release", "--target", "llama-server", f"-j{jobs}"])
        built = out / "bin" / "llama-server"
        if not built.exists():
            raise EngineUnavailable(f"the build finished without {built}")
        staged = Path(tmp) / "result"
        (staged / "bin").mkdir(parents=True)
        shutil.copy2(built, staged / "bin" / "llama-server")
        (staged / "VERSION").write_text(f"llama-cpp-python {version}\n")
        try:
            staged.rename(final)
        except OSError:
            if not (final / "bin" / "llama-server").exists():  # another build won the race only if it finished
                raise
    return final / "bin" / "llama-server"


def main() -> int:
    try:
        print(build())
    except EngineUnavailable as exc:
        print(f"kiln: error: cannot build llama-server: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
