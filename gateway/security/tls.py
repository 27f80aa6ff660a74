"""TLS contexts for every listener and client (BCP 195: TLS 1.2+, modern ciphers)."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

from gateway.config import SUBJECT_NAMES, ClientTLS, ServerTLS
from gateway.errors import ConfigError

Resolve = Callable[[Path], Path]

#: TLS 1.2 suites of BCP 195 (RFC 9325, 4.2): ECDHE (or DHE-RSA) with AES-GCM or
#: ChaCha20-Poly1305; no CBC, no RSA key transport. TLS 1.3 uses OpenSSL's standard suites.
SERVER_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:!aNULL:!MD5:!DSS"


def server_context(tls: ServerTLS, resolve: Resolve) -> ssl.SSLContext:
    """A server context presenting our certificate; client certificates required when
    ``require_client_cert`` (verified against ``ca``)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(SERVER_CIPHERS)
    # No TLS compression (CRIME) and no renegotiation: a client-initiated one costs the
    # server a handshake at the client's will. OpenSSL 3 refuses client renegotiation and
    # Python turns compression off by default; said here so that neither depends on the
    # OpenSSL the interpreter was built with (OpenSSL 1.1.1 accepts client renegotiation).
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    try:
        ctx.load_cert_chain(resolve(tls.cert), resolve(tls.key))
        if tls.ca is not None:
            ctx.load_verify_locations(cafile=str(resolve(tls.ca)))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([f"tls: cannot load certificate/key/CA: {exc}"]) from None
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    if tls.ca is None:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(tls: ClientTLS, resolve: Resolve) -> ssl.SSLContext:
    """A client context that verifies the peer against ``ca`` and presents ``cert``;
    TLS 1.2+ with the BCP 195 suites only (:data:`SERVER_CIPHERS`)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(resolve(tls.ca)))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # the same suites as the listeners offer: Python's default list still has CBC suites
    ctx.set_ciphers(SERVER_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if tls.cert is not None and tls.key is not None:
        ctx.load_cert_chain(resolve(tls.cert), resolve(tls.key))
    return ctx


def peer_subject(sock: object) -> frozenset[tuple[str, str]] | None:
    """The verified client certificate's subject attributes of a TLS socket; None when the
    connection is not TLS or the peer presented no certificate."""
    getpeercert = getattr(sock, "getpeercert", None)
    if getpeercert is None:
        return None
    try:
        cert = getpeercert()
    except (ValueError, OSError):
        return None
    if not cert:
        return None
    pairs = set()
    for rdn in cert.get("subject", ()):
        for name, value in rdn:
            pairs.add((SUBJECT_NAMES.get(name, name), str(value)))
    return frozenset(pairs)


def subject_text(subject: frozenset[tuple[str, str]] | None) -> str:
    """For logs and audit records: "CN=pacs1,O=Hospital" (CN first), or "" without one."""
    if not subject:
        return ""
    order = {"CN": 0, "OU": 1, "O": 2, "L": 3, "ST": 4, "C": 5}
    return ",".join(f"{k}={v}" for k, v in sorted(subject, key=lambda kv: order.get(kv[0], 9)))
