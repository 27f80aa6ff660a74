"""Free space on the volumes the gateway writes to.

Ingest refuses new data (DICOM 0xA700, HL7 AE: "try again later") while the data
directory's or the spool's volume has less free space than ``gateway.min_free_mb``.  A
disk filled to its last byte fails everything at once: the queue database cannot record
a delivery, the audit trail cannot be written, a worker cannot finish the job that would
free the space.  Stopping intake early leaves that room to the work already accepted;
workers and retention go on, and intake resumes by itself once space returns (the same
promise as a full disk: ``docs/reliability.md``).  The gauge
``gateway_disk_free_bytes{volume}`` and ``/readyz`` (``disk_space``) tell operators
before senders do.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from gateway.errors import SpaceLow

__all__ = ["MB", "SpaceGuard", "Volume"]

log = structlog.get_logger(__name__)

MB = 1024 * 1024


@dataclass(frozen=True)
class Volume:
    name: str  # "data" (queue file, audit trail, incoming) or "spool"
    path: Path
    free: int  # bytes an unprivileged writer may still use; -1 when it cannot be read

    def below(self, floor: int) -> bool:
        """Under *floor* bytes (0: no floor; a volume that cannot be read is not)."""
        return floor > 0 and 0 <= self.free < floor


class SpaceGuard:
    """Checks the free space of *paths* (by name) against *min_free* bytes, reading it at
    most every *every* seconds (``statvfs`` can be a network round trip on shared
    storage); 0 turns the check off."""

    def __init__(
        self,
        paths: Mapping[str, Path],
        min_free: int,
        *,
        every: float = 1.0,
        statvfs: Callable[[Path], os.statvfs_result] = os.statvfs,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.paths = dict(paths)
        self.min_free = min_free
        self.every = every
        self._statvfs = statvfs
        self._clock = clock
        self._lock = threading.Lock()
        self._read_at: float | None = None
        self._volumes: list[Volume] = []
        self._was_low: frozenset[str] = frozenset()

    def volumes(self) -> list[Volume]:
        """The free space of each volume, as last read (read now when that is too old)."""
        now = self._clock()
        with self._lock:
            if self._read_at is None or now - self._read_at >= self.every:
                self._volumes = [Volume(n, p, self._free(p)) for n, p in self.paths.items()]
                self._read_at = now
                self._log_changes()
            return list(self._volumes)

    def low(self) -> list[Volume]:
        """The volumes below the minimum (none when the check is off)."""
        if self.min_free <= 0:
            return []
        return [v for v in self.volumes() if v.below(self.min_free)]

    def readiness_details(self) -> dict[str, object]:
        """/readyz details: the volumes below the floor, with what is left."""
        low = {v.name: {"free_mb": v.free // MB, "min_free_mb": self.min_free // MB}
               for v in self.low()}  # fmt: skip
        return {"disk_space": low} if low else {}

    def check(self) -> None:
        """Raise :class:`~gateway.errors.SpaceLow` when a volume is below the minimum."""
        for v in self.low():
            raise SpaceLow(f"disk space low: {v.free // MB} MB free on {v.name}")

    def _free(self, path: Path) -> int:
        for where in (path, *path.parents):  # a folder not made yet: the volume it will be on
            try:
                st = self._statvfs(where)
            except FileNotFoundError:
                continue
            except OSError:
                break
            return st.f_bavail * st.f_frsize
        return -1  # the write itself will say what is wrong

    def _log_changes(self) -> None:
        low = frozenset(v.name for v in self._volumes if v.below(self.min_free))
        for v in self._volumes:
            if v.name in low - self._was_low:
                log.error(
                    "storage.space_low",
                    volume=v.name,
                    path=str(v.path),
                    free_mb=v.free // MB,
                    min_free_mb=self.min_free // MB,
                    effect="new DICOM instances get 0xA700 and HL7 messages AE until space "
                    "returns",
                )
            elif v.name in self._was_low - low:
                log.info("storage.space_ok", volume=v.name, free_mb=v.free // MB)
        self._was_low = low
