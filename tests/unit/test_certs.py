"""Development certificates: real TLS handshakes with the gateway's own contexts, SANs,
usages, file modes, no silent overwrite, expiry."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.config import ClientTLS, ServerTLS
from gateway.security.certs import (
    CA_COMMON_NAME,
    DevPKI,
    cert_expiry,
    days_left,
    describe,
    make_dev_pki,
)
from gateway.security.tls import client_context, server_context

NOW = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPKI:
    return make_dev_pki(tmp_path_factory.mktemp("certs") / "pki", client_names=("client", "pacs"))


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def same(p: Path) -> Path:
    return p


def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str
) -> dict[str, object]:
    """One TLS handshake over a socket pair; returns the client certificate the server
    saw (empty when none).  Raises what the client's handshake raised."""
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    seen: dict[str, object] = {}

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as tls:
                seen.update(tls.getpeercert() or {})
                tls.sendall(b"ok")
        except (OSError, ssl.SSLError):
            a.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname=server_hostname) as tls:
            assert tls.recv(2) == b"ok"
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        b.close()
        thread.join(5)
    return seen


def contexts(pki: DevPKI, client: str = "client") -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """The gateway's own BCP 195 contexts (security/tls.py) built from the dev PKI."""
    server = server_context(
        ServerTLS(port=2762, cert=pki.server.cert, key=pki.server.key, ca=pki.ca_cert), same
    )
    pair = pki.client(client)
    cli = client_context(ClientTLS(ca=pki.ca_cert, cert=pair.cert, key=pair.key), same)
    return server, cli


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1"])
def test_mutual_tls_handshake_verifies_both_sides(pki: DevPKI, name: str) -> None:
    """The server's certificate verifies against ca.pem for each host, and the server sees
    the client certificate's subject."""
    server, client = contexts(pki)
    seen = handshake(server, client, name)
    subject = dict(x[0] for x in seen["subject"])  # type: ignore[attr-defined]
    assert subject["commonName"] == "client"
    assert "not for production" in subject["organizationName"]


def test_each_client_name_gets_its_own_certificate(pki: DevPKI) -> None:
    server, client = contexts(pki, "pacs")
    seen = handshake(server, client, "localhost")
    assert dict(x[0] for x in seen["subject"])["commonName"] == "pacs"  # type: ignore[attr-defined]


def test_a_host_not_in_the_sans_fails_verification(pki: DevPKI) -> None:
    server, client = contexts(pki)
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake(server, client, "gateway.example.org")


def test_a_client_without_certificate_is_refused_when_required(pki: DevPKI) -> None:
    server, _ = contexts(pki)
    bare = client_context(ClientTLS(ca=pki.ca_cert), same)
    # with TLS 1.3 the refusal arrives after the client's side of the handshake: the read
    # in handshake() sees it
    with pytest.raises((ssl.SSLError, OSError)):
        handshake(server, bare, "localhost")


def test_another_dev_ca_is_not_trusted(pki: DevPKI, tmp_path: Path) -> None:
    other = make_dev_pki(tmp_path / "other")
    server, _ = contexts(pki)
    client = client_context(ClientTLS(ca=other.ca_cert), same)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server, client, "localhost")


def test_server_certificate_has_the_hosts_as_ip_and_dns_sans(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path, hosts=("10.1.2.3", "gw.example.org", "::1", "localhost"))
    cert = load(pki.server.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gw.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("::1"),
    ]


def eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_usages_and_ca_flags(pki: DevPKI) -> None:
    ca, server, client = load(pki.ca_cert), load(pki.server.cert), load(pki.client().cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for leaf in (server, client):
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert leaf.issuer == ca.subject
    assert eku(server) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert eku(client) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_certificates_are_marked_as_development(pki: DevPKI) -> None:
    ca = load(pki.ca_cert)
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == CA_COMMON_NAME
    assert "not for production" in CA_COMMON_NAME
    for pem in (pki.server.cert, pki.client().cert):
        org = load(pem).subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
        assert "not for production" in str(org)


def test_keys_are_ec_p256_pkcs8_and_readable_by_owner_only(pki: DevPKI) -> None:
    assert stat.S_IMODE(pki.folder.stat().st_mode) == 0o700
    for pair in (pki.ca, pki.server, *pki.clients.values()):
        assert stat.S_IMODE(pair.key.stat().st_mode) == 0o600
        assert stat.S_IMODE(pair.cert.stat().st_mode) == 0o644
        pem = pair.key.read_bytes()
        assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, not encrypted
        key = load(pair.cert).public_key()
        assert key.curve.name == "secp256r1"  # type: ignore[union-attr]
    assert sorted(p.name for p in pki.folder.iterdir()) == sorted(
        f"{n}.{e}" for n in ("ca", "server", "client", "pacs") for e in ("pem", "key")
    )


def test_existing_files_are_not_overwritten(tmp_path: Path) -> None:
    first = make_dev_pki(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError, match=r"ca\.pem' already exists.*overwrite=True"):
        make_dev_pki(tmp_path)
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before
    # a new client name next to an existing server certificate is refused as well
    with pytest.raises(FileExistsError, match="already exists"):
        make_dev_pki(tmp_path, client_names=("other",))
    assert not (tmp_path / "other.pem").exists()
    again = make_dev_pki(tmp_path, overwrite=True)
    assert again.ca_cert.read_bytes() != before[first.ca_cert]
    assert stat.S_IMODE(again.ca.key.stat().st_mode) == 0o600


def test_expiry_and_days_left(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path, days=30, now=NOW)
    assert cert_expiry(pki.server.cert) == NOW + dt.timedelta(days=30)
    assert days_left(pki.server.cert, NOW) == pytest.approx(30.0)
    assert days_left(pki.server.cert, NOW + dt.timedelta(days=29, hours=12)) == pytest.approx(0.5)
    assert days_left(pki.ca_cert, NOW + dt.timedelta(days=31)) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="timezone-aware"):
        days_left(pki.ca_cert, dt.datetime(2025, 3, 1))


def test_expiry_of_a_chain_file_is_its_earliest(tmp_path: Path) -> None:
    short = make_dev_pki(tmp_path / "a", days=10, now=NOW)
    long = make_dev_pki(tmp_path / "b", days=100, now=NOW)
    chain = tmp_path / "chain.pem"
    chain.write_bytes(long.server.cert.read_bytes() + short.ca_cert.read_bytes())
    assert cert_expiry(chain) == NOW + dt.timedelta(days=10)


def test_describe_names_subject_issuer_sans_and_expiry(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path, hosts=("127.0.0.1", "gw.lan"), days=10, now=NOW)
    text = describe(pki.server.cert)
    assert "subject: CN=AI Gateway development server" in text
    assert f"issuer: CN={CA_COMMON_NAME}" in text
    assert "SANs: DNS:gw.lan, IP:127.0.0.1" in text
    assert "usages: serverAuth" in text
    assert "not after: 2025-03-11T12:00:00Z" in text
    assert "(CA)" in describe(pki.ca_cert)


def test_a_file_without_a_certificate_is_a_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ValueError, match=r"junk\.pem' holds no readable PEM certificate"):
        cert_expiry(junk)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hosts": ("bad host",)}, "neither an IP address nor a DNS name"),
        ({"hosts": ()}, "at least one host"),
        ({"client_names": ("server",)}, "not 'ca' or 'server'"),
        ({"client_names": ("../x",)}, "letters, digits"),
        ({"client_names": ("a", "a")}, "repeat"),
        ({"days": 0}, "at least 1"),
    ],
)
def test_bad_arguments_are_refused_before_writing(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_dev_pki(tmp_path / "pki", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "pki").exists()


def test_outgoing_tls_offers_only_the_bcp_195_suites(pki: DevPKI) -> None:
    """The client side (to PACS and EHR) offers what the listeners accept: TLS 1.2 suites
    with ECDHE/DHE and AES-GCM or ChaCha20-Poly1305 only (Python's default list has CBC)."""
    ctx = client_context(ClientTLS(ca=pki.ca_cert), same)
    tls12 = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12
    assert all(("GCM" in n or "CHACHA20" in n) and "DHE" in n for n in tls12), tls12
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION
