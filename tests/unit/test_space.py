"""The free-space floor (gateway/store/space.py): what it reads, when, and what ingest
does below it (the drill with a real small filesystem: tests/integration/test_faults.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import structlog

from gateway.errors import SpaceLow, Transient
from gateway.store.space import MB, SpaceGuard
from gateway.store.store import Store


class Disk:
    """statvfs of a pretend volume whose free space the test sets."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.reads = 0

    def __call__(self, path: Path) -> os.statvfs_result:
        self.reads += 1
        if self.free < 0:
            raise PermissionError(path)
        blocks = self.free // 4096
        return os.statvfs_result((4096, 4096, 10 * blocks, blocks, blocks, 0, 0, 0, 0, 255))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_below_the_floor_check_says_how_much_is_left_and_where(tmp_path: Path) -> None:
    disk = Disk(900 * MB)
    guard = SpaceGuard({"data": tmp_path}, 1024 * MB, statvfs=disk)
    with pytest.raises(SpaceLow) as info:
        guard.check()
    assert isinstance(info.value, Transient)  # 0xA700 / AE: try again later
    assert info.value.message == "disk space low: 900 MB free on data"
    assert len("Gateway cannot store now: " + info.value.message) <= 64  # one Error Comment
    assert [v.name for v in guard.low()] == ["data"]
    assert guard.readiness_details() == {
        "disk_space": {"data": {"free_mb": 900, "min_free_mb": 1024}}
    }


def test_space_is_read_at_most_once_per_period_and_the_floor_can_be_off(tmp_path: Path) -> None:
    disk, clock = Disk(2048 * MB), Clock()
    guard = SpaceGuard({"data": tmp_path, "spool": tmp_path}, 1024 * MB, statvfs=disk, clock=clock)
    guard.check()
    disk.free = 10 * MB
    guard.check()  # within the second: what was read still stands
    assert disk.reads == 2  # one per volume
    clock.now = 1.0
    with pytest.raises(SpaceLow):
        guard.check()
    assert SpaceGuard({"data": tmp_path}, 0, statvfs=disk).low() == []  # 0: off


def test_a_volume_that_cannot_be_read_is_not_called_low(tmp_path: Path) -> None:
    guard = SpaceGuard({"data": tmp_path}, 1024 * MB, statvfs=Disk(-1))
    guard.check()  # the write itself will say what is wrong
    assert [v.free for v in guard.volumes()] == [-1]


def test_going_low_and_back_is_logged_once_each(tmp_path: Path) -> None:
    disk, clock = Disk(10 * MB), Clock()
    guard = SpaceGuard({"data": tmp_path}, 16 * MB, statvfs=disk, clock=clock)
    with structlog.testing.capture_logs() as logs:
        for free in (10, 9, 20, 20):
            disk.free = free * MB
            guard.volumes()
            clock.now += 1
    events = [(e["event"], e["free_mb"]) for e in logs]
    assert events == [("storage.space_low", 10), ("storage.space_ok", 20)]
    assert logs[0]["min_free_mb"] == 16 and logs[0]["path"] == str(tmp_path)


def test_ingest_below_the_floor_stores_nothing_new_but_acknowledges_a_duplicate(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "data", tmp_path / "keys.json")
    try:
        disk = Disk(2048 * MB)
        store.space = SpaceGuard({"data": tmp_path}, 1024 * MB, statvfs=disk, every=0)

        def instance(uid: str) -> None:
            store.ingest_instance(
                b"dicom bytes",
                sop_instance_uid=uid,
                study_instance_uid="1.2.3",
                attrs={"Modality": "CT"},
                source="PACS@127.0.0.1",
                quiet=5,
            )

        instance("1.2.3.1")
        disk.free = 100 * MB
        with pytest.raises(SpaceLow):
            instance("1.2.3.2")
        instance("1.2.3.1")  # a resend of what is stored: acknowledged, nothing written
        with pytest.raises(SpaceLow):
            store.ingest_message(
                b"MSH|^~\\\\&|EHR|HOSP|GW|AI|20250101||ORU^R01|C1|P|2.5\\r",
                sender=("EHR", "HOSP"),
                control_id="C1",
                attrs={},
                source="EHR^HOSP@127.0.0.1",
                build_ack=lambda envelope_id: b"ACK",
            )
        assert len(store.queue.envelopes()) == 1
    finally:
        store.close()


def test_a_folder_not_made_yet_is_measured_on_the_volume_it_will_be_on(tmp_path: Path) -> None:
    (volume,) = SpaceGuard({"spool": tmp_path / "not" / "made" / "yet"}, MB).volumes()
    st = os.statvfs(tmp_path)
    assert abs(volume.free - st.f_bavail * st.f_frsize) < 100 * MB  # others write meanwhile
