"""A TLS scanner (sslyze) against the DICOM and MLLP TLS ports of a running gateway
(issue 15): TLS 1.2 and 1.3 only, only BCP 195 (RFC 9325) cipher suites, no compression,
no insecure or client-initiated renegotiation, the configured certificate chain, and the
client certificate asked for and required as configured.  The gateway serves DICOM and
HL7 peers as before once the scans are done.

Two gateways, both TLS ports on each, loopback only:

- ``required``: an ECDSA server certificate, ``require_client_cert: true``;
- ``optional``: an RSA server certificate, ``require_client_cert: false`` (a client
  certificate from ``ca`` is verified when one is presented).

sslyze scans with this PKI's client certificate, so that its handshakes (renegotiation,
cipher suites) get past the client-certificate check on both.  The client-certificate
requirement is probed per TLS version without one: nassl (sslyze's TLS engine) sees the
server's CertificateRequest; Python's ssl sees whether the handshake is then refused.
sslyze's own probe for it (``client_auth_requirement``) does not fit these ports: with
TLS 1.3 it sends one byte of application data and reads, and what a DICOM or MLLP
listener does with a stray byte is not a TLS answer (the MLLP listener drops a
connection that does not start with a frame, which sslyze reads as "required"), and the
MLLP port closes a refused handshake without a TLS alert (CPython gh-98078), which sslyze
reports as a connectivity error.

The last test makes as many handshakes as the DICOM port has ``max_associations``
slots, each closed without an A-ASSOCIATE-RQ, as a scan does: a peer calling next is
served (pynetdicom alone would hold each slot for ``acse_timeout``, 30 s).
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from nassl.ssl_client import (
    ClientCertificateRequested,
    OpenSslVerifyEnum,
    OpenSslVersionEnum,
    SslClient,
)
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sslyze import (
    CertificateInfoExtraArgument,
    ClientAuthenticationCredentials,
    ScanCommand,
    ScanCommandAttemptStatusEnum,
    ScanCommandsExtraArguments,
    Scanner,
    ServerNetworkConfiguration,
    ServerNetworkLocation,
    ServerScanRequest,
    ServerScanResult,
    ServerScanStatusEnum,
)

from gateway.config import DicomSection
from tests.certs import PKI, KeyType, make_pki
from tests.dicomgen import free_port
from tests.gatewayproc import GatewayProcess, write_config
from tests.hl7msgs import oru_r01
from tests.integration.test_dicom_tls import tls_refusal
from tests.integration.test_hl7_tls import send_over_tls

pytestmark = [
    pytest.mark.timeout(180),
    # sslyze loads its bundled trust stores, one of whose roots has a serial number of 0
    pytest.mark.filterwarnings("ignore:Parsed a serial number which wasn't positive"),
]

#: RFC 9325, 4.2: the TLS 1.2 cipher suites BCP 195 recommends (IANA names, as sslyze
#: reports them); ChaCha20-Poly1305 with ECDHE alongside AES-GCM.
BCP195_TLS12 = frozenset(
    {
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256",
        "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384",
    }
)
#: RFC 8446, B.4: the TLS 1.3 suites (without TLS_AES_128_CCM_8_SHA256, which IANA marks
#: not recommended).
TLS13 = frozenset(
    {
        "TLS_AES_128_GCM_SHA256",
        "TLS_AES_256_GCM_SHA384",
        "TLS_CHACHA20_POLY1305_SHA256",
        "TLS_AES_128_CCM_SHA256",
    }
)
LEGACY = ("ssl_2_0_cipher_suites", "ssl_3_0_cipher_suites")
OLD_TLS = ("tls_1_0_cipher_suites", "tls_1_1_cipher_suites")

#: only what the properties need: no HTTP headers, no Heartbleed/ROBOT/OpenSSL CCS
#: injection probes (long, and about OpenSSL bugs rather than the configuration)
SCAN_COMMANDS = frozenset(
    {
        ScanCommand.SSL_2_0_CIPHER_SUITES,
        ScanCommand.SSL_3_0_CIPHER_SUITES,
        ScanCommand.TLS_1_0_CIPHER_SUITES,
        ScanCommand.TLS_1_1_CIPHER_SUITES,
        ScanCommand.TLS_1_2_CIPHER_SUITES,
        ScanCommand.TLS_1_3_CIPHER_SUITES,
        ScanCommand.TLS_COMPRESSION,
        ScanCommand.SESSION_RENEGOTIATION,
        ScanCommand.CERTIFICATE_INFO,
    }
)


@dataclass
class Site:
    """One gateway with TLS on its DICOM and MLLP ports, and sslyze's result per port."""

    name: str
    gw: GatewayProcess
    pki: PKI
    key_type: KeyType  # of the server certificate
    require_client_cert: bool
    ports: dict[str, int]  # "dicom" / "mllp" -> TLS port
    scans: dict[str, ServerScanResult]

    def client_context(self, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        """Trusts this site's CA; presents the client certificate where it is required."""
        ctx = self.pki.client_context(with_cert=self.require_client_cert)
        if version is not None:
            ctx.minimum_version = ctx.maximum_version = version
        return ctx


def _start(folder: Path, name: str, key_type: KeyType, require_client_cert: bool) -> Site:
    pki = make_pki(folder / "pki", key_type=key_type)
    tls = {
        "cert": str(pki.server_cert),
        "key": str(pki.server_key),
        "ca": str(pki.ca_cert),
        "require_client_cert": require_client_cert,
    }
    ports = {"dicom": free_port(), "mllp": free_port()}
    config = write_config(
        folder,
        dicom={"tls": {"port": ports["dicom"], **tls}},
        hl7={"tls": {"port": ports["mllp"], **tls}},
    )
    gw = GatewayProcess(config, folder / "gateway.log").start()
    return Site(name, gw, pki, key_type, require_client_cert, ports, {})


def _request(site: Site, port: int) -> ServerScanRequest:
    return ServerScanRequest(
        server_location=ServerNetworkLocation("localhost", port, ip_address="127.0.0.1"),
        network_configuration=ServerNetworkConfiguration(
            tls_server_name_indication="localhost",
            tls_client_auth_credentials=ClientAuthenticationCredentials(
                certificate_chain_path=site.pki.client_cert, key_path=site.pki.client_key
            ),
            network_timeout=5,
            network_max_retries=1,
        ),
        scan_commands=set(SCAN_COMMANDS),
        scan_commands_extra_arguments=ScanCommandsExtraArguments(
            certificate_info=CertificateInfoExtraArgument(custom_ca_file=site.pki.ca_cert)
        ),
    )


def _stop(site: Site) -> int:
    return site.gw.stop()


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Site]]:
    plan: tuple[tuple[str, KeyType, bool], ...] = (
        ("required", "ec", True),
        ("optional", "rsa", False),
    )
    # side by side: each start takes seconds, and each stop waits out the associations
    # that the scan's handshakes left behind (see the last test)
    with ThreadPoolExecutor(len(plan)) as pool:
        starting = [
            pool.submit(_start, tmp_path_factory.mktemp(name), name, key_type, required)
            for name, key_type, required in plan
        ]
    started = [f.result() for f in starting if f.exception() is None]
    try:
        for future in starting:
            future.result()  # a gateway that did not start fails the module here
        by_port = {port: (site, kind) for site in started for kind, port in site.ports.items()}
        scanner = Scanner()
        scanner.queue_scans([_request(site, port) for port, (site, _) in by_port.items()])
        for result in scanner.get_results():
            site, kind = by_port[result.server_location.port]
            site.scans[kind] = result
        yield {site.name: site for site in started}
    finally:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(_stop, started))


