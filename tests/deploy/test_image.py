"""The container image, built and run here, as a site runs it: an ingest and a worker
container of deploy/docker/Dockerfile next to a PostgreSQL (tests/pg.py) and Orthanc as
the PACS, the secrets as files mounted read-only (what compose secrets are), the root
file system read-only, no capability.  A chest CT sent to the ingest container comes back
to Orthanc as an SR and a SEG made by the worker container; an HL7 report gets its AA.

No container registry is reachable here, so the image's base is made here: Debian 12
(bookworm) with its python3.11, by ``debootstrap``, imported into podman (kept between
runs as ``localhost/gateway-test-base:bookworm``).  The build takes torch from a local
wheel when pip's find-links has the CPU build (this machine's /opt/wheels), otherwise
from the PyTorch CPU index; everything else from PyPI (through pip's configured CA, given
to the build as a secret).  The Dockerfile's default base, python:3.11-slim-bookworm,
is not built here.

Skipped, saying why, where podman or debootstrap is missing (``make test`` installs
them, and runc) or a container cannot run (not root; no privileges for namespaces).
podman runs the containers with runc on the host network (crun refuses this machine's
hybrid cgroup hierarchy; netavark's bridge needs what a container host gives), with
lowered nofile/nproc limits (raising them needs CAP_SYS_RESOURCE).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from pydicom import dcmread

from gateway.security.certs import make_dev_pki
from gateway.security.crypto import KeyStore
from tests.deploy.tools import REPO
from tests.dicomgen import dcmtk_env, free_port, storescu_args
from tests.gatewayproc import wait_until
from tests.hl7msgs import oru_r01, send_mllp
from tests.orthanc import Orthanc

pytestmark = pytest.mark.timeout(1200)

BASE = "localhost/gateway-test-base:bookworm"
IMAGE = "localhost/ai-gateway:test"
UID = 10001  # the image's gateway user
TORCH = "2.13.0"


def podman_args() -> list[str]:
    exe = shutil.which("podman")
    if exe is None or shutil.which("debootstrap") is None:
        pytest.skip("podman or debootstrap is not installed (make system-deps installs them)")
    if os.geteuid() != 0:
        pytest.skip("the image test runs rootful podman (it imports a debootstrapped base)")
    args = [exe]
    if shutil.which("runc"):
        args += ["--runtime", shutil.which("runc") or "runc"]
    return args


RUN_OPTS = [
    "--network", "host",
    "--ulimit", "nofile=4096:4096",
    "--ulimit", "nproc=4096:4096",
]  # fmt: skip


def sh(
    args: list[str], timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, check=False, env=env
    )


def ensure_base(podman: list[str]) -> None:
    """The Debian 12 base with python3.11 and its venv module, made once by debootstrap."""
    if sh([*podman, "image", "exists", BASE]).returncode == 0:
        return
    root = Path(tempfile.mkdtemp(prefix="gateway-base-"))
    try:
        boot = sh(
            [
                "debootstrap", "--variant=minbase",
                "--include=python3.11,python3.11-venv,python3-venv,ca-certificates",
                "bookworm", str(root / "fs"), "http://deb.debian.org/debian",
            ],
            timeout=900,
        )  # fmt: skip
        if boot.returncode != 0:
            pytest.skip(f"debootstrap could not make a bookworm base: {boot.stderr[-800:]}")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (root / "fs" / junk).glob("*"):
                if item.is_file():
                    item.unlink()
        tar = subprocess.Popen(["tar", "-C", str(root / "fs"), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            [*podman, "import", "-", BASE], stdin=tar.stdout, capture_output=True, timeout=600
        )
        tar.wait()
        assert imported.returncode == 0, imported.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)


def pip_setting(name: str) -> str | None:
    """A pip setting as the project's pip sees it (environment, then its config files)."""
    value = os.environ.get(f"PIP_{name.upper().replace('-', '_')}")
    if value:
        return value
    pip = Path(sys.executable).with_name("pip")
    got = sh([str(pip), "config", "get", f"global.{name}"], timeout=60)
    return got.stdout.strip() or None if got.returncode == 0 else None


def local_torch_wheel() -> Path | None:
    """The CPU torch wheel in pip's find-links folders, if one is there."""
    for folder in (pip_setting("find-links") or "").split():
        for wheel in Path(folder.removeprefix("file://")).glob(f"torch-{TORCH}+cpu-cp311-*.whl"):
            return wheel
    return None


@dataclass
class Built:
    image: str
    size: int
    seconds: float


