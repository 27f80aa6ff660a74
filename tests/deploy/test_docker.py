"""deploy/docker: the Dockerfile passes hadolint and keeps the rules the issue set (a slim
Python 3.11 base as a build argument, torch pinned to the CPU build, a non-root user, no
compiler in the final stage, a HEALTHCHECK on /healthz, volumes for config, models, keys
and data), and the entry point starts ``gateway run`` in the role GATEWAY_ROLE names,
seeding the key file from a secret without ever overwriting a live one.

The image itself is built and run in tests/deploy/test_image.py."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from gateway.config import read_config
from gateway.security.crypto import KeyStore
from tests.deploy.tools import DEPLOY, DOCKERFILE, ENTRYPOINT, REPO, hadolint, run, shellcheck


def stages(text: str) -> list[str]:
    """The Dockerfile's stages, each from its FROM to the next (continuations joined)."""
    joined = re.sub(r"\\\n", " ", text)
    parts = re.split(r"(?m)^(?=FROM\s)", joined)
    return [p for p in parts if p.startswith("FROM")]


def test_the_dockerfile_passes_hadolint() -> None:
    proc = hadolint(DOCKERFILE)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_hadolint_fails_a_broken_dockerfile(tmp_path: Path) -> None:
    """The check can fail: an apt-get without --no-install-recommends and a missing
    cleanup are findings."""
    broken = tmp_path / "Dockerfile"
    broken.write_text(
        DOCKERFILE.read_text().replace(
            "apt-get install -y --no-install-recommends tini", "apt-get install -y tini"
        )
    )
    proc = hadolint(broken)
    assert proc.returncode != 0 and "DL3015" in proc.stdout, proc.stdout


def test_the_image_is_multi_stage_on_a_slim_python_base_given_as_an_argument() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"(?m)^ARG BASE=(\S+)$", text)
    assert base is not None and re.fullmatch(r"python:3\.11-slim(-\w+)?", base.group(1))
    build, runtime = stages(text)
    assert build.startswith("FROM ${BASE} AS build")
    assert runtime.startswith("FROM ${BASE} AS runtime")