TARGETS = [
    pytest.param(name, kind, id=f"{kind}-{name}")
    for name in ("required", "optional")
    for kind in ("dicom", "mllp")
]


def scanned(sites: dict[str, Site], name: str, kind: str) -> ServerScanResult:
    result = sites[name].scans[kind]
    assert result.scan_status == ServerScanStatusEnum.COMPLETED, result.connectivity_error_trace
    return result


def accepted_suites(result: ServerScanResult, attribute: str) -> set[str]:
    assert result.scan_result is not None
    attempt = getattr(result.scan_result, attribute)
    assert attempt.status == ScanCommandAttemptStatusEnum.COMPLETED, attempt.error_trace
    return {s.cipher_suite.name for s in attempt.result.accepted_cipher_suites}


@pytest.mark.parametrize(("name", "kind"), TARGETS)
def test_only_tls_1_2_and_1_3_are_accepted(sites: dict[str, Site], name: str, kind: str) -> None:
    result = scanned(sites, name, kind)
    for attribute in LEGACY + OLD_TLS:
        assert accepted_suites(result, attribute) == set(), attribute
    assert accepted_suites(result, "tls_1_2_cipher_suites")
    assert accepted_suites(result, "tls_1_3_cipher_suites")


@pytest.mark.parametrize(("name", "kind"), TARGETS)
def test_only_bcp195_cipher_suites_are_accepted(
    sites: dict[str, Site], name: str, kind: str
) -> None:
    result = scanned(sites, name, kind)
    tls12 = accepted_suites(result, "tls_1_2_cipher_suites")
    tls13 = accepted_suites(result, "tls_1_3_cipher_suites")
    assert tls12 <= BCP195_TLS12, tls12 - BCP195_TLS12
    assert tls13 <= TLS13, tls13 - TLS13
    # the server certificate's key type decides which of them it can offer
    signed_by = {"ec": "ECDSA", "rsa": "RSA"}[sites[name].key_type]
    assert f"TLS_ECDHE_{signed_by}_WITH_AES_128_GCM_SHA256" in tls12, tls12
    assert "TLS_AES_128_GCM_SHA256" in tls13, tls13  # RFC 8446's mandatory suite


