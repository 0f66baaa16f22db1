"""Atomic writes of files and directories: a reader never sees half of one, a crash never loses the old one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "atomic_write_json", "atomic_directory", "read_json"]


def _ordinary_mode(base: int) -> int:
    """The mode a new file (0o666) or directory (0o777) gets under the current umask (mkstemp's is 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def _ordinary_file_mode() -> int:
    return _ordinary_mode(0o666)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` on a temp file beside `path`, fsync it, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
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
