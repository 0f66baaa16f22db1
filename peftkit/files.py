"""Atomic writes of files and directories: a reader never sees half of one, a crash never loses the old one."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peftkit.errors import DestinationError
from peftkit.units import format_bytes

__all__ = [
    "atomic_write",
    "atomic_write_json",
    "atomic_directory",
    "check_writable",
    "probe_write",
    "destination_errors",
    "read_json",
]


# Why a write fails that the user can fix (space, a read-only mount, permissions), not a bug.
_UNWRITABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}


def _ordinary_mode(base: int) -> int:
    """The mode a new file (0o666) or directory (0o777) gets under the current umask (mkstemp's is 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def _ordinary_file_mode() -> int:
    return _ordinary_mode(0o666)


# What a probe writes beside a writer that failed: more than a nearly full disk still takes.
_PROBE_BYTES = 1 << 20


@contextmanager
def _writer_errors(directory: Path) -> Iterator[None]:
    """A writer's own error (safetensors' SafetensorError, torch.save's RuntimeError) as the OSError behind it.

    Writers that are not Python's file API report a full disk or a read-only mount in their
    own types, without an errno. While the failed file still holds its space, a probe write
    of 1 MiB beside it tells whether the destination is to blame; if so, the probe's OSError
    (ENOSPC, EROFS, ...) is raised from the writer's error, else the writer's error stands.
    """
    try:
        yield
    except OSError:
        raise
    except Exception as error:
        try:
            probe_write(directory, _PROBE_BYTES)
        except OSError as probe_error:
            if probe_error.errno in _UNWRITABLE:
                raise OSError(probe_error.errno, os.strerror(probe_error.errno), str(directory)) from error
        raise


def probe_write(directory: Path, nbytes: int) -> None:
    """Write `nbytes` to a temporary file in `directory`, sync and delete it; the OSError of a destination
    that cannot take them (full, read-only) comes out as it is."""
    fd, probe = tempfile.mkstemp(prefix=".peftkit-probe-", dir=directory)
    try:
        data = memoryview(bytes(nbytes))
        while data:  # a nearly full disk takes part of a write, then refuses the rest
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(probe)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` on a temp file beside `path`, fsync it, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _writer_errors(path.parent):
            write(tmp_path)
        # After the write: some writers (safetensors) replace the file. Readable like any
        # other file, e.g. by a server running as another user.
        os.chmod(tmp_path, _ordinary_file_mode())
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def read_json(path: Path, error: type[Exception], invalid: str = "is not valid JSON") -> Any:
    """The JSON in the file at `path`; `error` says "`path` `invalid`: why" when it is not JSON (or not UTF-8)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as cause:
        raise error(f"{path} {invalid}: {cause}") from None


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write `data` as indented, key-sorted JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@contextmanager
def atomic_directory(path: str | os.PathLike[str], replace: bool = False) -> Iterator[Path]:
    """`with atomic_directory(path) as tmp:` fill `tmp`; on success it becomes `path`, on error it is removed.

    `tmp` is a sibling of `path`, so the final rename stays on one file system. An
    existing `path` is replaced only when `replace` is true (FileExistsError otherwise),
    by renaming it aside first: there is no moment at which neither version exists.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, _ordinary_mode(0o777))
    try:
        with _writer_errors(path.parent):
            yield tmp
        if not path.exists():
            os.replace(tmp, path)
            return
        if not replace:
            raise FileExistsError(f"{path} already exists")
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.replace(path, old / path.name)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_writable(path: str | os.PathLike[str]) -> None:
    """Raise DestinationError unless something can be created at `path`, before any work is spent on it.

    Probed by creating (and removing) a directory beside it, in its nearest existing
    parent: permission bits, read-only mounts and immutable directories all show.
    """
    path = Path(path)
    parent = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if not parent.is_dir():
        raise DestinationError(f"cannot write {str(path)!r}: {str(parent)!r} is a file, not a directory.")
    with destination_errors(path):
        os.rmdir(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".probe", dir=parent))


@contextmanager
def destination_errors(path: str | os.PathLike[str], name: str | None = None) -> Iterator[None]:
    """An OSError a user can fix inside the block (no space, read-only, no permission) as one DestinationError.

    It names `name` (e.g. "output.dir 'runs/x'"), else `path`, the file that failed, and
    what to do. Other OSErrors are bugs, not destinations, and pass through. Blocks nest:
    the outermost name wins (a run's output.dir, not the temporary directory inside it).
    """
    try:
        yield
    except OSError as error:
        cause = error.__cause__ if isinstance(error, DestinationError) else error
        if not isinstance(cause, OSError) or cause.errno not in _UNWRITABLE:
            raise
        where = name or repr(str(path))
        failed = f" ({cause.filename})" if cause.filename and str(cause.filename) != str(path) else ""
        advice = "make it writable"
        if cause.errno in (errno.ENOSPC, errno.EDQUOT):
            advice = f"{_free_space(Path(cause.filename or path))} free there; free some space"
        raise DestinationError(
            f"cannot write {where}: {cause.strerror or cause} ({errno.errorcode[cause.errno]}){failed}; "
            f"{advice}, or choose another destination."
        ) from cause


def _free_space(path: Path) -> str:
    """The space left on the file system holding `path` (or its nearest existing parent), for a message."""
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    return format_bytes(shutil.disk_usage(existing).free)
