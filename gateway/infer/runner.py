"""The model runner: models run in worker processes, never in the gateway's own.

``processes`` worker processes are started (spawned, so torch never inherits the
gateway's threads); each loads every configured model once and warms it up, then serves
one run at a time over a pipe.  The gateway's infer workers call :meth:`ModelRunner.run`,
which hands the input to a free process and waits, heartbeating the job's lease.

What can go wrong in a run, and what it becomes:

- the model rejects its input (no matching series, no report text): :class:`InputError`,
  a dead letter at once, because running it again cannot help;
- the model raises, its process dies (a crash, the kernel's OOM killer), it runs past its
  ``timeout``, or its resident memory passes ``memory_mb``: the process is killed and
  replaced and the run fails with :class:`ModelRunFailed` (transient; the infer stage's
  retry policy runs it once more, then dead-letters it with this reason);
- the bundle failed to load at start: :class:`ModelUnavailable` (permanent).

The gateway keeps receiving through all of it: nothing here runs on a network thread.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import resource
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import structlog

from gateway.errors import Permanent, Transient
from gateway.infer.bundles import ModelInfo
from gateway.infer.runtime import InputError, LoadedModel, load_model, pick_device
from gateway.infer.runtime import warm_up as warm
from gateway.observability.logging import configure_logging

log = structlog.get_logger(__name__)

_MB = 1 << 20
_POLL = 0.1


class ModelRunFailed(Transient):
    """The model run failed (crash, timeout, memory ceiling)."""


class ModelUnavailable(Permanent):
    """The model could not be loaded."""


@dataclass(frozen=True)
class RunnerSettings:
    processes: int = 1
    torch_threads: int = 0  # 0: the machine's cores shared among the processes
    device: str = "auto"  # auto = cuda when torch sees a GPU, else cpu
    warm_up: bool = True
    start_timeout: float = 600.0
    log_level: str = "INFO"

    def threads(self) -> int:
        if self.torch_threads > 0:
            return self.torch_threads
        return max(1, (os.cpu_count() or 1) // max(1, self.processes))


@dataclass(frozen=True)
class Limits:
    timeout: float = 300.0
    memory_mb: int = 4096


# --- the worker process ----------------------------------------------------------------


def _vm_size_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _serve(
    conn: Connection, models: dict[str, ModelInfo], settings: RunnerSettings, slot: int
) -> None:
    """Main of a runner process: load, warm up, then answer run requests until EOF."""
    configure_logging(settings.log_level)
    plog = structlog.get_logger("gateway.infer.process").bind(process=slot)
    import torch  # heavy (seconds, hundreds of MB): only runner processes load it

    threads = settings.threads()
    torch.set_num_threads(threads)
    errors: dict[str, str | None] = {}
    loaded: dict[str, LoadedModel] = {}
    try:
        device = pick_device(settings.device)
    except Exception as exc:
        device = "cpu"
        plog.warning("model.device_unavailable", error=str(exc), using="cpu")
    for name, info in models.items():
        started = time.monotonic()
        try:
            loaded[name] = load_model(info, device)
            if settings.warm_up:
                warm(loaded[name])
            errors[name] = None
            plog.info(
                "model.loaded",
                model=name,
                version=info.version,
                device=device,
                threads=threads,
                seconds=round(time.monotonic() - started, 2),
            )
        except Exception as exc:
            errors[name] = f"model '{name}' failed to load: {type(exc).__name__}: {exc}"[:500]
            plog.error("model.load_failed", model=name, error=errors[name])
    conn.send(("ready", errors, device))
    base_vm = _vm_size_bytes()
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        _, name, model_input, memory_mb = request
        # an allocation past the ceiling fails in here (MemoryError) instead of growing
        # until the parent notices; the parent's RSS watch is the second line
        soft = base_vm + memory_mb * _MB
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_AS, (soft, resource.RLIM_INFINITY))
        try:
            reply: tuple[Any, ...] = ("ok", loaded[name].run(model_input, threads=threads))
        except InputError as exc:
            reply = ("input", exc.message)
        except MemoryError:
            reply = ("memory", f"model '{name}' ran out of its memory limit ({memory_mb} MB)")
        except Exception as exc:
            text = str(exc)
            if "can't allocate memory" in text or "out of memory" in text.lower():
                reply = ("memory", f"model '{name}' ran out of memory ({memory_mb} MB limit)")
            else:
                reply = ("failed", f"model '{name}' raised {type(exc).__name__}: {text}"[:500])
        finally:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY,) * 2)
        conn.send(reply)


# --- the parent side ---------------------------------------------------------------------


class _Slot:
    """One runner process and its pipe."""

    def __init__(self, runner: ModelRunner, index: int) -> None:
        self.runner = runner
        self.index = index
        self.proc: Any = None
        self.conn: Connection | None = None
        self.ready = threading.Event()
        self.errors: dict[str, str | None] = {}
        self.device = ""
        self.broken: str | None = None

    def spawn(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self.ready.clear()
        self.broken = None
        self.proc = ctx.Process(
            target=_serve,
            args=(child, self.runner.models, self.runner.settings, self.index),
            name=f"gateway-model-{self.index}",
            daemon=True,
        )
        self.proc.start()
        child.close()
        self.conn = parent
        threading.Thread(
            target=self._await_ready, name=f"model-start-{self.index}", daemon=True
        ).start()

    def _await_ready(self) -> None:
        started = time.monotonic()
        assert self.conn is not None
        try:
            if not self.conn.poll(self.runner.settings.start_timeout):
                self.broken = "the model process did not start in time"
            else:
                _, self.errors, self.device = self.conn.recv()
        except (EOFError, OSError):
            self.broken = f"the model process exited while starting ({self._exit()})"
        if self.broken:
            log.error("model.process_failed", process=self.index, error=self.broken)
        else:
            log.info(
                "model.process_ready",
                process=self.index,
                device=self.device,
                models=sorted(k for k, v in self.errors.items() if v is None),
                seconds=round(time.monotonic() - started, 1),
            )
        self.ready.set()

    def _exit(self) -> str:
        if self.proc is None:
            return "not started"
        self.proc.join(1)
        code = self.proc.exitcode
        if code is None:
            return "still running"
        if code < 0:
            return f"killed by signal {-code}" + (
                ", possibly the kernel's out-of-memory killer" if -code == 9 else ""
            )
        return f"exit code {code}"

    def rss_mb(self) -> float:
        try:
            with open(f"/proc/{self.proc.pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / _MB
        except (OSError, ValueError, IndexError):
            return 0.0

    def kill(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class ModelRunner:
    def __init__(self, models: Mapping[str, ModelInfo], settings: RunnerSettings) -> None:
        self.models = dict(models)
        self.settings = settings
        self._slots = [_Slot(self, i) for i in range(max(1, settings.processes))]
        self._free: queue.Queue[_Slot] = queue.Queue()
        self._started = False

    def start(self) -> None:
        """Start the processes; they load and warm up in the background."""
        if self._started or not self.models:
            return
        for slot in self._slots:
            slot.spawn()
            self._free.put(slot)
        self._started = True

    def status(self) -> dict[str, Any]:
        """For /readyz: processes ready, and each model's load error if it had one."""
        ready = [s for s in self._slots if s.ready.is_set() and not s.broken]
        errors: dict[str, str | None] = {}
        for s in ready:
            for name, err in s.errors.items():
                errors[name] = errors.get(name) or err
        return {
            "processes": len(self._slots) if self._started else 0,
            "ready": len(ready),
            "models": {n: ("ready" if errors.get(n) is None else errors[n]) for n in errors},
        }

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(s.ready.wait(max(0.0, deadline - time.monotonic())) for s in self._slots)

    def run(
        self,
        name: str,
        model_input: Any,
        limits: Limits = Limits(),
        beat: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Run model *name* on *model_input* in a free process; the result dict (see
        :mod:`gateway.infer.runtime`).  Blocks the calling worker thread, calling *beat*
        about every 100 ms so the job's lease stays held."""
        if name not in self.models:
            raise ModelUnavailable(f"model '{name}' is not configured")
        self.start()
        tick = beat or (lambda: None)
        slot = self._take(tick)
        try:
            return self._run_on(slot, name, model_input, limits, tick)
        finally:
            self._free.put(slot)

    def _take(self, tick: Callable[[], None]) -> _Slot:
        while True:
            try:
                slot = self._free.get(timeout=1.0)
            except queue.Empty:
                tick()
                continue
            while not slot.ready.wait(1.0):
                tick()
            if slot.broken:
                reason = slot.broken
                slot.kill()
                slot.spawn()
                self._free.put(slot)
                raise ModelRunFailed(f"model process unavailable: {reason}; restarted")
            return slot

    def _run_on(
        self, slot: _Slot, name: str, model_input: Any, limits: Limits, tick: Callable[[], None]
    ) -> dict[str, Any]:
        error = slot.errors.get(name)
        if error is not None:
            raise ModelUnavailable(error)
        assert slot.conn is not None
        started = time.monotonic()
        try:
            slot.conn.send(("run", name, model_input, limits.memory_mb))
            while not slot.conn.poll(_POLL):
                tick()
                elapsed = time.monotonic() - started
                if not slot.proc.is_alive():
                    raise _Restart(f"its process died ({slot._exit()})")
                if elapsed > limits.timeout:
                    raise _Restart(f"it did not finish within its timeout of {limits.timeout:g} s")
                rss = slot.rss_mb()
                if rss > limits.memory_mb:
                    raise _Restart(
                        f"its process used {rss:.0f} MB, over the model's memory limit of "
                        f"{limits.memory_mb} MB"
                    )
            kind, payload = slot.conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            reason = f"its process died ({slot._exit()})"
            self._restart(slot, name, reason)
            raise ModelRunFailed(f"model '{name}' failed: {reason}") from None
        except _Restart as exc:
            self._restart(slot, name, str(exc))
            raise ModelRunFailed(
                f"model '{name}' failed: {exc}; its process was restarted"
            ) from None
        if kind == "ok":
            result: dict[str, Any] = payload
            return result
        if kind == "input":
            raise InputError(payload)
        raise ModelRunFailed(str(payload))

    def _restart(self, slot: _Slot, name: str, reason: str) -> None:
        log.warning("model.process_restarted", process=slot.index, model=name, reason=reason)
        slot.kill()
        slot.spawn()

    def close(self) -> None:
        for slot in self._slots:
            slot.kill()
        self._started = False


class _Restart(Exception):
    pass
