"""What the gateway checks before it starts: the config file, then the files it names.

:func:`gateway.config.read_config` validates the file itself (schema, references between
sections) without opening anything else.  :func:`load_config` then checks that every file
the config names is there and usable: TLS certificates, keys and CAs, and each model's
bundle folder (read without torch: metadata, the ``gateway`` section, weights present).
A typo in a path is a message naming the config line now, not an outage at 3 a.m.

Every command that takes ``-c`` loads its config here; ``gateway check-config`` prints
the problems this finds.
"""

from __future__ import annotations

from pathlib import Path

from gateway.config import Config, read_config
from gateway.errors import ConfigError
from gateway.infer.bundles import BundleError, read_bundle

__all__ = ["check_files", "load_config"]


def load_config(path: Path | str) -> Config:
    """:func:`~gateway.config.read_config`, then :func:`check_files`."""
    cfg = read_config(path)
    check_files(cfg)
    return cfg


def check_files(cfg: Config) -> None:
    """Raise :class:`ConfigError` listing every named file that is missing or unusable."""
    problems: list[str] = []

    def need(value: Path | None, *loc: str) -> None:
        if value is not None and not cfg.path(value).is_file():
            problems.append(f"{cfg.where(*loc)}: file '{cfg.path(value)}' does not exist")

    for section, tls in (("dicom", cfg.dicom.tls), ("hl7", cfg.hl7.tls)):
        if tls is not None:
            for key in ("cert", "key", "ca"):
                need(getattr(tls, key), section, "tls", key)
    need(cfg.gateway.database_password_file, "gateway", "database_password_file")
    if cfg.dashboard is not None:
        need(cfg.dashboard.tokens_file, "dashboard", "tokens_file")
        for key in ("cert", "key", "ca"):
            need(getattr(cfg.dashboard.tls, key), "dashboard", "tls", key)
    syslog = cfg.gateway.audit.syslog
    if syslog is not None:
        for key in ("ca", "cert", "key"):
            need(getattr(syslog.tls, key), "gateway", "audit", "syslog", "tls", key)
    for name, dest in cfg.destinations.items():
        kind = "dicom" if dest.dicom else "hl7"
        client = (dest.dicom or dest.hl7).tls  # type: ignore[union-attr]
        if client is not None:
            for key in ("ca", "cert", "key"):
                need(getattr(client, key), "destinations", name, kind, "tls", key)
    for name, model in cfg.models.items():
        try:
            read_bundle(name, cfg.path(model.bundle), hash_weights=False)
        except BundleError as exc:
            detail = exc.message.split("): ", 1)[-1]
            problems.append(
                f"{cfg.where('models', name, 'bundle')}: {cfg.path(model.bundle)}: {detail}"
            )
    if problems:
        raise ConfigError(problems)
