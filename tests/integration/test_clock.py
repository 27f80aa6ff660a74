"""Drills: the wall clock steps an hour backwards or forwards under a running gateway.

An NTP server misconfigured, then corrected, or a VM snapshot restored, steps
CLOCK_REALTIME; CLOCK_MONOTONIC goes on.  The gateway runs under libfaketime (Debian's
``faketime`` package, installed by ``make system-deps``) with its offset in a file that
the test rewrites, so every process of the gateway (supervisor and children) sees the
step at once while the monotonic clock stays real.  What each drill found is in
docs/reliability.md ("Clock steps").
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dicomgen import SeriesSpec, free_port, make_study
from tests.gatewayproc import GatewayProcess, wait_until, write_config
from tests.hl7msgs import oru_r01, send_mllp
from tests.mllpsink import MLLPSink

pytestmark = pytest.mark.timeout(150)

HOUR = 3600


def libfaketime() -> Path | None:
    found = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
    return found[0] if found else None


@pytest.fixture(scope="module")
def preload(tmp_path_factory: pytest.TempPathFactory) -> str:
    """LD_PRELOAD: libfaketime, behind tests/monosleep.c (Python's time.sleep fails under
    libfaketime 0.9.10 with the monotonic clock left real; see that file)."""
    lib = libfaketime()
    if lib is None:
        pytest.skip("libfaketime is not installed (make system-deps: apt-get faketime)")
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler to build tests/monosleep.c")
    shim = tmp_path_factory.mktemp("faketime") / "monosleep.so"
    source = Path(__file__).resolve().parent.parent / "monosleep.c"
    subprocess.run(
        [cc, "-shared", "-fPIC", "-O2", "-o", str(shim), str(source), "-ldl"], check=True
    )
    return f"{shim} {lib}"


class SteppedClock:
    """The wall clock of the processes started with :attr:`env`: real time plus an offset
    that :meth:`step` changes while they run (the monotonic clock is left alone)."""

    def __init__(self, folder: Path, preload: str) -> None:
        self.file = folder / "faketime.offset"
        self.offset = 0
        self._write()
        self.env = {
            "LD_PRELOAD": preload,
            "FAKETIME_TIMESTAMP_FILE": str(self.file),
            "FAKETIME_NO_CACHE": "1",  # read the file at every call: a step is seen at once
            "DONT_FAKE_MONOTONIC": "1",  # a real step moves CLOCK_REALTIME only
        }

    def step(self, seconds: int) -> None:
        self.offset += seconds
        self._write()

    def _write(self) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(f"{self.offset:+d}\n")
        tmp.replace(self.file)  # a reader never sees half a file


@pytest.fixture
def clock(tmp_path: Path, preload: str) -> SteppedClock:
    return SteppedClock(tmp_path, preload)


@pytest.fixture
def sink() -> Iterator[MLLPSink]:
    with MLLPSink() as s:
        yield s


def event_times(gw: GatewayProcess, event: str) -> list[float]:
    """When the gateway logged *event*, by its own (stepped) clock."""
    return [
        dt.datetime.fromisoformat(e["timestamp"]).timestamp()
        for e in gw.log_events()
        if e.get("event") == event and "timestamp" in e
    ]


def logged(gw: GatewayProcess, event: str) -> int:
    return sum(1 for e in gw.log_events() if e.get("event") == event)


def hl7_gateway(
    folder: Path, clock: SteppedClock, sink: MLLPSink, **gateway: Any
) -> GatewayProcess:
    """Messages whose control id starts with SLOW go to the sink; DOWN ones to a port
    where nothing listens (retried until retention is the only thing left to test)."""
    config = write_config(
        folder,
        gateway=gateway,
        workers={"lease_seconds": 20},
        destinations={
            "ehr": {"hl7": {"host": "127.0.0.1", "port": sink.port, "ack_timeout": 30}},
            "down": {"hl7": {"host": "127.0.0.1", "port": free_port(), "ack_timeout": 2}},
        },
        routes=[
            {"name": "slow", "when": {"hl7": {"MSH-10": {"regex": "^SLOW"}}}, "forward": ["ehr"]},
            {
                "name": "down",
                "when": {"hl7": {"MSH-10": {"regex": "^DOWN"}}},
                "forward": ["down"],
            },
        ],
    )
    return GatewayProcess(config, folder / "gateway.log", env=clock.env)


def test_a_study_open_when_the_clock_steps_back_completes_after_its_quiet_period(
    tmp_path: Path, clock: SteppedClock
) -> None:
    quiet = 3.0
    config = write_config(tmp_path, dicom={"study_complete_after": quiet})
    gw = GatewayProcess(config, tmp_path / "gateway.log", env=clock.env).start()
    try:
        files = make_study(tmp_path / "s", series=[SeriesSpec("CT", count=2, rows=64, cols=64)])
        gw.send_study(files)
        clock.step(-HOUR)
        stepped = time.monotonic()
        assert logged(gw, "study.complete") == 0, "the study completed before the step"
        wait_until("the study's completion", lambda: logged(gw, "study.complete"), 60)
        took = time.monotonic() - stepped
        print(f"study completed {took:.1f} s after the step back")
        # the gateway saw the step: it logged the completion an hour "before" now
        (completed,) = event_times(gw, "study.complete")
        assert completed < time.time() - HOUR + 60
        # the quiet period restarts at the step at most: never an hour (nor shorter)
        assert took < quiet + 5, f"completed {took:.1f} s after the step"
    finally:
        gw.stop()


@pytest.mark.slow
def test_a_step_forwards_during_a_delivery_delivers_once_and_keeps_what_is_not_delivered(
    tmp_path: Path, clock: SteppedClock, sink: MLLPSink
) -> None:
    sink.delay = 4.0  # a slow EHR: the delivery holds its lease when the clock steps
    gw = hl7_gateway(tmp_path, clock, sink, retention_days=0.0417).start()  # 1 h
    try:
        (ack,) = send_mllp(gw.hl7_port, [oru_r01(control_id="DOWN0001")])
        assert b"MSA|AA|" in ack
        (ack,) = send_mllp(gw.hl7_port, [oru_r01(control_id="SLOW0001")])
        assert b"MSA|AA|" in ack
        sink.wait_for(1, timeout=30)  # on its way: the ACK comes in 4 s
        clock.step(+HOUR)
        wait_until(
            "the delivery to the EHR",
            lambda: gw.queue_status()["jobs:deliver"].get("done"),
            60,
        )
        # the lease looks an hour old: the sweep (every 0.5 s) and the worker's lease keeper
        # (a renewal into the new time, checked every second) race for it.  Either the
        # sweep took it back while the worker waited for the ACK (the worker recorded the
        # delivery, lost the lease, then took the job again and found it delivered), or the
        # keeper renewed it first and the delivery completed as usual: the EHR got the
        # message once either way
        swept, lost = logged(gw, "queue.leases_expired"), logged(gw, "job.lease_lost")
        print(f"lease taken back by the sweep: {bool(swept)}; lease lost: {lost}")
        assert (swept >= 1 and lost == 1) or lost == 0, (swept, lost)
        assert len(sink.received) == 1

        # the running gateway's first retention pass (a minute after its start), an hour
        # "later": what is delivered goes, received a minute before in real time; what
        # is not delivered stays
        deleted = gw.wait_audit("data-deleted", 0, timeout=90)
        assert {"type": "message", "count": 1} in deleted["objects"], deleted
        assert "1 kept for pending or dead jobs" in deleted["detail"], deleted
        status = gw.queue_status()
        assert status["received"] == {"hl7": 1}  # DOWN0001, still retried
        assert status["jobs:deliver"].get("dead") is None
    finally:
        gw.stop()


@pytest.mark.slow
def test_a_worker_killed_after_a_step_back_has_its_job_taken_over_at_once(
    tmp_path: Path, clock: SteppedClock, sink: MLLPSink
) -> None:
    sink.delay = 30.0  # the worker holds the lease until it is killed
    gw = hl7_gateway(tmp_path, clock, sink).start()
    try:
        (ack,) = send_mllp(gw.hl7_port, [oru_r01(control_id="SLOW0002")])
        assert b"MSA|AA|" in ack
        sink.wait_for(1, timeout=30)
        clock.step(-HOUR)
        time.sleep(1.0)  # the assembler's sweeps see the step (every 0.5 s)
        (worker,) = [p for p in gw.processes() if p["role"] == "worker"]
        sink.delay = 0.0
        os.kill(int(worker["pid"]), signal.SIGKILL)
        killed = time.monotonic()
        sink.wait_for(2, timeout=90)  # the job again, from the restarted worker process
        took = time.monotonic() - killed
        print(f"job taken over and delivered {took:.1f} s after the kill")
        wait_until("the delivery", lambda: gw.queue_status()["jobs:deliver"].get("done"), 30)
        assert took < 30, f"taken over {took:.1f} s after the kill"
    finally:
        gw.stop()