@pytest.fixture(scope="module")
def built() -> Iterator[Built]:
    podman = podman_args()
    ensure_base(podman)
    probe = sh([*podman, "run", "--rm", *RUN_OPTS, BASE, "true"], timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run a container here: {probe.stderr.strip()[-500:]}")
    context = Path(tempfile.mkdtemp(prefix="gateway-context-"))
    try:
        for name in ("pyproject.toml", "README.md", ".dockerignore"):
            shutil.copy(REPO / name, context / name)
        for folder in ("gateway", "models", "deploy/docker"):
            shutil.copytree(
                REPO / folder,
                context / folder,
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.whl"),
            )
        args = [*podman, "build", "--format", "docker", *RUN_OPTS, "--build-arg", f"BASE={BASE}"]
        wheel = local_torch_wheel()
        if wheel is not None:
            target = context / "deploy/docker/wheels" / wheel.name
            try:
                os.link(wheel, target)
            except OSError:  # another file system
                shutil.copy(wheel, target)
            args += ["--build-arg", "TORCH_INDEX_URL="]
        ca = pip_setting("cert")
        if ca:
            args += ["--secret", f"id=pip-ca,src={ca}"]
        began = time.monotonic()
        proc = sh([*args, "-f", "deploy/docker/Dockerfile", "-t", IMAGE, str(context)], 1500)
        seconds = time.monotonic() - began
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finally:
        shutil.rmtree(context, ignore_errors=True)
    size = int(sh([*podman, "image", "inspect", IMAGE, "--format", "{{.Size}}"]).stdout)
    print(f"\nimage {IMAGE}: {size / 1e6:.0f} MB, built in {seconds:.0f} s")
    yield Built(IMAGE, size, seconds)


def test_the_image_runs_as_its_user_with_cpu_torch_and_no_compiler(built: Built) -> None:
    podman = podman_args()
    inspected = json.loads(sh([*podman, "image", "inspect", built.image]).stdout)[0]
    config = inspected["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert "/healthz" in " ".join(inspected["Healthcheck"]["Test"])  # podman keeps it here
    assert {"/etc/gateway", "/var/lib/gateway", "/var/lib/gateway-keys", "/models"} <= set(
        config["Volumes"]
    )
    script = (
        "id -u; for c in cc gcc g++ clang make ld; do command -v $c && exit 3; done; "
        "python3 -c 'import torch; print(torch.__version__, torch.version.cuda)'; "
        "pip list 2>/dev/null | grep -ci nvidia || true; "
        "gateway check-config"  # config/gateway.yaml from the working directory
    )
    proc = sh([*podman, "run", "--rm", *RUN_OPTS, built.image, "sh", "-c", script], 300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    uid, torch, nvidia, check = proc.stdout.strip().splitlines()
    assert uid == str(UID)
    assert torch == f"{TORCH}+cpu None", "the CPU build of the pinned torch"
    assert nvidia == "0", "no CUDA packages"
    assert check.endswith("2 models, 2 routes)"), check
    # the CPU image: Python, torch's CPU build, MONAI; a CUDA torch would add gigabytes
    assert built.size < 1_600_000_000, f"{built.size / 1e6:.0f} MB"


# --- a site: ingest and worker containers, PostgreSQL, Orthanc ---------------------------


@dataclass
class Container:
    name: str
    http_port: int

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/readyz", timeout=5):
                return True
        except OSError:
            return False


def owned(path: Path, mode: int) -> Path:
    os.chown(path, UID, UID)
    path.chmod(mode)
    return path


def site_config(
    folder: Path, role: str, dsn: str, pacs: Orthanc, ports: dict[str, int]
) -> dict[str, Any]:
    """deploy/compose/gateway.yaml with this machine's ports and peers (the containers
    share the host's network, so the two differ in their http port)."""
    cfg = yaml.safe_load((REPO / "deploy/compose/gateway.yaml").read_text())
    cfg["gateway"]["database"] = dsn
    cfg["gateway"]["min_free_mb"] = 16  # the image took GBs of this disk: not the 1 GB floor
    cfg["gateway"]["http"] = {"host": "127.0.0.1", "port": ports[f"{role}_http"]}
    cfg["dicom"].update(port=ports["dicom"], study_complete_after=1)
    cfg["dicom"]["tls"]["port"] = ports["dicom_tls"]
    cfg["hl7"]["port"] = ports["hl7"]
    cfg["hl7"]["tls"]["port"] = ports["hl7_tls"]
    for section, key in (("dicom", "allowed_callers"), ("hl7", "allowed_senders")):
        for entry in cfg[section][key]:
            entry["hosts"] = ["127.0.0.1"]
    cfg["destinations"]["pacs"]["dicom"].update(host="127.0.0.1", port=pacs.dicom_port)
    cfg["destinations"]["pacs"]["retry"] = {"initial": 0.5, "max": 2, "give_up_after": 120}
    path = folder / f"{role}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dict(cfg)


@pytest.fixture
def site(
    built: Built, pg_dsn: Any, tmp_path: Path
) -> Iterator[tuple[list[str], dict[str, Container], Orthanc, dict[str, int], Path]]:
    podman = podman_args()
    pacs = Orthanc(tmp_path / "orthanc").start()
    ports = {k: free_port() for k in ("dicom", "dicom_tls", "hl7", "hl7_tls")}
    ports |= {"ingest_http": free_port(), "worker_http": free_port()}
    dsn = pg_dsn()  # the session's server: trust authentication, so the password file
    # below is read by the gateway (database_password_file) but not checked by the server
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (tmp_path / "secrets").mkdir()
    secrets = owned(tmp_path / "secrets", 0o750)
    (secrets / "pg-password").write_text("unchecked-under-trust-auth\n")
    KeyStore.open(secrets / "keys.json")
    make_dev_pki(secrets / "pki")
    for item in [*secrets.iterdir(), *(secrets / "pki").iterdir()]:
        owned(item, 0o750 if item.is_dir() else 0o400)
    volumes = {}
    for name in ("ingest-data", "worker-data", "keys", "spool"):
        (tmp_path / name).mkdir()
        volumes[name] = owned(tmp_path / name, 0o750)
    mounts = [
        "-v", f"{secrets / 'keys.json'}:/run/secrets/gateway-keys:ro",
        "-v", f"{secrets / 'pg-password'}:/run/secrets/pg-password:ro",
        "-v", f"{secrets / 'pki' / 'server.pem'}:/run/secrets/tls-cert:ro",
        "-v", f"{secrets / 'pki' / 'server.key'}:/run/secrets/tls-key:ro",
        "-v", f"{secrets / 'pki' / 'ca.pem'}:/run/secrets/tls-ca:ro",
        "-v", f"{volumes['keys']}:/var/lib/gateway-keys",
        "-v", f"{volumes['spool']}:/var/lib/gateway-spool",
    ]  # fmt: skip
    containers: dict[str, Container] = {}
    try:
        for role in ("ingest", "worker"):
            site_config(config_dir, role, dsn, pacs, ports)
            name = f"gateway-test-{role}-{os.getpid()}"
            sh([*podman, "rm", "-f", name])
            proc = sh(
                [
                    *podman, "run", "-d", "--name", name, *RUN_OPTS,
                    "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
                    "--security-opt", "no-new-privileges",
                    "-e", f"GATEWAY_ROLE={role}",
                    "-e", f"GATEWAY_CONFIG=/etc/gateway/{role}.yaml",
                    "-e", "GATEWAY_KEY_SEED=/run/secrets/gateway-keys",
                    "-e", f"GATEWAY_HTTP_PORT={ports[f'{role}_http']}",
                    "-v", f"{config_dir}:/etc/gateway:ro",
                    "-v", f"{volumes[f'{role}-data']}:/var/lib/gateway",
                    *mounts, built.image,
                ]
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            containers[role] = Container(name, ports[f"{role}_http"])
        for role, c in containers.items():
            try:
                wait_until(f"{role} ready", c.ready, 240)
            except Exception:
                print(sh([*podman, "logs", c.name]).stdout[-5000:])
                raise
        yield podman, containers, pacs, ports, volumes["keys"]
    finally:
        for c in containers.values():
            (tmp_path / f"{c.name}.log").write_text(sh([*podman, "logs", c.name]).stdout)
            sh([*podman, "rm", "-f", "-t", "5", c.name], timeout=120)
        pacs.stop()


def modalities(pacs: Orthanc) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for orthanc_id in pacs.get("/instances"):
        tags = pacs.get(f"/instances/{orthanc_id}/simplified-tags")
        found.setdefault(str(tags.get("Modality")), []).append(tags)
    return found


def test_a_study_sent_to_the_ingest_container_comes_back_from_the_worker(
    site: tuple[list[str], dict[str, Container], Orthanc, dict[str, int], Path], tmp_path: Path
) -> None:
    from models.lung_nodules.synth import make_case
    from tests.ctstudy import write_ct_series

    podman, containers, pacs, ports, keys = site
    # the key file was installed from the secret: the same keys, mode 0600, the gateway's
    live = keys / "keys.json"
    assert stat_of(live) == (UID, 0o600)
    # the image's HEALTHCHECK passes on both (podman runs it on demand: no systemd here)
    for c in containers.values():
        health = sh([*podman, "healthcheck", "run", c.name], 60)
        assert health.returncode == 0, health.stdout + health.stderr

    nodules = [((120.0, 150.0, 50.0), 16.0)]
    case = make_case(np.random.default_rng(5), spacing=(0.7, 0.7, 2.5), nodules_mm=nodules)
    paths = write_ct_series(case.volume, case.spacing, tmp_path / "ct", accession="ACCIMG1")
    study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    sent = sh(storescu_args(paths, port=ports["dicom"], aet="STORESCU"), 300, dcmtk_env())
    assert sent.returncode == 0, sent.stdout + sent.stderr

    (ack,) = send_mllp(ports["hl7"], [oru_r01(control_id="IMGMSG1")])
    assert b"MSA|AA|IMGMSG1" in ack

    got = wait_until(
        "an SR and a SEG in Orthanc",
        lambda: (m := modalities(pacs)).get("SR") and m.get("SEG") and m,
        300,
    )
    (sr,), (seg,) = got["SR"], got["SEG"]
    assert sr["StudyInstanceUID"] == seg["StudyInstanceUID"] == study_uid

    # the worker container did the work; the ingest container only received
    status = sh([*podman, "exec", containers["worker"].name, "gateway", "queue", "status",
                 "-c", "/etc/gateway/worker.yaml"], 120)  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert re.search(rf"dicom instances: +{len(paths)}\b", status.stdout), status.stdout

    # SIGTERM (podman stop) drains both and each exits 0
    for c in containers.values():
        stop = sh([*podman, "stop", "-t", "90", c.name], 150)
        assert stop.returncode == 0, stop.stderr
        code = sh([*podman, "inspect", c.name, "--format", "{{.State.ExitCode}}"]).stdout.strip()
        logs = sh([*podman, "logs", c.name]).stdout
        assert code == "0", logs[-3000:]
        assert '"gateway.stopped"' in logs
        # no patient identifier reaches the logs (the session's scan reads only the
        # gateways it started itself)
        for marker in ("TEST^NODULE", "PIDNOD1", "DOE^JANE", "PID12345"):
            assert marker not in logs, f"{c.name}: {marker}"


def stat_of(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_uid, st.st_mode & 0o777


def test_the_default_image_runs_all_roles_with_no_network(built: Built) -> None:
    """``docker run IMAGE`` as it is: its own config (SQLite, the reference models), every
    role in one container, the volumes the image declares, and no network at all (only
    loopback): it starts, its models load, /readyz says ready, the HEALTHCHECK passes,
    SIGTERM drains it to exit 0.  Nothing is fetched at run time."""
    podman = podman_args()
    name = f"gateway-test-all-{os.getpid()}"
    opts = [o for o in RUN_OPTS if o not in ("--network", "host")]
    sh([*podman, "rm", "-f", name])
    started = sh(
        [*podman, "run", "-d", "--name", name, "--network", "none", *opts, "--read-only",
         "--cap-drop", "ALL", built.image]
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    ready = (
        "import json, urllib.request; r = urllib.request.urlopen("
        "'http://127.0.0.1:8080/readyz', timeout=5); print(json.load(r)['details']['role'])"
    )
    try:
        role = wait_until(
            "the container ready",
            lambda: (
                (p := sh([*podman, "exec", name, "python3", "-c", ready], 30)).returncode == 0
                and p.stdout.strip()
            ),
            240,
        )
        assert role == "all"
        health = sh([*podman, "healthcheck", "run", name], 60)
        assert health.returncode == 0, health.stdout + health.stderr

        def events() -> list[dict[str, Any]]:
            out = sh([*podman, "logs", name]).stdout.splitlines()
            return [json.loads(line) for line in out]

        # both reference models load from the image, offline (after readiness: warm-up)
        wait_until(
            "both models loaded",
            lambda: [e["event"] for e in events()].count("model.loaded") == 2,
            180,
        )
        stop = sh([*podman, "stop", "-t", "90", name], 150)
        assert stop.returncode == 0, stop.stderr
        code = sh([*podman, "inspect", name, "--format", "{{.State.ExitCode}}"]).stdout.strip()
        assert code == "0", sh([*podman, "logs", name]).stdout[-3000:]
        seen = events()
        assert "gateway.started" in [e["event"] for e in seen]
        assert "gateway.stopped" in [e["event"] for e in seen]
        assert {e["level"] for e in seen} == {"info"}, [e for e in seen if e["level"] != "info"]
    finally:
        sh([*podman, "rm", "-f", "-v", "-t", "5", name], 120)
