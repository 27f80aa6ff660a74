"""Orthanc (Debian's package) as the PACS for delivery tests: its own config, free
loopback ports, queried back over its REST API."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.dicomgen import free_port


@dataclass
class Orthanc:
    folder: Path
    aet: str = "ORTHANC"
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Orthanc:
        exe = shutil.which("Orthanc")
        if exe is None:
            pytest.skip("Orthanc is not installed (make test installs Debian's orthanc)")
        (self.folder / "db").mkdir(parents=True, exist_ok=True)
        config = self.folder / "orthanc.json"
        config.write_text(json.dumps({
            "Name": "TEST_PACS", "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"), "DicomAet": self.aet,
            "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True, "DicomAlwaysAllowStore": True, "Plugins": [],
            "StorageCompression": False, "UnknownSopClassAccepted": True,
            "DicomScpTimeout": 30, "HttpServerEnabled": True,
        }))
        log = (self.folder / "orthanc.log").open("ab")
        self.proc = subprocess.Popen([exe, str(config)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError((self.folder / "orthanc.log").read_text()) from None
                time.sleep(0.1)
        raise RuntimeError(f"Orthanc did not start in {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as r:
            return bytes(r.read())

    def sop_instance_uids(self) -> list[str]:
        """SOP Instance UIDs of everything stored (each listed once per stored copy)."""
        uids = []
        for orthanc_id in self.get("/instances"):
            tags = self.get(f"/instances/{orthanc_id}/simplified-tags")
            uids.append(str(tags["SOPInstanceUID"]))
        return uids

    def instance_file(self, sop_instance_uid: str) -> bytes:
        found = self.lookup(sop_instance_uid)
        return self.get_bytes(f"/instances/{found}/file")

    def lookup(self, uid: str) -> str:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/tools/lookup", data=uid.encode(), method="POST"
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            hits = json.loads(r.read())
        return str(next(h["ID"] for h in hits if h["Type"] == "Instance"))
