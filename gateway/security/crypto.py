"""At-rest encryption: AES-256-GCM with per-object nonces and envelope keys.

The key file (``encryption_key_file``, created 0600 on first run) holds a master key and
the data keys, each wrapped by the master key (AES key wrap, RFC 3394).  Blobs are
encrypted with the *current* data key; rotation adds a new current key and keeps the old
ones, so old blobs stay readable.  Keeping the master key apart (a KMS, an HSM) later
changes only :class:`KeyStore`.

Blob format::

    b"GWE1" | key id length (1 byte) | key id (ascii) | nonce (12 bytes) | ciphertext | tag (16)

The header and the caller's *context* (e.g. the object's spool name) are authenticated
data, so a blob renamed or copied to another object fails to decrypt.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap, aes_key_wrap

from gateway.errors import IntegrityError, KeyStoreError

MAGIC = b"GWE1"
KEY_GRACE = 3600.0  # seconds a replaced data key is kept at least (see KeyStore.forget)
NONCE_BYTES = 12
TAG_BYTES = 16


@dataclass(frozen=True)
class DataKey:
    key_id: str
    key: bytes
    created: float


class KeyStore:
    """The master key and the wrapped data keys, in one JSON file readable only by us."""

    def __init__(self, path: Path, master: bytes, keys: list[DataKey], current: str) -> None:
        self.path = path
        self._master = master
        self._keys = {k.key_id: k for k in keys}
        self.current = current
        self._lock = threading.Lock()
        self._seen = _mtime(path)  # the key file as last read (see refresh)
        self._checked = time.monotonic()
        # A keyed hash for identifiers (UIDs, MSH-10): stable across rotations, never reversible.
        self.index_key = HKDF(SHA256(), 32, salt=None, info=b"gateway index v1").derive(master)

    @classmethod
    def open(cls, path: Path, *, create: bool = True) -> KeyStore:
        """Load the key file, creating it (mode 0600) with a first data key when missing."""
        if not path.exists():
            if not create:
                raise KeyStoreError(f"encryption key file '{path}' does not exist")
            return cls._create(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            master = base64.b64decode(raw["master_key"])
            keys = [
                DataKey(
                    k["id"], aes_key_unwrap(master, base64.b64decode(k["wrapped"])), k["created"]
                )
                for k in raw["data_keys"]
            ]
            store = cls(path, master, keys, raw["current"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KeyStoreError(
                f"encryption key file '{path}' is unreadable or corrupt: {exc}"
            ) from None
        if store.current not in store._keys:
            raise KeyStoreError(f"encryption key file '{path}': current key is missing")
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise KeyStoreError(
                f"encryption key file '{path}' has mode {mode:o}; it must be readable by the "
                f"gateway's user only (chmod 600 '{path}')"
            )
        return store

    @classmethod
    def _create(cls, path: Path) -> KeyStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        master = AESGCM.generate_key(bit_length=256)
        first = DataKey(_new_key_id(), AESGCM.generate_key(bit_length=256), time.time())
        store = cls(path, master, [first], first.key_id)
        if not store._write(exclusive=True):
            # another process (or node, on shared storage) created it first: use its keys,
            # else what each process sealed could never be opened by the others
            return cls.open(path, create=False)
        return store

    def _save(self) -> None:
        self._write(exclusive=False)

    def _write(self, *, exclusive: bool) -> bool:
        """Write the key file whole under a name of its own, then put it in place: replacing
        the file, or, when *exclusive*, only where there is none yet (a hard link fails on
        an existing name, on local file systems and NFS alike, and a reader never sees half
        a file).  False: *exclusive* and the file exists."""
        doc = {
            "format": 1,
            "note": "AI gateway at-rest keys. Back this file up separately from the data; "
            "without it the spool cannot be read.",
            "master_key": base64.b64encode(self._master).decode(),
            "current": self.current,
            "data_keys": [
                {
                    "id": k.key_id,
                    "created": k.created,
                    "wrapped": base64.b64encode(aes_key_wrap(self._master, k.key)).decode(),
                }
                for k in self._keys.values()
            ],
        }
        data = json.dumps(doc, indent=2).encode()
        # a name of our own: two processes writing at once must not share one temporary file
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        _write_new(tmp, data)
        try:
            if exclusive:
                os.link(tmp, self.path)
            else:
                os.replace(tmp, self.path)
        except FileExistsError:
            return False
        except OSError:
            if not exclusive:
                raise
            # no hard links on this file system (some FUSE and SMB mounts): create the name
            # itself exclusively (a reader may then see it before it is whole, and fail)
            try:
                _write_new(self.path, data)
            except FileExistsError:
                return False
        finally:
            tmp.unlink(missing_ok=True)  # the link's other name (replace left none)
        fsync_dir(self.path.parent)
        self._seen = _mtime(self.path)
        return True

    def rotate(self) -> DataKey:
        """Add a new data key and make it current; older keys stay for reading."""
        with self._lock:
            new = DataKey(_new_key_id(), AESGCM.generate_key(bit_length=256), time.time())
            self._keys[new.key_id] = new
            self.current = new.key_id
            self._save()
            return new

    def refresh(self, *, every: float = 1.0) -> None:
        """Pick up a rotation another process (``gateway keys rotate``) wrote to the key
        file: checked at most every *every* seconds, re-read only when the file changed."""
        now = time.monotonic()
        if now - self._checked < every:
            return
        self._checked = now
        seen = _mtime(self.path)
        if seen == self._seen or seen is None:
            return
        with self._lock:
            on_disk = KeyStore.open(self.path, create=False)
            self._keys = dict(on_disk._keys)
            self.current = on_disk.current
            self._seen = seen

    def forget(
        self, key_ids: Iterable[str], *, now: float | None = None, grace: float = KEY_GRACE
    ) -> list[str]:
        """Destroy data keys that no stored object uses any more (never the current one):
        whatever they sealed, copies included, can no longer be decrypted.  Returns the ids
        destroyed.  The file is re-read first, so a key another process added is kept and
        one it destroyed stays destroyed.

        A key replaced less than *grace* seconds ago is kept: a running gateway notices a
        rotation within a second (:meth:`refresh`) but may still be sealing an object with
        the old key meanwhile, and that object's file may not exist yet."""
        now = time.time() if now is None else now
        with self._lock:
            on_disk = KeyStore.open(self.path, create=False)
            self._keys = dict(on_disk._keys)  # the file is the truth (rotations, forgets)
            self.current = on_disk.current
            created = sorted(k.created for k in self._keys.values())

            def replaced_long_ago(key: DataKey) -> bool:
                later = [c for c in created if c > key.created]
                return bool(later) and later[0] < now - grace

            gone = [
                k
                for k in key_ids
                if k in self._keys and k != self.current and replaced_long_ago(self._keys[k])
            ]
            for key_id in gone:
                del self._keys[key_id]
            if gone:
                self._save()
            return gone

    @property
    def key_ids(self) -> list[str]:
        return list(self._keys)

    def key(self, key_id: str) -> bytes:
        if key_id not in self._keys:
            self.refresh(every=0)  # a key made by a rotation since we read the file
        try:
            return self._keys[key_id].key
        except KeyError:
            raise IntegrityError(f"blob encrypted with unknown data key '{key_id}'") from None

    def current_key(self) -> DataKey:
        self.refresh()
        return self._keys[self.current]

    def index(self, *parts: str) -> str:
        """Keyed hash of identifiers: how UIDs and control ids are stored and logged."""
        mac = hmac.new(self.index_key, digestmod=hashlib.sha256)
        for part in parts:
            mac.update(part.encode("utf-8", "surrogateescape"))
            mac.update(b"\x1f")
        return mac.hexdigest()[:32]


