"""Files: atomic writes with the permissions a plain ``open()`` gives, and checks of output paths."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from sculpt.errors import OptionError


def give_default_mode(path: str | os.PathLike, *, executable: bool = False) -> None:
    """Give ``path`` the mode a plain ``open()`` would (0666, or 0777 when ``executable``, less the
    umask): files made through ``mkstemp`` start as 0600."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, then rename it over ``path``:
    a reader sees the old file or the new one, never half of one. Nothing is left behind on failure."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        give_default_mode(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name the same file (symlinks and hard links included)."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def existing_ancestor(path: str | os.PathLike) -> Path:
    """``path`` itself if it exists, else its nearest existing parent folder."""
    p = Path(os.path.abspath(path))
    while not p.exists():
        p = p.parent
    return p


def check_output_file(path: str, flag: str, what: str) -> Path:
    """An output file named by a command-line ``flag``: not a folder, in an existing writable folder;
    else an OptionError saying so (``what``: what the flag takes, e.g. "the output .onnx file")."""
    p = Path(path)
    if not p.name or p.is_dir():
        raise OptionError(f"{p}: is a directory; {flag} takes {what}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise OptionError(f"{p}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OptionError(f"{p}: the folder {parent} is not writable")
    return p
