"""The spool: encrypted, content-addressed, fsync'd blobs on the local disk.

A blob's name is a keyed hash of its plaintext, so the same bytes received twice are
stored once and a name reveals nothing about the content.  :meth:`Spool.put` returns only
after the file and its directory entry are on disk; the caller then commits the queue row
that references it, and only then answers the peer.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import os
from pathlib import Path

from gateway.errors import IntegrityError, SpoolFull
from gateway.store.crypto import Sealer, fsync_dir

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


class Spool:
    def __init__(self, root: Path, sealer: Sealer) -> None:
        self.root = root
        self.sealer = sealer
        self._known_dirs: set[Path] = set()
        self.root.mkdir(parents=True, exist_ok=True)

    def key_for(self, data: bytes) -> str:
        return hmac.new(self.sealer.keys.index_key, data, hashlib.sha256).hexdigest()[:40]

    def path_for(self, key: str) -> Path:
        return self.root / key[:2] / key[2:4] / f"{key}.blob"

    def put(self, data: bytes) -> str:
        """Encrypt and durably write *data*; return its spool key.

        Raises :class:`SpoolFull` (a transient error) when the disk refuses the write.
        """
        key = self.key_for(data)
        path = self.path_for(key)
        if path.exists():
            # Same plaintext already stored (name = keyed hash of content).  Its writer may
            # have died between rename and directory fsync, so make the entry durable now.
            fsync_dir(path.parent)
            return key
        sealed = self.sealer.seal(data, key.encode())
        tmp = path.with_name(f".{key}.{os.getpid()}.tmp")
        try:
            self._ensure_dir(path.parent)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(sealed)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except OSError as exc:
            _unlink_quietly(tmp)
            if exc.errno in _FULL_ERRNOS:
                raise SpoolFull(f"spool cannot write: {os.strerror(exc.errno or 0)}") from exc
            raise SpoolFull(f"spool write failed: {exc}") from exc
        return key

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

    def exists(self, key: str) -> bool:
        return self.path_for(key).exists()


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
