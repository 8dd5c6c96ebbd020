"""The relp cache of converted models: atomic, verified directories.

A cache entry is a directory ``root/key`` under :func:`default_cache_dir`, built by :func:`cached_dir`
in a temporary directory next to it, described by a manifest (``relp-manifest.json``: every file with
its size and sha256, written last) and renamed into place atomically, so that an interrupted build
never leaves a loadable entry. Entries are checked against their manifest before use
(:func:`verify_cache_dir`) and rebuilt when damaged; a file lock serialises builders across
processes. Every cache key includes :data:`CACHE_FORMAT`.

Loading a model from the cache (:func:`_read_cached`, used by ``load_model()`` for the embedded model and
GGUF files) checks every file's content against the sha256 recorded at write time, so that a file
damaged in place (same size, different bytes: the weights would load and give NaN or wrong logits) is
rebuilt, never loaded. Measured on the embedded SmolLM2 entry (517 MB, files in the page cache, a busy
2-core machine): the check takes 0.6-0.8 s, against 9-14 s for a process's first ``load_model()``
(imports included) and about 2.5 s for a later one. A file whose (device, inode, size, modification
time) is unchanged since this process hashed it (at a check or when it wrote the entry) is not hashed
again, so later loads in one process cost nothing extra.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from relp.loading.checkpoints import _read_checkpoint_dir

logger = logging.getLogger(__name__)

#: Bump when the conversion or the cache layout changes: every cache key includes it.
CACHE_FORMAT = 1
MANIFEST_FILE = "relp-manifest.json"
#: How long a process waits for another one that is building the same cache entry.
CACHE_LOCK_TIMEOUT_S = 30 * 60


def default_cache_dir() -> Path:
    """Where relp caches converted models: ``$RELP_CACHE_DIR``, else ``$XDG_CACHE_HOME/relp``, else
    ``~/.cache/relp``. Entries are a few hundred MB each and can be deleted at any time."""
    if os.environ.get("RELP_CACHE_DIR"):
        return Path(os.environ["RELP_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "relp"
    return Path.home() / ".cache" / "relp"


def _read_cached(key: str, build: Callable[[Path], None], *, dtype=torch.float32, root=None):
    """(model, tokenizer) from the cache entry ``key``, building it if needed.

    The entry's files are checked in full (sha256 against the manifest) before they are read: a damaged
    entry (for instance bytes overwritten in place, same size) is deleted and rebuilt. If an entry that
    passed the check still fails to load, it is checked again: if it was damaged meanwhile it is
    rebuilt once; if it is intact the error is not the cache's and is raised as is.
    """
    path = cached_dir(key, build, root=root, full=True)
    try:
        return _read_checkpoint_dir(path, dtype=dtype)
    except Exception as error:
        problem = verify_cache_dir(path, full=True)
        if problem is None:
            raise
        logger.warning("relp cache entry %s could not be loaded (%s: %s) and is damaged (%s); rebuilding it",
                       path, type(error).__name__, error, problem)
        remove_cache_dir(path)
        return _read_checkpoint_dir(cached_dir(key, build, root=root), dtype=dtype)


def cached_dir(
    key: str, build: Callable[[Path], None], *, root: str | os.PathLike | None = None, full: bool = False
) -> Path:
    """A verified cache directory ``root/key``, built with ``build(tmp_dir)`` if absent or damaged.

    ``build`` writes the files into the empty directory it is given. The entry is built in a
    temporary directory next to the final one, a manifest (file names, sizes, sha256) is written last,
    and the directory is renamed into place atomically, so an interrupted build never leaves a loadable
    entry. An existing entry is used only if its manifest checks out (every file present with its
    recorded size, and with ``full=True`` also its recorded sha256); otherwise a warning is logged and
    it is rebuilt. A file lock serialises builders across processes; the second one waits and then uses
    the first one's result.
    """
    root = Path(root) if root is not None else default_cache_dir()
    final = root / key
    if verify_cache_dir(final, full=full) is None:
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PermissionError(
            f"cannot create the relp cache directory {root} ({error}); point RELP_CACHE_DIR at a "
            "writable directory"
        ) from error
    with _file_lock(root / f".{key}.lock"):
        problem = verify_cache_dir(final, full=full)
        if problem is None:  # another process built it while this one waited
            return final
        if final.exists():
            logger.warning("relp cache entry %s is unusable (%s); rebuilding it", final, problem)
            remove_cache_dir(final)
        _remove_leftovers(root, key)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
        try:
            started = time.perf_counter()
            build(tmp)
            write_manifest(tmp, extra={"key": key, "build_seconds": round(time.perf_counter() - started, 1)})
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def write_manifest(directory: str | os.PathLike, *, extra: dict | None = None) -> Path:
    """Write ``relp-manifest.json`` listing every file below ``directory`` with size and sha256.

    Files are flushed to disk first, so that a manifest never describes data still in flight.
    """
    directory = Path(directory)
    files = {}
    for file in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
        files[file.relative_to(directory).as_posix()] = {"size": file.stat().st_size, "sha256": _sha256_of_file(file)}
    if not files:
        raise RuntimeError(f"the cache build wrote no files into {directory}")
    manifest = {"format": CACHE_FORMAT, "files": files, **(extra or {})}
    path = directory / MANIFEST_FILE
    with open(path, "w") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    return path


def verify_cache_dir(directory: str | os.PathLike, *, full: bool = False) -> str | None:
    """None if ``directory`` is a complete cache entry, else what is wrong with it.

    The default check is cheap (manifest present and readable, every listed file present with its
    recorded size; this catches interrupted writes and truncated files). ``full=True`` also compares
    sha256 digests (about 0.6-0.8 s per 500 MB; a file unchanged since this process hashed it, by
    device, inode, size and modification time, is not hashed again).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return "missing"
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        files = manifest["files"]
        if manifest.get("format") != CACHE_FORMAT or not isinstance(files, dict) or not files:
            return f"manifest {MANIFEST_FILE} has an unknown format"
    except FileNotFoundError:
        return f"no manifest ({MANIFEST_FILE})"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable manifest ({type(error).__name__}: {error})"
    for name, entry in files.items():
        file = directory / name
        if not file.is_file():
            return f"file {name} is missing"
        size = file.stat().st_size
        if size != entry.get("size"):
            return f"file {name} has {size} bytes, the manifest says {entry.get('size')}"
        if full and _sha256_of_file(file) != entry.get("sha256"):
            return f"file {name} does not match its sha256 in the manifest"
    return None


