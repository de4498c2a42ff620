"""The on-disk shader cache, safe to load native code from.

A cached shader is a shared library that the executor ``dlopen``s, so whoever can write into the
cache can run code in every process that uses it. Hence:

* the cache directory is created ``0700``; a directory (or its parent) that is not the current
  user's, or that others may write to, is refused with :class:`MetalCacheError`;
* every artifact is stored under the SHA-256 of its contents (``<stem>-<digest>.so``) and found
  through a record (``<stem>.json``) that names it and carries the digest and its metadata; before an
  artifact is used, the record and the artifact must belong to the current user, be writable by no
  one else, and the artifact's bytes must hash to the recorded digest.

Writers replace files atomically, and concurrent writers of one stem each write a consistent
(record, artifact) pair, so a reader never sees a half-written or mismatched pair.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from metalcore.executor._errors import MetalCacheError

_WHAT_TO_DO = ("the executor loads native code from its cache, so the cache must belong to you and be "
               "writable only by you: remove it (or `chmod go-w` it if it is yours), or set "
               "METALCORE_CACHE to a directory of your own")


def cache_root() -> Path:
    """``$METALCORE_CACHE``, else ``$XDG_CACHE_HOME/metalcore``, else ``~/.cache/metalcore``."""
    root = os.environ.get("METALCORE_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "metalcore"


def cache_dir() -> Path:
    """The executor's cache directory (``<cache root>/executor``), created ``0700`` and checked."""
    path = cache_root() / "executor"
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for directory in reversed(missing):  # created private whatever the umask gives (it may be 000)
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            pass
    _check_parent(path.parent)
    _check_owned(path, os.lstat(path), want_dir=True)
    return path


def _uid() -> int:
    return os.geteuid()


def _problem(st: os.stat_result, want_dir: bool) -> str | None:
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if want_dir and not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if not want_dir and not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid != _uid():
        return f"belongs to user id {st.st_uid}, not to you (user id {_uid()})"
    if st.st_mode & 0o022:
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):03o})"
    return None


def _check_owned(path: Path, st: os.stat_result, *, want_dir: bool) -> None:
    problem = _problem(st, want_dir)
    if problem:
        kind = "shader cache directory" if want_dir else "shader cache file"
        raise MetalCacheError(f"refusing to use {kind} {path}: it {problem}; {_WHAT_TO_DO}")


def _check_parent(parent: Path) -> None:
    """Whoever may write to the parent may replace the cache directory: only you, root, or a sticky
    directory (such as /tmp, where entries can be renamed only by their owners)."""
    st = os.stat(parent)
    if st.st_uid not in (_uid(), 0):
        raise MetalCacheError(f"refusing to use the shader cache under {parent}: that directory belongs to user "
                              f"id {st.st_uid}, not to you; {_WHAT_TO_DO}")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise MetalCacheError(f"refusing to use the shader cache under {parent}: that directory is writable by "
                              f"group or others (mode {stat.S_IMODE(st.st_mode):03o}) and not sticky; "
                              f"{_WHAT_TO_DO}")


def _read_checked(path: Path) -> bytes | None:
    """The bytes of a cache file that belongs to you and no one else may write, or None if it is missing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:  # O_NOFOLLOW on a symbolic link
        raise MetalCacheError(f"refusing to use shader cache file {path}: {e.strerror}; {_WHAT_TO_DO}") from e
    with os.fdopen(fd, "rb") as f:
        _check_owned(path, os.fstat(f.fileno()), want_dir=False)
        return f.read()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")  # created 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(stem: str) -> tuple[Path, dict[str, Any]] | None:
    """The verified artifact stored under ``stem`` and its metadata, or None when there is none."""
    directory = cache_dir()
    record_path = directory / f"{stem}.json"
    raw = _read_checked(record_path)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
        name, digest, meta = record["file"], record["sha256"], record["meta"]
    except (ValueError, KeyError, TypeError) as e:
        raise MetalCacheError(f"shader cache record {record_path} is malformed ({e}); remove it") from e
    if "/" in name or not name.startswith(stem + "-"):
        raise MetalCacheError(f"shader cache record {record_path} names an unexpected file {name!r}; remove it")
    path = directory / name
    data = _read_checked(path)
    if data is None:
        return None
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise MetalCacheError(f"shader cache file {path} does not match its record {record_path} (SHA-256 "
                              f"{actual[:16]}... instead of {digest[:16]}...): it was modified after it was "
                              f"built; remove both files")
    return path, meta


def store(stem: str, suffix: str, data: bytes, meta: dict[str, Any]) -> Path:
    """Store ``data`` as ``<stem>-<sha256 prefix><suffix>`` with its record; return the artifact's path."""
    directory = cache_dir()
    digest = hashlib.sha256(data).hexdigest()
    path = directory / f"{stem}-{digest[:16]}{suffix}"
    _write_atomic(path, data)
    record = {"file": path.name, "sha256": digest, "meta": meta}
    _write_atomic(directory / f"{stem}.json", json.dumps(record).encode())
    return path