@pytest.mark.parametrize(("name", "kind"), TARGETS)
def test_no_tls_compression(sites: dict[str, Site], name: str, kind: str) -> None:
    scan = scanned(sites, name, kind).scan_result
    assert scan is not None
    attempt = scan.tls_compression
    assert attempt.status == ScanCommandAttemptStatusEnum.COMPLETED, attempt.error_trace
    assert attempt.result is not None
    assert attempt.result.supports_compression is False


@pytest.mark.parametrize(("name", "kind"), TARGETS)
def test_no_insecure_or_client_initiated_renegotiation(
    sites: dict[str, Site], name: str, kind: str
) -> None:
    scan = scanned(sites, name, kind).scan_result
    assert scan is not None
    attempt = scan.session_renegotiation
    assert attempt.status == ScanCommandAttemptStatusEnum.COMPLETED, attempt.error_trace
    assert attempt.result is not None
    assert attempt.result.supports_secure_renegotiation is True  # RFC 5746
    assert attempt.result.is_vulnerable_to_client_renegotiation_dos is False
    assert attempt.result.client_renegotiations_success_count == 0


@pytest.mark.parametrize(("name", "kind"), TARGETS)
def test_the_configured_certificate_is_served_and_verifies_against_the_ca(
    sites: dict[str, Site], name: str, kind: str
) -> None:
    site = sites[name]
    scan = scanned(sites, name, kind).scan_result
    assert scan is not None
    attempt = scan.certificate_info
    assert attempt.status == ScanCommandAttemptStatusEnum.COMPLETED, attempt.error_trace
    assert attempt.result is not None
    assert attempt.result.hostname_used_for_server_name_indication == "localhost"
    (deployment,) = attempt.result.certificate_deployments  # one certificate, one key type
    chain = deployment.received_certificate_chain
    configured = x509.load_pem_x509_certificate(site.pki.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(site.pki.ca_cert.read_bytes())
    assert chain[0] == configured
    # the rest of the chain is the CA (OpenSSL completes the chain from the client CA file)
    assert all(c == ca for c in chain[1:]), [c.subject.rfc4514_string() for c in chain]
    assert deployment.received_chain_has_valid_order is True
    # validated against the configured CA, host name (localhost) included; a test CA is in
    # no public trust store (Mozilla, Apple...) that sslyze also tries
    validated = {
        v.trust_store.name: v
        for v in deployment.path_validation_results
        if v.was_validation_successful
    }
    assert list(validated) == ["Supplied CA file"], [
        (v.trust_store.name, v.validation_error) for v in deployment.path_validation_results
    ]
    assert validated["Supplied CA file"].trust_store.path == site.pki.ca_cert
    assert validated["Supplied CA file"].verified_certificate_chain == [configured, ca]


# --- the client certificate, as configured ----------------------------------------------

NASSL_VERSIONS = [
    pytest.param(OpenSslVersionEnum.TLSV1_2, id="tls1.2"),
    pytest.param(OpenSslVersionEnum.TLSV1_3, id="tls1.3"),
]
VERSIONS = [
    pytest.param(ssl.TLSVersion.TLSv1_2, id="tls1.2"),
    pytest.param(ssl.TLSVersion.TLSv1_3, id="tls1.3"),
]


def certificate_requested(port: int, version: OpenSslVersionEnum) -> bool:
    """Whether the server's handshake carries a CertificateRequest (nassl stops there when
    it has no certificate to give)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        client = SslClient(
            underlying_socket=sock,
            ssl_version=version,
            ssl_verify=OpenSslVerifyEnum.NONE,
            server_name_indication="localhost",
        )
        try:
            client.do_handshake()
        except ClientCertificateRequested:
            return True
        return False


@pytest.mark.parametrize(("name", "kind"), TARGETS)
@pytest.mark.parametrize("version", NASSL_VERSIONS)
def test_the_server_asks_for_a_client_certificate(
    sites: dict[str, Site], name: str, kind: str, version: OpenSslVersionEnum
) -> None:
    """Both configurations name a CA, so both ask; only ``require_client_cert`` refuses a
    client that has none (next tests)."""
    assert certificate_requested(sites[name].ports[kind], version)


@pytest.mark.parametrize("kind", ["dicom", "mllp"])
@pytest.mark.parametrize("version", VERSIONS)
def test_without_a_client_certificate_the_handshake_fails_where_one_is_required(
    sites: dict[str, Site], kind: str, version: ssl.TLSVersion
) -> None:
    site = sites["required"]
    ctx = site.pki.client_context(with_cert=False)
    ctx.minimum_version = ctx.maximum_version = version
    reason = tls_refusal(site.ports[kind], ctx)
    # DICOM answers with an alert; MLLP closes (asyncio sends none, CPython gh-98078)
    assert reason in {
        "SSLV3_ALERT_HANDSHAKE_FAILURE",  # TLS 1.2
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",  # TLS 1.3
        "UNEXPECTED_EOF_WHILE_READING",
        "closed",
    }, reason


def echo(port: int, ctx: ssl.SSLContext) -> tuple[int, str]:
    """A C-ECHO over TLS: its status and the TLS version negotiated."""
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="AI_GATEWAY", tls_args=(ctx, "localhost"))
    assert assoc.is_established
    try:
        transport = assoc.dul.socket
        assert transport is not None and isinstance(transport.socket, ssl.SSLSocket)
        negotiated = str(transport.socket.version())
        return int(assoc.send_c_echo().Status), negotiated
    finally:
        assoc.release()


@pytest.mark.parametrize("version", VERSIONS)
def test_without_a_client_certificate_the_handshake_succeeds_where_none_is_required(
    sites: dict[str, Site], version: ssl.TLSVersion
) -> None:
    site = sites["optional"]
    ctx = site.client_context(version)  # no client certificate
    assert echo(site.ports["dicom"], ctx) == (0x0000, version.name.replace("v1_", "v1."))
    ack = send_over_tls(site.ports["mllp"], ctx, oru_r01(control_id=f"NOCERT{version.value}"))
    assert b"MSA|AA|" in ack


# --- and after all that, the gateway still serves ---------------------------------------


@pytest.mark.parametrize("name", ["required", "optional"])
def test_after_the_scans_the_gateway_still_answers_echo_and_mllp(
    sites: dict[str, Site], name: str
) -> None:
    site = sites[name]
    assert site.gw.proc is not None and site.gw.proc.poll() is None
    assert site.gw.get("/readyz")[0] == 200
    assert echo(site.ports["dicom"], site.client_context())[0] == 0x0000
    ack = send_over_tls(site.ports["mllp"], site.client_context(), oru_r01(control_id="AFTER1"))
    assert b"MSA|AA|AFTER1" in ack


def test_handshakes_that_close_without_an_association_do_not_hold_association_slots(
    sites: dict[str, Site],
) -> None:
    """What a thorough scan does to the DICOM port: as many completed TLS handshakes as
    ``max_associations``, each closed without an A-ASSOCIATE-RQ.  A peer calling right
    after must be served: pynetdicom's acceptor would wait ``acse_timeout`` (30 s) for a
    request from each of them, holding its slot, had the SCP not ended that wait when the
    connection closed."""
    site = sites["required"]
    limit = DicomSection.model_fields["max_associations"].default  # the site's setting
    for _ in range(limit):
        with (
            socket.create_connection(("127.0.0.1", site.ports["dicom"]), timeout=5) as raw,
            site.client_context().wrap_socket(raw, server_hostname="localhost"),
        ):
            pass
    time.sleep(0.5)  # the gateway has seen every connection close
    assert echo(site.ports["dicom"], site.client_context())[0] == 0x0000
