"""Who may read the dashboard: bearer tokens and client certificates from the tokens file.

The file (YAML, or JSON, which YAML reads too) names each holder, its role and its
credential::

    tokens:
      - {name: alice, role: operator, sha256: 9f86d0...}   # the token's SHA-256 (hex)
      - {name: ward-screen, role: viewer, token: "s3cr3t-long-random"}
    certificates:
      - {subject: "CN=alice,O=General Hospital", name: alice, role: operator}
      - {subject: qa-laptop, name: qa, role: viewer}        # a common name alone

``viewer`` reads every view; ``operator`` may also replay dead letters.  A token given as
``sha256`` keeps the secret out of the file (``printf %s TOKEN | sha256sum``); a token
shorter than :data:`MIN_TOKEN` characters is refused when the file is read.  Presented
tokens are hashed and compared in constant time with every entry.

A client certificate counts only when the TLS handshake verified it against
``dashboard.tls.ca``; its subject must carry every attribute an entry names (the same
rule as ``dicom.allowed_callers[].cert_subject``).

The file is read again when it changes (its modification time or size, looked at on each
request) and on SIGHUP (:meth:`Tokens.reload`); a file that does not load keeps the
holders of the last good one and is logged (``dashboard.tokens_rejected``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.config import parse_subject
from gateway.errors import ConfigError
from gateway.security.tls import subject_text

log = structlog.get_logger(__name__)

Role = Literal["viewer", "operator"]
MIN_TOKEN = 16  # characters of a token written in clear in the file
_HEX64 = r"^[0-9a-fA-F]{64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenEntry(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[\x21-\x7e][\x20-\x7e]*$")
    role: Role
    sha256: str | None = Field(default=None, pattern=_HEX64)
    token: str | None = Field(default=None, min_length=MIN_TOKEN)

    @model_validator(mode="after")
    def _one_secret(self) -> TokenEntry:
        if (self.sha256 is None) == (self.token is None):
            raise ValueError("give either 'sha256' (the token's SHA-256) or 'token'")
        return self

    @property
    def digest(self) -> bytes:
        if self.sha256 is not None:
            return bytes.fromhex(self.sha256)
        assert self.token is not None
        return hashlib.sha256(self.token.encode()).digest()


class CertificateEntry(_Strict):
    subject: str = Field(min_length=1)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[\x21-\x7e][\x20-\x7e]*$")
    role: Role

    @model_validator(mode="after")
    def _subject(self) -> CertificateEntry:
        parse_subject(self.subject)  # ValueError with the reason
        return self


class TokensFile(_Strict):
    tokens: list[TokenEntry] = []
    certificates: list[CertificateEntry] = []


@dataclass(frozen=True)
class Principal:
    """Who asks: a holder of the tokens file, by name and role, and how it proved it."""

    name: str
    role: Role
    via: Literal["token", "certificate"]
    cert_subject: str | None = None

    @property
    def operator(self) -> bool:
        return self.role == "operator"


def read_tokens(path: Path) -> TokensFile:
    """The holders in *path*; :class:`ConfigError` naming the file and the problem."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError([f"{path}: cannot read the dashboard tokens file: {exc}"]) from None
    try:
        return TokensFile.model_validate(data if data is not None else {})
    except ValidationError as exc:
        problems = [
            f"{path}: {'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}"
            for e in exc.errors()
        ]
        raise ConfigError(problems) from None


class Tokens:
    """The tokens file of a running dashboard, read again when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None
        self._file = read_tokens(path)
        self._seen = self._stamp()

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def reload(self) -> bool:
        """Read the file again (SIGHUP); False, and the last good holders kept, when it
        does not load."""
        with self._lock:
            self._seen = self._stamp()
            try:
                self._file = read_tokens(self.path)
            except ConfigError as exc:
                log.error(
                    "dashboard.tokens_rejected",
                    errors=exc.errors,
                    outcome="the holders of the last good file are kept",
                )
                return False
        log.info(
            "dashboard.tokens_loaded",
            tokens=len(self._file.tokens),
            certificates=len(self._file.certificates),
        )
        return True

    def _current(self) -> TokensFile:
        if self._stamp() != self._seen:
            self.reload()
        return self._file

    def by_token(self, token: str) -> Principal | None:
        """The holder of bearer *token*; None for an unknown one."""
        digest = hashlib.sha256(token.encode()).digest()
        found: TokenEntry | None = None
        for entry in self._current().tokens:  # every entry compared: no early exit
            if hmac.compare_digest(entry.digest, digest):
                found = entry
        return None if found is None else Principal(found.name, found.role, "token")

    def by_certificate(self, subject: frozenset[tuple[str, str]]) -> Principal | None:
        """The holder named for a verified client certificate's *subject*; the first
        entry whose every attribute the subject carries."""
        for entry in self._current().certificates:
            if parse_subject(entry.subject) <= subject:
                return Principal(entry.name, entry.role, "certificate", subject_text(subject)[:200])
        return None