def remove_cache_dir(directory: str | os.PathLike) -> None:
    """Delete a cache entry: renamed away first (atomic), then removed."""
    directory = Path(directory)
    if not directory.exists():
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{directory.name}.trash-", dir=directory.parent))
    try:
        os.replace(directory, trash / directory.name)
    except OSError:
        shutil.rmtree(directory, ignore_errors=True)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_leftovers(root: Path, key: str) -> None:
    """Remove temporary directories of interrupted builds (only called while holding the lock)."""
    for leftover in list(root.glob(f".{key}.tmp-*")) + list(root.glob(f".{key}.trash-*")):
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    from filelock import FileLock, Timeout

    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.warning("waiting for another process that is building %s", path.name[1:-5])
        try:
            lock.acquire(timeout=CACHE_LOCK_TIMEOUT_S)
        except Timeout:
            raise TimeoutError(
                f"gave up after {CACHE_LOCK_TIMEOUT_S} s waiting for the cache lock {path}; if no other "
                "process is building the model, delete the lock file"
            ) from None
    try:
        yield
    finally:
        lock.release()


#: (device, inode, size, mtime_ns) -> sha256 of the files this process has hashed for a full check.
_HASHED: dict[tuple, str] = {}


def _sha256_of_file(path: Path) -> str:
    """sha256 of `path`, remembered while the file's inode, size and modification time stay the same."""
    stat = path.stat()
    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)  # the same after the entry's rename
    if key not in _HASHED:
        _HASHED[key] = _sha256(path)
    return _HASHED[key]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