def _mtime(path: Path) -> tuple[int, int, int] | None:
    """What tells that the key file changed: its inode (a save replaces the file, so a new
    inode even within one tick of the file system's clock), modification time and size."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def key_id_of(blob_head: bytes) -> str:
    """The data key id in a sealed blob's header ("" when it is not one)."""
    if blob_head[:4] != MAGIC or len(blob_head) < 5 or len(blob_head) < 5 + blob_head[4]:
        return ""
    try:
        return blob_head[5 : 5 + blob_head[4]].decode("ascii")
    except UnicodeDecodeError:
        return ""


def _new_key_id() -> str:
    return time.strftime("k%Y%m%d%H%M%S-", time.gmtime()) + secrets.token_hex(3)


def _write_new(path: Path, data: bytes) -> None:
    """Create *path* (mode 0600; FileExistsError when it exists) holding *data*, synced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Sealer:
    """Encrypts and decrypts blobs with the key store's keys."""

    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys

    def _header(self, key_id: str, nonce: bytes) -> bytes:
        kid = key_id.encode("ascii")
        return MAGIC + bytes([len(kid)]) + kid + nonce

    def seal(self, plaintext: bytes, context: bytes) -> bytes:
        header, body = self.seal_parts(plaintext, context)
        return header + body

    def seal_parts(self, plaintext: bytes, context: bytes) -> tuple[bytes, bytes]:
        """The blob as (header, ciphertext + tag), so a large one is never copied to join."""
        dk = self.keys.current_key()
        nonce = os.urandom(NONCE_BYTES)
        header = self._header(dk.key_id, nonce)
        return header, AESGCM(dk.key).encrypt(nonce, plaintext, header + context)

    def seal_stream(self, chunks: Iterable[bytes], context: bytes) -> Iterator[bytes]:
        """Encrypt a stream chunk by chunk: header, ciphertext pieces, then the tag."""
        dk = self.keys.current_key()
        nonce = os.urandom(NONCE_BYTES)
        header = self._header(dk.key_id, nonce)
        enc = Cipher(algorithms.AES(dk.key), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(header + context)
        yield header
        for chunk in chunks:
            yield enc.update(chunk)
        yield enc.finalize() + enc.tag

    def _parse_header(self, blob: bytes) -> tuple[bytes, bytes, int]:
        if blob[:4] != MAGIC or len(blob) < 5:
            raise IntegrityError("not an encrypted gateway blob")
        n = blob[4]
        start = 5 + n + NONCE_BYTES
        if len(blob) < start + TAG_BYTES:
            raise IntegrityError("encrypted blob is truncated")
        try:
            key_id = blob[5 : 5 + n].decode("ascii")
        except UnicodeDecodeError:
            raise IntegrityError("encrypted blob header is damaged") from None
        return self.keys.key(key_id), blob[:start], start

    def open(self, blob: bytes, context: bytes) -> bytes:
        key, header, start = self._parse_header(blob)
        nonce = header[-NONCE_BYTES:]
        try:
            return AESGCM(key).decrypt(nonce, blob[start:], header + context)
        except InvalidTag:
            raise IntegrityError(
                "encrypted blob failed authentication (tampered, "
                "truncated, or moved from another object)"
            ) from None
