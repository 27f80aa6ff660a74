"""Study assembly: a study is complete ``study_complete_after`` seconds after its last
instance.  The timers live in the queue database (``studies.complete_due``), so a restart
keeps them; this loop only asks the queue which studies are due."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from gateway.observability.logging import exception_fields
from gateway.observability.metrics import Metrics
from gateway.store.queue import Queue

log = structlog.get_logger(__name__)


class Assembler:
    def __init__(
        self,
        queue: Queue,
        metrics: Metrics,
        *,
        tick: float = 0.5,
        on_complete: Callable[[], None] | None = None,
    ) -> None:
        self.queue = queue
        self.on_complete = on_complete
        self.metrics = metrics
        self.tick = tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="assembler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def run_once(self, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        done = self.queue.complete_due_studies(now)
        for study_key in done:
            info = self.queue.study(study_key)
            self.metrics.studies_completed.inc()
            log.info(
                "study.complete",
                study=study_key[:12],
                instances=info.instances if info else None,
                reopened=info.reopened if info else None,
                generation=info.generation if info else None,
            )
        swept = self.queue.sweep_expired(now)
        if swept:
            log.warning("queue.leases_expired", jobs=swept)
        if (done or swept) and self.on_complete is not None:
            self.on_complete()  # routing can start now rather than at its next poll
        return done

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception as exc:  # keep assembling; the next tick retries
                log.error("study.assembly_failed", **exception_fields(exc))
            due = self.queue.next_study_due()
            wait = self.tick if due is None else min(self.tick, max(0.05, due - time.time()))
            self._stop.wait(wait)
