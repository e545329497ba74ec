"""Cache entries that are verified before use and safe to share between processes.

An entry is a directory `<cache root>/<kind>/<name>/` holding the files its builder wrote and a
completeness marker, `MANIFEST.json`: the size and SHA-256 of every file. It is built in a staging
directory beside it, under a per-entry file lock, and renamed into place after the marker is written
and everything is fsynced, so a killed build never looks finished. A reader checks every file
against the marker; an entry that is partial, damaged or does not match is never used: it is built
again, with one notice on stderr. Two processes that need the same missing entry build it once:
the second waits on the lock and then reads what the first wrote.

Hashing costs ~0.65 s per GB (SHA-256 at ~1.5 GB/s on a quiet core of the 2-core dev machine); the
largest entry, SmolLM2-135M converted to fp32 safetensors (513 MiB), took 0.9-1.1 s to check under
load 9-13 (a warm load of it 1.6 s in all), the tiny models' entries milliseconds.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock, Timeout

from softprompt.core import atomic
from softprompt.core.errors import UserError
from softprompt.core.paths import cache_dir

MANIFEST = "MANIFEST.json"
FORMAT = 1  # of the marker itself
_CHUNK = 1 << 20


class Damaged(Exception):
    """An entry that exists but cannot be trusted; the message says why, in a few words."""


def notice(message: str) -> None:
    print(f"softprompt: {message}", file=sys.stderr, flush=True)


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def verify(directory: Path) -> dict:
    """The entry's marker if every file it lists is there with its size and hash; else `Damaged`.

    Hashing is skipped for a file whose size and mtime are those the marker recorded, when that
    mtime is strictly older than the marker itself: a later write would have moved the mtime, and
    a write in the same clock tick as the marker ("racily clean", as git calls it) still gets the
    full hash. Re-hashing SmolLM2's 513 MiB of weights on every load cost about a second.
    A file that had to be hashed and matched (a marker written before mtimes were recorded, a
    file touched or copied since) gets its mtime recorded, so the next check trusts it.
    """
    if not directory.is_dir():
        raise FileNotFoundError(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        assert manifest["format"] == FORMAT and isinstance(files, dict)
    except FileNotFoundError:
        raise Damaged("no completeness marker") from None  # an unfinished build, or one by an older softprompt
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
        raise Damaged(f"unreadable marker: {type(exc).__name__}") from None
    marker_mtime = (directory / MANIFEST).stat().st_mtime_ns
    hashed: dict[str, int] = {}  # files found intact by their hash, whose mtime the marker lacks
    for rel, expected in files.items():
        path = directory / rel
        if not path.is_file():
            raise Damaged(f"{rel} is missing")
        stat = path.stat()
        if stat.st_size != expected["size"]:
            raise Damaged(f"{rel} has {stat.st_size} bytes, not {expected['size']}")
        mtime = stat.st_mtime_ns
        if mtime == expected.get("mtime_ns") and mtime < marker_mtime:
            continue  # unchanged since the marker was written, which hashed it
        if file_digest(path) != expected["sha256"]:
            raise Damaged(f"{rel} does not match its SHA-256")
        if mtime != expected.get("mtime_ns") and path.stat().st_mtime_ns == mtime:  # not written while hashed
            hashed[rel] = mtime
    extra = {p.relative_to(directory).as_posix() for p in _files(directory)} - set(files)
    if extra:
        raise Damaged(f"unexpected file {sorted(extra)[0]}")
    if hashed:
        _record_mtimes(directory, manifest, hashed)
    return manifest


def _record_mtimes(directory: Path, manifest: dict, mtimes: dict[str, int]) -> None:
    """Record the mtimes of files just hashed and found intact in the entry's marker, so the next
    check trusts them by size and mtime (the rule above: the new marker is newer than they are).

    Best effort, and only under the entry's lock without waiting: a read-only cache or an entry
    being rebuilt keeps its marker. The new marker is written beside the entry and renamed into
    it, so a concurrent reader never sees a file the marker does not list.
    """
    marker = directory / MANIFEST
    try:
        lock = FileLock(str(directory.parent / f".{directory.name}.lock"))
        lock.acquire(timeout=0)
    except (Timeout, OSError):
        return
    tmp: str | None = None
    try:
        if json.loads(marker.read_text(encoding="utf-8")) != manifest:
            return  # rewritten since it was read (a rebuild): not ours to change
        updated = json.loads(json.dumps(manifest))
        for rel, mtime in mtimes.items():
            updated["files"][rel]["mtime_ns"] = mtime
        fd, tmp = tempfile.mkstemp(prefix=f".{directory.name}.marker-", dir=directory.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(updated, indent=1))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, marker)
        tmp = None
    except (OSError, ValueError):
        pass  # the marker stays as it was: the files are hashed again next time, nothing worse
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        lock.release()


def _commit(staging: Path, target: Path) -> None:
    """Mark `staging` complete and put it where `target` is; the caller holds the entry's lock."""
    files = {}
    for path in _files(staging):
        atomic.fsync_path(path)
        stat = path.stat()  # the rename into place keeps the mtime that verify() compares with
        files[path.relative_to(staging).as_posix()] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                                       "sha256": file_digest(path)}
    if not files:
        raise RuntimeError(f"cache entry {target} was built empty")
    marker = {"format": FORMAT, "files": files, "created": time.time()}
    (staging / MANIFEST).write_text(json.dumps(marker, indent=1), encoding="utf-8")
    atomic.fsync_path(staging / MANIFEST)
    atomic.fsync_path(staging)
    if target.exists() or target.is_symlink():
        # a directory cannot be renamed over a non-empty one: move the damaged entry aside first.
        # Readers that look in between find nothing and wait on the lock we hold.
        trash = target.with_name(f".trash-{target.name}-{os.getpid()}")
        os.replace(target, trash)
        os.replace(staging, target)
        _remove(trash)
    else:
        os.replace(staging, target)
    atomic.fsync_path(target.parent)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def entry(kind: str, name: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """(directory, built now): the verified entry `kind/name`, built first if missing or damaged.

    `build(staging)` writes the entry's files into the empty directory `staging`; it runs under
    the entry's lock, at most once at a time for one entry across all processes on this machine
    (across machines only on a shared filesystem whose locks work between them, e.g. NFSv4).
    A complete entry is read without the lock, so a read-only cache that holds it still works.
    """
    directory = cache_dir(kind)
    target = directory / name
    try:
        verify(target)
        return target, False  # the common case: no lock needed to read a complete entry
    except (FileNotFoundError, Damaged):
        pass
    lock = FileLock(str(directory / f".{name}.lock"))
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            notice(f"waiting for cache entry {kind}/{name}: another process is building it")
            lock.acquire()
    except OSError as exc:
        raise UserError(f"cannot lock cache entry {kind}/{name} in {directory} ({exc.strerror or exc}); "
                        "make it writable or point SOFTPROMPT_CACHE to a writable directory") from exc
    try:
        try:
            verify(target)
            return target, False  # built by the process we waited for
        except FileNotFoundError:
            pass
        except Damaged as exc:
            notice(f"cache entry {kind}/{name} was damaged ({exc}); rebuilding")
        # staging dirs of this entry left by killed builds: nobody else can own them, we hold the lock
        for stale in directory.glob(f".staging-{name}-*"):
            _remove(stale)
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{name}-", dir=directory))
        try:
            build(staging)
            _commit(staging, target)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            written = sum(p.stat().st_size for p in _files(staging))
            raise UserError(
                f"no space left for cache entry {kind}/{name} in {directory} ({written / 2**20:.1f} MiB written, "
                f"{shutil.disk_usage(directory).free / 2**20:.1f} MiB free); free some space or point "
                "SOFTPROMPT_CACHE to a larger disk"
            ) from exc
        finally:
            _remove(staging)
        return target, True
    finally:
        lock.release()


def json_entry(kind: str, name: str, compute: Callable[[], Any],
               check: Callable[[Any], Any] = lambda value: value) -> tuple[Any, bool]:
    """(value, cache hit) for a JSON-serialisable value stored as the entry `kind/name`.

    `check(value)` turns what was read into what the caller uses; if it raises (a value of another
    shape), the entry counts as damaged and `compute()` is stored again.
    """
    computed: list[Any] = []

    def build(staging: Path) -> None:
        value = compute()
        computed.append(value)
        (staging / "value.json").write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")

    for attempt in range(2):
        path, built = entry(kind, name, build)
        if built:
            return computed[0], False
        try:
            return check(json.loads((path / "value.json").read_text(encoding="utf-8"))), True
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if attempt:
                raise
            # verified bytes that do not parse to the expected shape: written by another version
            with FileLock(str(path.parent / f".{name}.lock")):
                notice(f"cache entry {kind}/{name} was damaged ({type(exc).__name__} reading it); rebuilding")
                _remove(path)
    raise AssertionError("unreachable")


# --- Hugging Face Hub downloads --------------------------------------------------------------------
# The Hub cache (`$HF_HOME/hub`) is the library's, not ours: its blobs are named by their content
# hash (SHA-256 for LFS files such as weights, git's blob SHA-1 for small files), so they can be
# checked offline. A damaged blob is removed when the Hub can send it again; otherwise the run
# cannot continue and says how to clear the entry.

_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA1 = re.compile(r"[0-9a-f]{40}")


# blobs found whole in this process, by (path, size, mtime): the start-up checks and the loader
# both check the download, and hashing a 1 GB model twice would cost a second
_whole_blobs: set[tuple[str, int, int]] = set()


def _blob_damage(blob: Path) -> str | None:
    stat = blob.stat()
    seen = (str(blob), stat.st_size, stat.st_mtime_ns)
    if seen in _whole_blobs:
        return None
    problem = _hash_mismatch(blob)
    if problem is None:
        _whole_blobs.add(seen)
    return problem


def _hash_mismatch(blob: Path) -> str | None:
    name = blob.name
    if _SHA256.fullmatch(name):
        return None if file_digest(blob) == name else "does not match its SHA-256"
    if _SHA1.fullmatch(name):
        digest = hashlib.sha1(f"blob {blob.stat().st_size}\0".encode())
        with open(blob, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        return None if digest.hexdigest() == name else "does not match its git SHA-1"
    return None  # not a content-addressed blob (e.g. a cache written without symlinks): unchecked


def check_hub_snapshot(repo_id: str, revision: str | None, can_download: bool) -> None:
    """Verify the cached files of Hub model `repo_id`; remove damaged ones if they can be downloaded
    again, raise `UserError` if not. Nothing happens for a model that is not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return  # not cached (or not a valid id): the loader downloads it or names the problem
    for link in sorted(snapshot.rglob("*")):
        if not link.is_symlink() and not link.is_file():
            continue
        rel = link.relative_to(snapshot).as_posix()
        blob = link.resolve()
        problem = "is missing" if not blob.is_file() else _blob_damage(blob)
        if problem is None:
            continue
        repo_dir = snapshot.parents[1]
        if not can_download:
            raise UserError(
                f"cache entry for Hub model {repo_id!r} is damaged ({rel} {problem}) and the Hub is unreachable to "
                f"download it again; connect and rerun, or clear it with `rm -rf {repo_dir}`"
            )
        notice(f"cache entry hub:{repo_id}/{rel} was damaged ({problem}); downloading it again")
        link.unlink()
        if blob.is_file():
            blob.unlink()
