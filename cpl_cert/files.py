"""Files: atomic writes (readers see the old file or the new one, never half of one), hashes, JSON."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import CplCertError

Content = bytes | str | Callable[[str], Any]
"""What ``atomic_write`` writes: bytes, text, or a function that writes the file at the path it is given."""


def _new_file_mode(target: Path) -> int:
    """The mode an ordinary ``open(target, "w")`` would give: the old file's, else 0666 minus the umask."""
    if target.exists():
        return target.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: some file systems refuse)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _write_content(tmp_name: str, content: Content) -> None:
    if isinstance(content, bytes):
        Path(tmp_name).write_bytes(content)
    elif isinstance(content, str):
        Path(tmp_name).write_text(content)
    else:
        content(tmp_name)


def atomic_write(path: str | os.PathLike[str], content: Content) -> Path:
    """Write ``content`` to a temporary file beside ``path``, fsync it, then rename it over ``path``.

    The temporary file is ``.<name>.<random>.tmp`` in the same folder and is removed on any failure;
    the new file gets the permissions an ordinary write would give (the old file's, else the umask's).
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise CplCertError(f"cannot write {target}: the folder {directory} does not exist")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise CplCertError(f"cannot write {target}: {exc.strerror or exc}") from None
    os.close(fd)
    try:
        os.chmod(tmp_name, _new_file_mode(target))  # mkstemp makes 0600
        _write_content(tmp_name, content)
        with open(tmp_name, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(directory)
    return target


def temporary_pattern(target: Path) -> re.Pattern[str]:
    """The names ``atomic_write`` gives its temporary files for ``target``: ``.<name>.<8 random characters>.tmp``."""
    return re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.tmp")


def remove_stale_temporaries(target: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files an interrupted ``atomic_write`` of ``target`` left (a ``kill -9`` runs no
    cleanup); returns them. Only call it when no other process is writing ``target``."""
    path = Path(target)
    directory = path.parent if str(path.parent) else Path(".")
    pattern = temporary_pattern(path)
    removed = []
    for candidate in directory.glob(f".{glob_escape(path.name)}.*.tmp"):
        if pattern.fullmatch(candidate.name) and candidate.is_file():
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return sorted(removed)


def glob_escape(name: str) -> str:
    """``name`` with glob's special characters quoted."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes, as hex (reports name the exact checkpoint they describe)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: str | os.PathLike[str], data: dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON, atomically (no half-written report on failure)."""
    return atomic_write(path, json.dumps(data, indent=2) + "\n")


def portable_path(path: str | os.PathLike[str]) -> str:
    """``path`` as a record that leaves this machine may hold it: as given when relative, relative to the
    working folder when it lies under it, else its name alone (never an absolute path of the machine)."""
    given = Path(path)
    if not given.is_absolute():
        return str(path)
    for base in (Path.cwd(), Path.cwd().resolve()):
        try:
            return str(given.relative_to(base))
        except ValueError:
            continue
    return given.name


def portable_dataset(name: str) -> str:
    """A dataset name with the path of ``folder:PATH`` made portable (``portable_path``)."""
    return f"folder:{portable_path(name[len('folder:'):])}" if name.startswith("folder:") else name
