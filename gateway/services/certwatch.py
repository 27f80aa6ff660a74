"""Certificate expiry: every certificate file the configuration names, and the days each
has left, for ``/readyz`` (certificates expiring within :data:`CERT_WARN_DAYS`, or
expired, are flagged) and the ``gateway_certificate_days_left`` metric.

The files are read when asked (at each ``/readyz`` and ``/metrics``), so a certificate
renewed in place, or one a reload adds, shows at once: there is no thread to start.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from gateway.config import Config
from gateway.observability.metrics import Metrics
from gateway.security.certs import days_left

__all__ = ["CERT_WARN_DAYS", "CertWatch"]

CERT_WARN_DAYS = 30  # /readyz details flag certificates expiring sooner


class CertWatch:
    """The certificates of *cfg* (set :attr:`cfg` again after a reload)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def certificates(self) -> dict[str, Path]:
        """Every certificate file the configuration names, by where it is configured."""
        cfg = self.cfg
        found: dict[str, Path] = {}
        for section in ("dicom", "hl7"):
            tls = getattr(cfg, section).tls
            if tls is not None:
                found[f"{section}.tls.cert"] = cfg.path(tls.cert)
                if tls.ca is not None:
                    found[f"{section}.tls.ca"] = cfg.path(tls.ca)
        if cfg.dashboard is not None:
            found["dashboard.tls.cert"] = cfg.path(cfg.dashboard.tls.cert)
            if cfg.dashboard.tls.ca is not None:
                found["dashboard.tls.ca"] = cfg.path(cfg.dashboard.tls.ca)
        for name, dest in cfg.destinations.items():
            client = (dest.dicom or dest.hl7).tls  # type: ignore[union-attr]
            if client is not None:
                found[f"destinations.{name}.tls.ca"] = cfg.path(client.ca)
                if client.cert is not None:
                    found[f"destinations.{name}.tls.cert"] = cfg.path(client.cert)
        return found

    def days_left(self) -> dict[str, float | None]:
        """Days each certificate has left (negative once expired); None when unreadable."""
        now = datetime.now(UTC)
        days: dict[str, float | None] = {}
        for name, path in self.certificates().items():
            try:
                days[name] = round(days_left(path, now), 1)
            except Exception:  # unreadable: reported as unknown, never a crash here
                days[name] = None
        return days

    def readiness_details(self) -> dict[str, object]:
        """/readyz details: certificates expiring within CERT_WARN_DAYS (or expired)."""
        certs = {
            name: {"days_left": d, "expires_soon": d is None or d < CERT_WARN_DAYS}
            for name, d in self.days_left().items()
        }
        return {"certificates": certs} if certs else {}

    def update_metrics(self, metrics: Metrics) -> None:
        """Set ``gateway_certificate_days_left`` for each readable certificate."""
        metrics.certificate_days_left.clear()
        for name, days in self.days_left().items():
            if days is not None:
                metrics.certificate_days_left.labels(certificate=name).set(days)
