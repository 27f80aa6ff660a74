"""Throw-away X.509 certificates for TLS tests, made with ``cryptography`` (no openssl CLI).

Typical use::

    from tests.certs import make_pki

    pki = make_pki(tmp_path / "pki")          # CA, server (127.0.0.1 + localhost), client
    other = make_pki(tmp_path / "other")      # an unrelated CA with its own client
    ServerTLS(port=..., cert=pki.server_cert, key=pki.server_key, ca=pki.ca_cert)
    ctx = pki.client_context()                # trusts the CA, presents the client cert

Every file is PEM; private keys are unencrypted PKCS#8 (dcmtk reads them with ``-pw``, or
without a password prompt since they are not encrypted). Certificates are valid from five
minutes ago for one day.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["PKI", "Issued", "issue", "make_pki"]

KeyType = Literal["ec", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class Issued:
    """One certificate and its key, on disk and in memory (to sign others with)."""

    cert: Path
    key: Path
    name: x509.Name
    private_key: PrivateKey


@dataclass(frozen=True)
class PKI:
    """A CA and the two leaf certificates it issued."""

    folder: Path
    ca: Issued
    server: Issued
    client: Issued

    @property
    def ca_cert(self) -> Path:
        return self.ca.cert

    @property
    def server_cert(self) -> Path:
        return self.server.cert

    @property
    def server_key(self) -> Path:
        return self.server.key

    @property
    def client_cert(self) -> Path:
        return self.client.cert

    @property
    def client_key(self) -> Path:
        return self.client.key

    def client_context(self, *, with_cert: bool = True) -> ssl.SSLContext:
        """A client context that verifies the server against this CA (host name checked:
        connect with ``server_hostname`` "localhost" or "127.0.0.1") and, when *with_cert*,
        presents this PKI's client certificate."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_cert))
        if with_cert:
            ctx.load_cert_chain(self.client_cert, self.client_key)
        return ctx

    def server_context(self, *, require_client_cert: bool = True) -> ssl.SSLContext:
        """A plain Python server context with this PKI's server certificate (for peers that
        the gateway talks to as a client)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.server_cert, self.server_key)
        ctx.load_verify_locations(cafile=str(self.ca_cert))
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        return ctx


def _new_key(key_type: KeyType) -> PrivateKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def issue(
    folder: Path,
    name: str,
    issuer: Issued | None = None,
    *,
    ca: bool = False,
    server: bool = False,
    client: bool = False,
    key_type: KeyType = "ec",
    days: int = 1,
    expired: bool = False,
) -> Issued:
    """Write ``folder/NAME.pem`` and ``folder/NAME.key``: a certificate for CN=*name*, signed
    by *issuer* (self-signed when None). ``server`` adds SAN DNS:localhost + IP:127.0.0.1 and
    the serverAuth usage, ``client`` the clientAuth usage, ``ca`` makes it a CA.
    ``expired``: valid from 30 days ago until yesterday."""
    folder.mkdir(parents=True, exist_ok=True)
    key = _new_key(key_type)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Gateway Tests"),
            # unique per call: two test CAs never share a subject (or an issuer lookup)
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, secrets.token_hex(6)),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    issuer_name, issuer_key = (
        (issuer.name, issuer.private_key) if issuer is not None else (subject, key)
    )
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)
    if expired:
        start, end = now - dt.timedelta(days=30), now - dt.timedelta(days=1)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.private_key.public_key()),
            critical=False,
        )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=key_type == "rsa",
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        usages = [
            *([ExtendedKeyUsageOID.SERVER_AUTH] if server else []),
            *([ExtendedKeyUsageOID.CLIENT_AUTH] if client else []),
        ]
        if usages:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
    cert = builder.sign(issuer_key, hashes.SHA256())
    cert_path = folder / f"{name}.pem"
    key_path = folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return Issued(cert_path, key_path, subject, key)


def make_pki(folder: Path | str, *, prefix: str = "", key_type: KeyType = "ec") -> PKI:
    """A CA plus a server certificate (SAN localhost, 127.0.0.1) and a client certificate,
    all signed by that CA, written to *folder* as ``{prefix}ca.pem/.key``,
    ``{prefix}server.pem/.key`` and ``{prefix}client.pem/.key``."""
    folder = Path(folder)
    ca = issue(folder, f"{prefix}ca", ca=True, key_type=key_type, days=2)
    server = issue(folder, f"{prefix}server", ca, server=True, key_type=key_type)
    client = issue(folder, f"{prefix}client", ca, client=True, key_type=key_type)
    return PKI(folder, ca, server, client)
