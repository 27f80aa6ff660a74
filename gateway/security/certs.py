"""Development certificates: a throw-away CA, a server certificate and client certificates.

For trying TLS on a laptop or a test bench, never for production (every certificate says
so in its subject).  Everything is made with ``cryptography``, no openssl command::

    pki = make_dev_pki(Path("var/dev-pki"), hosts=["127.0.0.1", "localhost", "gw.lan"])
    # ca.pem/ca.key, server.pem/server.key, client.pem/client.key

Keys are EC P-256, written as unencrypted PKCS#8 PEM with mode 0600 (the folder is made
0700); certificates are PEM, 0644.  Existing files are never replaced unless
``overwrite=True``.  :func:`cert_expiry`, :func:`days_left` and :func:`describe` read any
PEM certificate file (the gateway's own, a peer's CA) for readiness checks and metrics.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.security.crypto import fsync_dir

__all__ = [
    "CA_COMMON_NAME",
    "DEV_ORGANIZATION",
    "SERVER_COMMON_NAME",
    "CertFiles",
    "DevPKI",
    "cert_expiry",
    "days_left",
    "describe",
    "make_dev_pki",
]

CA_COMMON_NAME = "AI Gateway development CA — not for production"
DEV_ORGANIZATION = "AI Gateway development — not for production"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SERVER_COMMON_NAME = "AI Gateway development server"
_USAGES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
}
_BACKDATE = dt.timedelta(minutes=5)  # tolerate peers whose clocks are a little behind


@dataclass(frozen=True)
class CertFiles:
    """A certificate and its private key on disk."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class DevPKI:
    """What :func:`make_dev_pki` wrote."""

    folder: Path
    ca: CertFiles
    server: CertFiles
    clients: Mapping[str, CertFiles]

    @property
    def ca_cert(self) -> Path:
        return self.ca.cert

    def client(self, name: str = "client") -> CertFiles:
        return self.clients[name]


def _host_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or not host.isascii() or any(c.isspace() for c in host):
        raise ValueError(f"host {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host)


def _name(common_name: str, *, organization: str | None, unit: str) -> x509.Name:
    attrs = []
    if organization is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file and rename, so a file is never seen half-written."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # in case a stale temporary file had another mode
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_dev_pki(
    folder: Path,
    *,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    days: int = 365,
    client_names: Sequence[str] = ("client",),
    overwrite: bool = False,
    now: dt.datetime | None = None,
) -> DevPKI:
    """Write a development CA (``ca.pem``, ``ca.key``), a server certificate for *hosts*
    (IP and DNS subject alternative names, serverAuth) as ``server.pem``/``server.key``,
    and one clientAuth certificate per name in *client_names* (``NAME.pem``/``NAME.key``,
    CN=NAME), all valid for *days* from *now* (default: the current time).

    Raises FileExistsError naming the first file that exists, before writing anything,
    unless *overwrite*; ValueError for a bad host, client name or day count.
    """
    folder = Path(folder)
    if days < 1:
        raise ValueError(f"days must be at least 1, not {days}")
    if not hosts:
        raise ValueError("at least one host is needed for the server certificate")
    sans = [_host_name(h) for h in hosts]
    for name in client_names:
        if not _NAME.fullmatch(name) or name in ("ca", "server"):
            raise ValueError(
                f"client name {name!r} must be letters, digits, '.', '_' or '-' (at most 64), "
                "and not 'ca' or 'server'"
            )
    if len(set(client_names)) != len(client_names):
        raise ValueError(f"client names repeat: {list(client_names)}")
    stems = ["ca", "server", *client_names]
    targets = [folder / f"{stem}{ext}" for stem in stems for ext in (".pem", ".key")]
    if not overwrite:
        for target in targets:
            if target.exists():
                raise FileExistsError(
                    f"'{target}' already exists; nothing was written. Pass overwrite=True to "
                    "replace the development PKI (peers trusting the old CA stop working)."
                )

    now = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    start, end = now - _BACKDATE, now + dt.timedelta(days=days)
    # A fresh tag per PKI: two development CAs never share a subject (or an issuer lookup).
    unit = f"development {secrets.token_hex(4)}"

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(CA_COMMON_NAME, organization=None, unit=unit)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(
        common_name: str,
        usage: x509.ObjectIdentifier,
        san: list[x509.GeneralName] | None,
    ) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, organization=DEV_ORGANIZATION, unit=unit))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if san is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    contents: dict[str, tuple[bytes, bytes]] = {
        "ca": (ca_cert.public_bytes(serialization.Encoding.PEM), _key_pem(ca_key)),
        "server": leaf(SERVER_COMMON_NAME, ExtendedKeyUsageOID.SERVER_AUTH, sans),
    }
    for name in client_names:
        contents[name] = leaf(name, ExtendedKeyUsageOID.CLIENT_AUTH, None)

    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True)
        fsync_dir(folder.parent)
    files: dict[str, CertFiles] = {}
    for stem, (cert_pem, key_pem) in contents.items():
        pair = CertFiles(folder / f"{stem}.pem", folder / f"{stem}.key")
        _write(pair.key, key_pem, 0o600)
        _write(pair.cert, cert_pem, 0o644)
        files[stem] = pair
    fsync_dir(folder)
    return DevPKI(
        folder,
        files["ca"],
        files["server"],
        {name: files[name] for name in client_names},
    )


def _load(path: Path) -> list[x509.Certificate]:
    data = Path(path).read_bytes()
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ValueError(f"'{path}' holds no readable PEM certificate: {exc}") from None
    return certs


def cert_expiry(path: Path) -> dt.datetime:
    """When the certificate file at *path* stops being valid (UTC): its not-after, or for
    a chain file the earliest not-after of its certificates."""
    return min(c.not_valid_after_utc for c in _load(path))


def days_left(path: Path, now: dt.datetime) -> float:
    """Days from *now* (timezone-aware) until :func:`cert_expiry`; negative once expired."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (e.g. datetime.now(UTC))")
    return (cert_expiry(path) - now).total_seconds() / 86400


def _iso(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def describe(path: Path) -> str:
    """A few lines about the (first) certificate in *path*: subject, issuer, SANs, usages,
    validity, SHA-256 fingerprint."""
    cert = _load(path)[0]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [f"DNS:{n}" for n in san.get_values_for_type(x509.DNSName)] + [
            f"IP:{a}" for a in san.get_values_for_type(x509.IPAddress)
        ]
    except x509.ExtensionNotFound:
        names = []
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        usages = [_USAGES.get(oid, oid.dotted_string) for oid in eku]
    except x509.ExtensionNotFound:
        usages = []
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    lines = [
        f"subject: {cert.subject.rfc4514_string()}",
        f"issuer: {cert.issuer.rfc4514_string()}",
        f"SANs: {', '.join(names) or '(none)'}",
        f"usages: {', '.join(usages) or '(any)'}{' (CA)' if is_ca else ''}",
        f"not before: {_iso(cert.not_valid_before_utc)}",
        f"not after: {_iso(cert.not_valid_after_utc)}",
        f"sha256: {cert.fingerprint(hashes.SHA256()).hex(':')}",
    ]
    return "\n".join(lines)
