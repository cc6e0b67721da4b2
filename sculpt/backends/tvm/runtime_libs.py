"""Where the TVM runtime libraries come from: the installed wheels for this machine, and for aarch64
the aarch64 builds of the same wheels, fetched from PyPI with pip and cached (never committed).

The cache lives in ``$SCULPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/sculpt``, else ``~/.cache/sculpt``.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from sculpt.common import one_line
from sculpt.errors import SculptError

RUNTIME_LIBRARIES = ("libtvm_ffi.so", "libtvm_runtime.so")
_WHEEL_MEMBERS = {"apache-tvm": "tvm/lib/libtvm_runtime.so", "apache-tvm-ffi": "tvm_ffi/lib/libtvm_ffi.so"}


class ToolchainError(SculptError):
    """A tool sculpt needs to export or run an artifact is missing or failed (compiler, qemu, pip)."""


def cache_dir() -> Path:
    root = os.environ.get("SCULPT_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sculpt"


@dataclass(frozen=True)
class RuntimeLibraries:
    """The TVM runtime for one architecture: the directories holding libtvm_ffi.so and libtvm_runtime.so
    and the tvm_ffi headers (architecture-independent, from the installed wheel)."""

    arch: str
    lib_dirs: tuple[Path, ...]
    include_dir: Path
    versions: tuple[str, str]  # apache-tvm, apache-tvm-ffi


def installed_versions() -> tuple[str, str]:
    try:
        return metadata.version("apache-tvm"), metadata.version("apache-tvm-ffi")
    except metadata.PackageNotFoundError as e:
        raise ToolchainError(f"the TVM backend needs the apache-tvm and apache-tvm-ffi wheels ({e} is not "
                             "installed)") from None


def _include_dir() -> Path:
    import tvm_ffi

    inc = Path(tvm_ffi.__file__).parent / "include"
    if not (inc / "tvm" / "ffi" / "function.h").is_file():
        raise ToolchainError(f"{inc}: the tvm_ffi C++ headers are missing from the apache-tvm-ffi installation")
    return inc


def host_runtime() -> RuntimeLibraries:
    """The runtime of the installed wheels (this machine's architecture)."""
    import tvm
    import tvm_ffi

    dirs = (Path(tvm_ffi.__file__).parent / "lib", Path(tvm.__file__).parent / "lib")
    for d, lib in zip(dirs, RUNTIME_LIBRARIES):
        if not (d / lib).is_file():
            raise ToolchainError(f"{d / lib}: missing from the TVM installation")
    return RuntimeLibraries(platform.machine(), dirs, _include_dir(), installed_versions())


def aarch64_runtime(progress=None) -> RuntimeLibraries:
    """The aarch64 runtime of the same TVM versions as installed, fetched once with ``pip download``."""
    if platform.machine() == "aarch64":
        return host_runtime()
    tvm_version, ffi_version = installed_versions()
    target = cache_dir() / "aarch64-runtime" / f"tvm-{tvm_version}_ffi-{ffi_version}"
    if not all((target / lib).is_file() for lib in RUNTIME_LIBRARIES):
        _fetch_aarch64_runtime(target, {"apache-tvm": tvm_version, "apache-tvm-ffi": ffi_version}, progress)
    return RuntimeLibraries("aarch64", (target,), _include_dir(), (tvm_version, ffi_version))


def _fetch_aarch64_runtime(target: Path, versions: dict[str, str], progress=None) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        wheels = Path(tmp) / "wheels"
        python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--platform", "manylinux_2_28_aarch64", "--python-version", python_version,
                   "--dest", str(wheels), "--quiet", "--disable-pip-version-check",
                   *(f"{name}=={version}" for name, version in versions.items())]
        if progress:
            progress(f"fetching the aarch64 TVM runtime (apache-tvm {versions['apache-tvm']}, "
                     f"apache-tvm-ffi {versions['apache-tvm-ffi']}) from PyPI")
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            why = " ".join((done.stderr or done.stdout).split())[-400:]
            raise ToolchainError(f"pip could not download the aarch64 TVM wheels: {why}")
        staged = Path(tmp) / "libs"
        staged.mkdir()
        for name, member in _WHEEL_MEMBERS.items():
            stem = name.replace("-", "_")
            found = sorted(wheels.glob(f"{stem}-{versions[name]}-*.whl"))
            if not found:
                raise ToolchainError(f"pip downloaded no {name} {versions[name]} wheel for aarch64")
            with zipfile.ZipFile(found[0]) as wheel:
                try:
                    with wheel.open(member) as src, open(staged / Path(member).name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                except KeyError:
                    raise ToolchainError(f"{found[0].name} has no {member}") from None
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)  # all or nothing: a half-fetched runtime is never used


def build_into_cache(path: Path, command: Callable[[str], list[str]], what: str, *, executable: bool = False) -> Path:
    """``path`` (a file in the sculpt cache named by a hash of its inputs), built by ``command(output)``
    unless it is there already; written atomically (a failed or interrupted build leaves nothing)."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        done = subprocess.run(command(tmp), capture_output=True, text=True)
        if done.returncode != 0:
            raise ToolchainError(f"building {what} failed: {one_line(done.stderr, 600)}")
        if executable:
            os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def require_tool(name: str, package: str) -> str:
    """The path of an executable, or an error naming the Debian package that provides it."""
    path = shutil.which(name)
    if not path:
        raise ToolchainError(f"'{name}' is not installed (Debian: apt-get install {package})")
    return path


def qemu_command(arch: str) -> list[str]:
    """The prefix that runs a binary of ``arch`` on this machine (empty when it is native)."""
    if arch == platform.machine():
        return []
    if arch != "aarch64":
        raise ToolchainError(f"cannot run {arch} binaries on this {platform.machine()} machine")
    qemu = require_tool("qemu-aarch64-static", "qemu-user-static")
    sysroot = Path("/usr/aarch64-linux-gnu")
    if not (sysroot / "lib").is_dir():
        raise ToolchainError(f"{sysroot}: the aarch64 C/C++ libraries are missing (Debian: apt-get install "
                             "g++-aarch64-linux-gnu)")
    return [qemu, "-L", str(sysroot)]