def test_torch_is_the_pinned_cpu_build_by_default() -> None:
    """The Dockerfile's torch is the pyproject's pin, from the CPU index unless told."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = [r for r in pyproject["project"]["optional-dependencies"]["models"] if "torch" in r]
    assert pins == ["torch==2.13.0"]
    text = DOCKERFILE.read_text()
    assert re.search(r"(?m)^ARG TORCH_VERSION=2\.13\.0$", text)
    assert re.search(r"(?m)^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text)
    build = stages(text)[0]
    assert build.index('"torch==${TORCH_VERSION}"') < build.index('"/src[models]"')


def test_the_final_stage_runs_as_a_user_without_compilers() -> None:
    runtime = stages(DOCKERFILE.read_text())[1]
    user = re.search(r"(?m)^USER (\S+)$", runtime)
    assert user is not None and user.group(1).split(":")[0] not in ("0", "root")
    installs = re.findall(r"apt-get install[^&;]*", runtime)
    packages = {w for line in installs for w in line.split() if not w.startswith("-")}
    assert packages - {"apt-get", "install"} == {"tini"}, packages
    assert "pip install" not in runtime  # the environment comes built from the first stage
    assert "COPY --from=build /opt/gateway /opt/gateway" in runtime


def test_healthcheck_volumes_ports_and_entry_point() -> None:
    runtime = stages(DOCKERFILE.read_text())[1]
    health = re.search(r"(?m)^HEALTHCHECK .*$", runtime)
    assert health is not None and "/healthz" in health.group(0)
    volumes = re.search(r"(?m)^VOLUME (\[.*\])$", runtime)
    assert volumes is not None
    assert set(yaml.safe_load(volumes.group(1))) >= {
        "/etc/gateway",
        "/var/lib/gateway",
        "/var/lib/gateway-keys",
        "/models",
    }
    config = yaml.safe_load((REPO / "deploy" / "docker" / "gateway.yaml").read_text())
    exposed = {int(p) for p in re.findall(r"\d+", re.search(r"(?m)^EXPOSE .*$", runtime)[0])}
    assert {
        config["dicom"]["port"],
        config["hl7"]["port"],
        config["gateway"]["http"]["port"],
    } <= exposed
    assert re.search(
        r'(?m)^ENTRYPOINT \["/usr/bin/tini", "--", "/usr/local/bin/gateway-entrypoint"\]$', runtime
    )
    assert "COPY deploy/docker/entrypoint.sh /usr/local/bin/gateway-entrypoint" in runtime


def test_the_image_config_is_valid_and_names_the_bundles_the_image_holds() -> None:
    """The image's default config passes the schema, and every bundle it names is one
    that the Dockerfile copies (models/ to /opt/gateway/models)."""
    cfg = read_config(REPO / "deploy" / "docker" / "gateway.yaml")
    assert cfg.gateway.http.host == "0.0.0.0"
    assert cfg.key_file.parent == Path("/var/lib/gateway-keys")
    assert "COPY models/ /opt/gateway/models/" in DOCKERFILE.read_text()
    for name, model in cfg.models.items():
        inside = model.bundle.relative_to("/opt/gateway/models")
        assert (REPO / "models" / inside / "configs" / "metadata.json").exists(), name


# --- the entry point --------------------------------------------------------------------


@pytest.mark.parametrize("script", [ENTRYPOINT, DEPLOY / "compose" / "init-secrets.sh"])
def test_the_shell_scripts_pass_shellcheck(script: Path) -> None:
    proc = shellcheck(script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert script.stat().st_mode & 0o111, "executable"


def test_shellcheck_fails_a_broken_script(tmp_path: Path) -> None:
    broken = tmp_path / "entrypoint.sh"
    broken.write_text(ENTRYPOINT.read_text().replace('exec "$@"', "exec $@"))
    proc = shellcheck(broken)
    assert proc.returncode != 0 and "SC2068" in proc.stdout, proc.stdout


def entrypoint(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run entrypoint.sh with a stand-in ``gateway`` that prints its arguments, and this
    interpreter as ``python3`` (the image's venv is on PATH the same way)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "gateway"
    fake.write_text('#!/bin/sh\necho "gateway $*"\n')
    fake.chmod(0o755)
    python = bin_dir / "python3"
    if not python.exists():
        python.symlink_to(sys.executable)
    full = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
        "HOME": str(tmp_path),
        **env,
    }
    return run(["sh", str(ENTRYPOINT), *args], env=full)


def site_config(tmp_path: Path) -> Path:
    cfg = yaml.safe_load((REPO / "deploy" / "docker" / "gateway.yaml").read_text())
    cfg["gateway"]["encryption_key_file"] = str(tmp_path / "keys" / "keys.json")
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_entry_point_runs_the_role_from_the_environment(tmp_path: Path) -> None:
    config = site_config(tmp_path)
    proc = entrypoint(tmp_path, {"GATEWAY_ROLE": "worker", "GATEWAY_CONFIG": str(config)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"gateway run -c {config} --role worker"
    # options go to gateway run; a command runs instead of it
    proc = entrypoint(tmp_path, {"GATEWAY_CONFIG": str(config)}, "--log-level", "DEBUG")
    assert proc.stdout.strip() == f"gateway run -c {config} --role all --log-level DEBUG"
    proc = entrypoint(tmp_path, {}, "gateway", "queue", "status")
    assert proc.stdout.strip() == "gateway queue status"
    proc = entrypoint(tmp_path, {"GATEWAY_ROLE": "everything"})
    assert proc.returncode == 64 and "ingest, worker or all" in proc.stderr


def test_the_key_file_is_seeded_once_mode_0600_and_never_overwritten(tmp_path: Path) -> None:
    config = site_config(tmp_path)
    seed = tmp_path / "secret" / "keys.json"
    KeyStore.open(seed)  # a key file as an operator makes it, then stores it as a secret
    seed.chmod(0o440)
    env = {"GATEWAY_ROLE": "ingest", "GATEWAY_CONFIG": str(config), "GATEWAY_KEY_SEED": str(seed)}
    proc = entrypoint(tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    live = tmp_path / "keys" / "keys.json"
    assert live.read_bytes() == seed.read_bytes()
    assert stat.S_IMODE(live.stat().st_mode) == 0o600
    assert KeyStore.open(live, create=False).current == json.loads(seed.read_text())["current"]
    assert not list(live.parent.glob("*.seed.*")), "no temporary file is left behind"
    # a rotated live file is newer than the seed: a restart keeps it
    KeyStore.open(live, create=False).rotate()
    rotated = live.read_bytes()
    assert entrypoint(tmp_path, env).returncode == 0
    assert live.read_bytes() == rotated


def test_an_unreadable_seed_stops_the_start_with_a_reason(tmp_path: Path) -> None:
    config = site_config(tmp_path)
    env = {
        "GATEWAY_CONFIG": str(config),
        "GATEWAY_KEY_SEED": str(tmp_path / "no-such-secret"),
    }
    proc = entrypoint(tmp_path, env)
    assert proc.returncode == 78 and "cannot read the key seed" in proc.stderr
    assert not proc.stdout.startswith("gateway run")


def test_a_broken_config_stops_the_seeding_with_the_config_errors(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("gateway: {data_dirr: /x}\n")
    proc = entrypoint(tmp_path, {"GATEWAY_CONFIG": str(config), "GATEWAY_KEY_SEED": str(config)})
    assert proc.returncode == 78 and "data_dirr" in proc.stderr, proc.stderr
