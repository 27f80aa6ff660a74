"""The spool: encrypted, fsync'd blobs on the local disk, one file per object.

Instances up to :data:`INLINE_MAX_BYTES` are not spool files: they are sealed into their
queue row (:func:`row_context`), so one commit makes them durable.

A blob's name is ``<UTC hour>-<random>``: it reveals nothing about the content, it is
never reused (so a file is written once, in place, with no rename), and objects of the
same hour share a directory, so a new directory (and its extra fsync) is needed once an
hour.  :meth:`Spool.put` returns only after the file and its directory entry are on
disk; the caller then commits the queue row that references it, and only then answers
the peer.  A crash before that commit leaves an unreferenced file, never a referenced
partial one.

Files are created ahead, empty, in batches (:data:`POOL_BATCH` files, then one fsync of
their directory), so writing an object costs one ``fdatasync`` of its own data and no
directory fsync: a new file's directory entry is what makes a create expensive, and here
it is already on disk when the object is written.  A crash leaves at most one batch of
empty, unreferenced files; a clean shutdown removes them (:meth:`Spool.close`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

from gateway.errors import IntegrityError, SpoolFull
from gateway.security.crypto import Sealer, fsync_dir, key_id_of

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}

POOL_BATCH = 32  # empty files created (and their directory fsync'd) at a time
#: instances up to this size are kept sealed in their queue row, not in a spool file: one
#: commit makes them durable instead of a file ``fdatasync`` and then the commit
INLINE_MAX_BYTES = 64 * 1024
#: what a spool key looks like (``<UTC hour YYYYMMDDHH>-<32 hex>``), e.g. inside a payload
SPOOL_KEY = re.compile(r"\b\d{10}-[0-9a-f]{32}\b")


def row_context(envelope_id: str) -> bytes:
    """The associated data an instance kept in its queue row is sealed with (a spool file's
    is its key): a blob moved to another row does not open."""
    return b"dicom:" + envelope_id.encode()


class Spool:
    def __init__(self, root: Path, sealer: Sealer, *, pool: bool = True) -> None:
        """*pool*: create files ahead in batches (the writers' spool); readers pass False."""
        self.root = root
        self.sealer = sealer
        self._known_dirs: set[Path] = set()
        self._pool: deque[str] = deque()
        self._pool_lock = threading.Lock()
        self._use_pool = pool
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def new_key(now: float | None = None) -> str:
        hour = time.strftime("%Y%m%d%H", time.gmtime(time.time() if now is None else now))
        return f"{hour}-{secrets.token_hex(16)}"

    def path_for(self, key: str) -> Path:
        return self.root / key[:8] / key[8:10] / f"{key}.blob"

    def put(self, data: bytes) -> str:
        """Encrypt and durably write *data* under a new key; return the key.

        Raises :class:`SpoolFull` (a transient error) when the disk refuses the write.
        """
        key, created = self._take()
        return self._write_new(key, self.sealer.seal_parts(data, key.encode()), created)

    def put_file(self, source: Path, chunk: int = 4 << 20) -> str:
        """Like :meth:`put`, for the contents of a file, streamed: memory stays at *chunk*
        bytes whatever the file's size."""
        key, created = self._take()

        def chunks() -> Iterator[bytes]:
            with source.open("rb") as f:
                while block := f.read(chunk):
                    yield block

        return self._write_new(key, self.sealer.seal_stream(chunks(), key.encode()), created)

    def _take(self) -> tuple[str, bool]:
        """A key for a new object, and whether its (empty) file already exists on disk."""
        if not self._use_pool:
            return self.new_key(), False
        with self._pool_lock:
            if not self._pool:
                self._fill_pool()
            return self._pool.popleft(), True

    def _fill_pool(self) -> None:
        """Create a batch of empty files, then make their directory entries durable with
        one directory fsync.  Raises :class:`SpoolFull` when the disk refuses."""
        keys = [self.new_key() for _ in range(POOL_BATCH)]
        made: list[Path] = []
        try:
            for key in keys:
                path = self.path_for(key)
                try:
                    fd = self._create(path)
                except FileNotFoundError:  # the directory went away under us: make it again
                    self._known_dirs.discard(path.parent)
                    fd = self._create(path)
                os.close(fd)
                made.append(path)
            for directory in {p.parent for p in made}:
                fsync_dir(directory)
        except OSError as exc:
            for path in made:
                _unlink_quietly(path)
            raise _spool_error(exc) from exc
        self._pool.extend(keys)

    def close(self) -> None:
        """Remove the files created ahead and not used (a crash leaves them: empty and
        unreferenced, like any object whose queue commit did not happen)."""
        with self._pool_lock:
            while self._pool:
                _unlink_quietly(self.path_for(self._pool.popleft()))

    def _write_new(self, key: str, parts: Iterable[bytes], created: bool = False) -> str:
        path = self.path_for(key)
        try:
            if created:
                fd = os.open(path, os.O_WRONLY)  # empty, its directory entry durable already
            else:
                try:
                    fd = self._create(path)
                except FileNotFoundError:  # the directory went away under us: make it again
                    self._known_dirs.discard(path.parent)
                    fd = self._create(path)
            try:
                for part in parts:
                    _write_all(fd, part)
                os.fdatasync(fd)
            finally:
                os.close(fd)
            if not created:
                fsync_dir(path.parent)
        except OSError as exc:
            _unlink_quietly(path)
            raise _spool_error(exc) from exc
        return key

    def _create(self, path: Path) -> int:
        self._ensure_dir(path.parent)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._known_dirs:
            return
        created = []
        for d in (directory.parent, directory):
            if not d.exists():
                d.mkdir(mode=0o700, exist_ok=True)
                created.append(d)
        for d in created:  # make the new directories' own entries durable
            fsync_dir(d.parent)
        self._known_dirs.add(directory)

    def get(self, key: str) -> bytes:
        path = self.path_for(key)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"spool object {key} is missing") from None
        return self.sealer.open(blob, key.encode())

    def size(self, key: str) -> int | None:
        """The size of a blob on disk, or None when it is not there."""
        try:
            return self.path_for(key).stat().st_size
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return self.path_for(key).exists()

    def sweep(
        self, before: float, referenced: set[str], *, dry_run: bool = False
    ) -> tuple[int, int]:
        """Remove the spool files written before *before* (a time) that no row names
        (deleted by retention, or left by a crash between a write and its commit); return
        (files, bytes).  A file's hour is in its name; within *before*'s own hour its
        modification time decides.  Empty files are spares created ahead: left alone."""
        limit = time.strftime("%Y%m%d%H", time.gmtime(before))
        with self._pool_lock:
            spares = set(self._pool)
        files = size = 0
        for day in sorted(self.root.glob("[0-9]" * 8)):
            if day.name > limit[:8]:
                break
            for hour in sorted(day.iterdir()):
                if day.name + hour.name > limit:
                    break
                same_hour = day.name + hour.name == limit
                for path in hour.glob("*.blob"):
                    key = path.name[: -len(".blob")]
                    if key in referenced or key in spares:
                        continue
                    try:
                        st = path.stat()
                    except FileNotFoundError:
                        continue
                    length = st.st_size
                    if length == 0 or (same_hour and st.st_mtime >= before):
                        continue
                    files += 1
                    size += length
                    if not dry_run:
                        _unlink_quietly(path)
                if not dry_run:
                    with contextlib.suppress(OSError):
                        hour.rmdir()  # only when empty
            if not dry_run:
                with contextlib.suppress(OSError):
                    day.rmdir()
        return files, size

    def key_ids_in_use(self) -> set[str]:
        """The data keys the spool's files are sealed with (from each file's header)."""
        used: set[str] = set()
        for path in self.root.glob("*/*/*.blob"):
            try:
                with path.open("rb") as f:
                    head = f.read(64)
            except FileNotFoundError:
                continue
            key_id = key_id_of(head)
            if key_id:
                used.add(key_id)
        return used

    def discard(self, key: str) -> None:
        """Remove a blob that no queue row references (e.g. the loser of a duplicate race)."""
        _unlink_quietly(self.path_for(key))


def _spool_error(exc: OSError) -> SpoolFull:
    if exc.errno in _FULL_ERRNOS:
        return SpoolFull(f"spool cannot write: {os.strerror(exc.errno or 0)}")
    return SpoolFull(f"spool write failed: {exc}")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
