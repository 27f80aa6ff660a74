"""The durable store: key store + spool + queue, behind the few calls the edges need.

``ingest_*`` return only after the object is durable (spool fsync'd, queue row
committed); the edge answers success after that and never before.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.config import Config
from gateway.envelope import Envelope, Kind, new_id
from gateway.errors import KeyStoreError
from gateway.security.crypto import MAGIC, KeyStore, Sealer
from gateway.store.backend import (
    database_label,
    database_password,
    open_queue,
    queue_exists,
)
from gateway.store.queue import Ack, Queue
from gateway.store.space import MB, SpaceGuard
from gateway.store.spool import INLINE_MAX_BYTES, Spool, row_context


def attr_text(attrs: dict[str, Any], keyword: str) -> str:
    """One routing attribute of :meth:`Store.attrs` as a string: a multi-valued one's
    first value, "" when absent or empty."""
    value = attrs.get(keyword)
    if isinstance(value, list):
        value = value[0] if value else ""
    return str(value or "")


class Store:
    def __init__(
        self,
        data_dir: Path,
        key_file: Path,
        *,
        create: bool = True,
        durable: bool = True,
        lock: threading.Lock | None = None,
        database: str | None = None,
        database_password: str | None = None,
        spool_dir: Path | None = None,
        min_free: int = 0,
    ) -> None:
        """The key store, the spool (``spool_dir``, default ``data_dir/spool``) and the
        queue (``database``: None for the SQLite file in *data_dir*, or a PostgreSQL URL).

        *durable* and *lock*: see :func:`~gateway.store.backend.open_queue`; the workers'
        store (:meth:`for_workers`) is not durable per commit and shares this one's lock.
        *create*: make a new key file when there is none, unless the queue database exists
        already (its data would be sealed with the missing key)."""
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = lock or threading.Lock()
        self._args = (data_dir, key_file, database, database_password, spool_dir)
        if create and not key_file.exists() and queue_exists(data_dir, database, database_password):
            # A new key would silently make every stored object unreadable.
            raise KeyStoreError(
                f"encryption key file '{key_file}' is missing but the queue "
                f"({database_label(database, data_dir)}) holds data encrypted with it; restore "
                "the key file from backup (refusing to create a new key)"
            )
        self.queue: Queue = open_queue(
            data_dir,
            database=database,
            password=database_password,
            durable=durable,
            lock=self._lock,
        )
        self.keys = KeyStore.open(key_file, create=create)
        self.sealer = Sealer(self.keys)
        self.spool = Spool(spool_dir or data_dir / "spool", self.sealer)
        # ingest stops taking new data while a volume is below min_free bytes (0: never)
        self.space = SpaceGuard({"data": data_dir, "spool": self.spool.root}, min_free)

    @classmethod
    def for_config(cls, cfg: Config, *, create: bool = True, durable: bool = True) -> Store:
        """The store a configuration names (``gateway.data_dir``, ``database``,
        ``spool_dir``, ``encryption_key_file``)."""
        return cls(
            cfg.data_dir,
            cfg.key_file,
            create=create,
            durable=durable,
            database=cfg.gateway.database,
            database_password=database_password(cfg),
            spool_dir=cfg.spool_dir,
            min_free=cfg.gateway.min_free_mb * MB,
        )

    def for_workers(self) -> Store:
        """The same store for the workers' bookkeeping: commits not fsync'd one by one (a
        power cut can only make a job run again), taking turns with this store's."""
        data_dir, key_file, database, password, spool_dir = self._args
        return Store(
            data_dir,
            key_file,
            durable=False,
            lock=self._lock,
            database=database,
            database_password=password,
            spool_dir=spool_dir,
        )

    def _seal_attrs(self, envelope_id: str, attrs: dict[str, Any]) -> bytes:
        return self.sealer.seal(json.dumps(attrs).encode(), b"attrs:" + envelope_id.encode())

    def ingest_instance(
        self,
        data: bytes | Path,
        *,
        sop_instance_uid: str,
        study_instance_uid: str,
        attrs: dict[str, Any],
        source: str,
        quiet: float,
        now: float | None = None,
    ) -> Ack:
        """Durably store one DICOM instance: Part 10 bytes as received, or a file holding
        them (streamed, for instances larger than memory).  Up to
        :data:`~gateway.store.spool.INLINE_MAX_BYTES`, the bytes are sealed into the queue
        row (one commit); larger ones go to the spool first.  A SOP Instance UID seen
        before is acknowledged as a duplicate and not stored again; it restarts its study's
        quiet period (a study sent again is processed again)."""
        dedup_key = self.keys.index("dicom", sop_instance_uid)
        existing = self.queue.find(dedup_key)
        received_at = time.time() if now is None else now
        if existing is not None:
            self.queue.touch_study(self.keys.index("study", study_instance_uid), received_at, quiet)
            return Ack(new=False, envelope_id=existing)
        self.space.check()  # new data only while the volumes have room (SpaceLow: 0xA700)
        envelope_id = new_id()
        inline: bytes | None = None
        spool_key: str | None = None
        if isinstance(data, Path):
            size = data.stat().st_size
            spool_key = self.spool.put_file(data)
        elif len(data) <= INLINE_MAX_BYTES:
            size = len(data)
            inline = self.sealer.seal(data, row_context(envelope_id))
        else:
            size = len(data)
            spool_key = self.spool.put(data)
        env = Envelope(
            id=envelope_id,
            kind=Kind.DICOM,
            source=source,
            received_at=received_at,
            dedup_key=dedup_key,
            spool_key=spool_key,
            study_key=self.keys.index("study", study_instance_uid),
            size=size,
        )
        try:
            ack = self.queue.record_instance(env, self._seal_attrs(env.id, attrs), quiet, inline)
        except BaseException:
            if spool_key is not None:
                self.spool.discard(spool_key)
            raise
        if not ack.new and spool_key is not None:  # another association stored it meanwhile
            self.spool.discard(spool_key)
        return ack

    def ingest_message(
        self,
        raw: bytes,
        *,
        sender: tuple[str, str],
        control_id: str,
        attrs: dict[str, Any],
        source: str,
        build_ack: Callable[[str], bytes],
        now: float | None = None,
    ) -> Ack:
        """Durably store one HL7 message with its ACK.  A control id (MSH-10) already
        received from the same sender returns the stored ACK and stores nothing."""
        self.space.check()  # new data only while the volumes have room (SpaceLow: AE)
        env = Envelope(
            id=new_id(),
            kind=Kind.HL7,
            source=source,
            received_at=time.time() if now is None else now,
            dedup_key=self.keys.index("hl7", sender[0], sender[1], control_id),
            size=len(raw),
        )
        sealed = self.sealer.seal(raw, b"hl7:" + env.id.encode())
        ack = build_ack(env.id)
        result = self.queue.record_message(
            env, sealed, self._seal_attrs(env.id, attrs), self._seal_ack(env.id, ack)
        )
        if result.new:
            return Ack(new=True, envelope_id=result.envelope_id, ack=ack)
        # a resend: the ACK the first copy got, as it was stored
        return Ack(False, result.envelope_id, self._open_ack(result.envelope_id, result.ack))

    def _seal_ack(self, envelope_id: str, ack: bytes) -> bytes:
        return self.sealer.seal(ack, b"ack:" + envelope_id.encode())

    def _open_ack(self, envelope_id: str, stored: bytes | None) -> bytes | None:
        """A stored ACK; rows written before ACKs were sealed hold them in clear."""
        if stored is None or not stored.startswith(MAGIC):
            return stored
        return self.sealer.open(stored, b"ack:" + envelope_id.encode())

    # --- reading back (workers, tests, tools) -------------------------------------------

    def read(self, envelope_id: str) -> tuple[Envelope, bytes]:
        """The envelope and its decrypted bytes (instance or message), as received."""
        env, _, inline = self.queue.envelope(envelope_id)
        if env.kind is Kind.HL7:
            assert inline is not None
            return env, self.sealer.open(inline, b"hl7:" + env.id.encode())
        if inline is not None:  # a small instance, kept in its row
            return env, self.sealer.open(inline, row_context(env.id))
        assert env.spool_key is not None
        return env, self.spool.get(env.spool_key)

    def sealed_instance(self, envelope_id: str) -> bytes | None:
        """The sealed bytes of an instance kept in its row (see :meth:`read`), or None when
        it is a spool file."""
        _, _, inline = self.queue.envelope(envelope_id)
        return inline

    def study_instances(
        self, study_key: str
    ) -> tuple[tuple[str, ...], tuple[tuple[str, bytes], ...]]:
        """Where a study's instances are, for a reader that has the key file (the model
        runner): the spool keys of the spool files, and (envelope id, sealed bytes) of the
        instances kept in their rows (opened with :func:`~gateway.store.spool.row_context`)."""
        envelopes = self.queue.study_envelopes(study_key)
        in_rows = []
        for env in envelopes:
            if not env.spool_key and (sealed := self.sealed_instance(env.id)) is not None:
                in_rows.append((env.id, sealed))
        return tuple(e.spool_key for e in envelopes if e.spool_key), tuple(in_rows)

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """The envelope id of a stored instance, by SOP Instance UID."""
        return self.queue.find(self.keys.index("dicom", sop_instance_uid))

    def remember_study(self, study_key: str, *, accession: str | None) -> None:
        """Record a stored study's accession number (as a keyed hash), so that a report
        naming the accession finds the study."""
        if accession:
            self.queue.record_study_refs(study_key, [self.keys.index("accession", accession)])

    def accession_ref(self, accession: str) -> str:
        """The keyed hash an accession number is stored as (never the number itself)."""
        return self.keys.index("accession", accession)

    def find_study(self, *, accession: str = "", study_uid: str = "") -> str | None:
        """The study key of a stored study, by Study Instance UID or accession number."""
        if study_uid:
            key = self.keys.index("study", study_uid)
            if self.queue.study(key) is not None:
                return key
        if accession:
            return self.queue.study_for_ref(self.keys.index("accession", accession))
        return None

    def find_message(self, application: str, facility: str, control_id: str) -> str | None:
        """The envelope id of a stored HL7 message, by sender and MSH-10."""
        return self.queue.find(self.keys.index("hl7", application, facility, control_id))

    def attrs(self, envelope_id: str) -> dict[str, Any]:
        _, sealed, _ = self.queue.envelope(envelope_id)
        value: dict[str, Any] = json.loads(
            self.sealer.open(sealed, b"attrs:" + envelope_id.encode())
        )
        return value

    def close(self) -> None:
        self.spool.close()
        self.queue.close()
