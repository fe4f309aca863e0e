"""Files that are whole: atomic writes, and cache entries proved whole by a manifest when read.

Writing. Every file the project writes goes through one of three forms here:
``write_bytes`` / ``write_text``; ``with writing(path) as f:`` (a binary file object, for writers that
stream: ``torch.save``, ``np.save``, ``savefig``); ``with writing_path(path) as tmp:`` (a path, for
writers that only take one, such as a compiler). In each,

- the payload goes to a hidden temporary in the target's own folder (``.<name>.<pid>-<random>.tmp``:
  same filesystem, so the rename is atomic; unique per process and per call);
- the file is fsynced, renamed over the target, and the folder is fsynced, so after a crash readers
  see the old file or the new one, never a mix;
- on any failure the temporary is removed and the target is left as it was;
- a full disk (``ENOSPC``, ``EDQUOT``) becomes one ``DiskFull`` error that names the file and the
  filesystem. ``torch.save`` reports a failed write as a ``RuntimeError`` ("unexpected pos ...") without
  the errno, so the file object given out here keeps the ``OSError`` its own ``write`` raised. A writer
  given only a path cannot pass an errno on; there a failure with under 1 MiB left on the filesystem is
  taken to be the full disk.

Cache entries. ``cached_entry(manifest, build, what)`` returns an entry's record once its files match the
manifest written after them (size and blake2b of every file); an entry with no manifest is built, and a
damaged one (truncated, altered, a file missing) is rebuilt with a note on stderr. The build runs under
a file lock with a second check inside, so concurrent processes (DDP ranks, two runs) build once. The
token cache, the tokenizer cache and the kernel build use it; any new cache should too.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from mtp_lightning.errors import UserError

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_LOW_SPACE = 1 << 20
MANIFEST_FORMAT = "mtp_lightning.manifest/1"
LOCK_TIMEOUT_S = 3600
DEFAULT_FIX = "the previous file, if any, is unchanged: free space there and run again"


class DiskFull(UserError):
    """No space left for a file; the message names it, the filesystem and what to do."""


class Damaged(Exception):
    """A cache entry whose files do not match its manifest (the message says which and how)."""


# ---- writing ------------------------------------------------------------------------------------
def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _mount_point(folder: Path) -> Path:
    p = folder.resolve()
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def _free_bytes(folder: Path) -> int:
    try:
        st = os.statvfs(folder)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize


def _no_space(*errors: BaseException | None) -> bool:
    """True when one of the errors, or an error it was raised from, is a full disk or quota."""
    for e in errors:
        seen = 0
        while e is not None and seen < 8:
            if isinstance(e, OSError) and e.errno in _NO_SPACE:
                return True
            e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _disk_full(path: Path, what: str, fix: str) -> DiskFull:
    folder = path.parent
    return DiskFull(f"disk full while writing {what} '{path}': no space left on the filesystem mounted at "
                    f"'{_mount_point(folder)}' ({max(_free_bytes(folder), 0)} bytes free); {fix}")


def _fsync_folder(folder: Path) -> None:
    # makes the rename durable; some filesystems cannot fsync a folder, and the file is whole either way
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Recorder:
    """The temporary file, keeping the first ``OSError`` of its writes (a writer may re-raise it as
    something else); everything else is the file's own."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str = "file", fix: str = DEFAULT_FIX) -> Iterator[BinaryIO]:
    """A binary file object whose content replaces ``path`` when the block ends without an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    recorder: _Recorder | None = None
    try:
        with open(tmp, "wb") as f:
            recorder = _Recorder(f)
            yield recorder
            recorder.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        # the message is made while the temporary still holds its share of the disk
        full = _disk_full(path, what, fix) if _no_space(e, recorder.error if recorder else None) else None
        tmp.unlink(missing_ok=True)
        if full is not None:
            raise full from None
        raise
    _fsync_folder(path.parent)


@contextlib.contextmanager
def writing_path(path: str | os.PathLike, what: str = "file", fix: str = DEFAULT_FIX) -> Iterator[Path]:
    """A temporary path for a writer to create; it replaces ``path`` when the block ends without an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        # measured before the temporary goes: it may be what filled the disk
        low = isinstance(e, Exception) and 0 <= _free_bytes(path.parent) < _LOW_SPACE
        full = _disk_full(path, what, fix) if _no_space(e) or low else None
        tmp.unlink(missing_ok=True)
        if full is not None:
            raise full from None
        raise
    _fsync_folder(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes, what: str = "file", fix: str = DEFAULT_FIX) -> None:
    with writing(path, what, fix) as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str, what: str = "file", fix: str = DEFAULT_FIX) -> None:
    write_bytes(path, text.encode("utf-8"), what, fix)


# ---- cache entries ------------------------------------------------------------------------------
def sidecar(path: str | os.PathLike) -> Path:
    """The manifest of a one-file entry: ``<name>.manifest`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".manifest")


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(manifest: Path, files: list[Path], record: dict | None = None) -> None:
    """Size and blake2b of each file (all in the manifest's folder or below), then ``record``; written
    after the files, atomically, so its presence means they are complete."""
    entries = {}
    for f in files:
        rel = Path(f).resolve().relative_to(manifest.parent.resolve()).as_posix()
        entries[rel] = {"bytes": Path(f).stat().st_size, "blake2b": _digest(Path(f))}
    data = {"format": MANIFEST_FORMAT, "files": entries, "record": record or {}}
    write_text(manifest, json.dumps(data, indent=1, sort_keys=True), what="cache manifest")


def read_manifest(manifest: Path) -> dict | None:
    """The entry's record when every file matches; None when there is no manifest (never built).
    Raises ``Damaged`` naming the first file that differs."""
    try:
        text = manifest.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        files, record, version = data["files"], data["record"], data["format"]
    except (ValueError, KeyError, TypeError):
        raise Damaged(f"its manifest '{manifest.name}' is unreadable") from None
    if version != MANIFEST_FORMAT:
        raise Damaged(f"its manifest '{manifest.name}' has format {version!r}, this code writes {MANIFEST_FORMAT}")
    for rel, want in files.items():
        f = manifest.parent / rel
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            raise Damaged(f"{rel} is missing") from None
        if size != want["bytes"]:
            raise Damaged(f"{rel} holds {size} bytes, its manifest says {want['bytes']}")
        if _digest(f) != want["blake2b"]:
            raise Damaged(f"the content of {rel} differs from its checksum")
    return record


def cached_entry(manifest: Path, build: Callable[[], tuple[list[Path], dict]], what: str) -> dict:
    """The record of a verified cache entry; ``build()`` (which writes the files and returns them with
    the record to keep) runs under the entry's lock when the entry is missing or damaged. ``what`` names
    the entry in the note, e.g. "the token cache '<folder>'"."""
    try:
        record = read_manifest(manifest)
    except Damaged:
        record = None
    if record is not None:
        return record
    from filelock import FileLock

    manifest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(manifest) + ".lock", timeout=LOCK_TIMEOUT_S):
        try:
            record = read_manifest(manifest)  # another process may have built it while this one waited
        except Damaged as e:
            print(f"note: {what} is damaged ({e}); rebuilding it", file=sys.stderr)
            manifest.unlink(missing_ok=True)  # the old manifest no longer vouches for anything
        if record is not None:
            return record
        files, record = build()
        write_manifest(manifest, files, record)
        return record
