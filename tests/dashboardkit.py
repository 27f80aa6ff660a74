"""A dashboard for tests: a PKI, a tokens file with a viewer and an operator, and the
``dashboard:`` section of a config that uses them."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.certs import PKI, make_pki


@dataclass(frozen=True)
class DashboardKit:
    pki: PKI
    tokens_file: Path
    viewer: str  # the viewer's token (written in clear)
    operator: str  # the operator's token (written as its SHA-256)

    def section(self) -> dict[str, Any]:
        """The config's ``dashboard:`` section."""
        return {
            "tokens_file": str(self.tokens_file),
            "tls": {
                "cert": str(self.pki.server_cert),
                "key": str(self.pki.server_key),
                "ca": str(self.pki.ca_cert),
            },
        }

    @staticmethod
    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}


def make_dashboard(folder: Path) -> DashboardKit:
    """A PKI under *folder*, and a tokens file naming a viewer (token in clear), an
    operator (token by its SHA-256) and the PKI's client certificate (CN=client, viewer)."""
    folder.mkdir(parents=True, exist_ok=True)
    pki = make_pki(folder / "pki")
    viewer, operator = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    tokens = folder / "tokens.yaml"
    tokens.write_text(
        yaml.safe_dump(
            {
                "tokens": [
                    {"name": "ward-screen", "role": "viewer", "token": viewer},
                    {
                        "name": "alice",
                        "role": "operator",
                        "sha256": hashlib.sha256(operator.encode()).hexdigest(),
                    },
                ],
                "certificates": [{"subject": "CN=client", "name": "qa-laptop", "role": "viewer"}],
            }
        )
    )
    return DashboardKit(pki, tokens, viewer, operator)
