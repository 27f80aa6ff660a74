"""The listeners' TLS context as configured, whatever OpenSSL the interpreter links: what
tests/integration/test_tls_scan.py sees from outside with this machine's OpenSSL."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from gateway.config import ServerTLS
from gateway.security.tls import server_context
from tests.certs import make_pki

#: OpenSSL's names of the TLS 1.2 suites BCP 195 (RFC 9325, 4.2) recommends, and of the
#: standard TLS 1.3 suites.
BCP195_TLS12 = {
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256",
    "DHE-RSA-AES256-GCM-SHA384",
}
TLS13 = {
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
    "TLS_AES_128_CCM_SHA256",
}


@pytest.mark.parametrize("require_client_cert", [True, False])
def test_the_server_context_allows_tls_1_2_and_up_bcp195_suites_no_compression_no_renegotiation(
    tmp_path: Path, require_client_cert: bool
) -> None:
    pki = make_pki(tmp_path)
    tls = ServerTLS(
        port=0,
        cert=pki.server_cert,
        key=pki.server_key,
        ca=pki.ca_cert,
        require_client_cert=require_client_cert,
    )
    ctx = server_context(tls, lambda p: p)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    names = {c["name"] for c in ctx.get_ciphers()}
    assert names <= BCP195_TLS12 | TLS13, names - BCP195_TLS12 - TLS13
    assert names & BCP195_TLS12 and names & TLS13
    assert ctx.verify_mode == (ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL)
