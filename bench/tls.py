"""DICOM or HL7 ingest over TLS against plain: what encryption on the wire costs the gateway.

    python -m bench.tls [--rounds 3] [--count 300] [--protocol dicom|hl7]

One gateway per round listens on a plain port and a TLS port (`dicom.tls`, certificates
from `gateway certs dev`, client certificate required). The same cached CT series as
`bench.ingest` (300 x 512 KB) is sent by `storescu` over one association to each port in
turn (`+tls` for TLS; the order alternates between rounds; `+II` gives every send new
SOP Instance UIDs), so the two differ only in TLS. Reported:
instances/s for each and the ratio TLS/plain (target >= 0.8). Results: printed, and
bench/out/tls.json.

``--protocol hl7``: the same for the MLLP listener (``hl7.tls``, client certificate
required): ``--count`` ORU^R01 (default 2000) over one connection, stop-and-wait, to
the plain port and to the TLS port of one gateway per round (no routes), the order
alternating, as ``bench.hl7`` sends them (each ACK checked). Results:
bench/out/tls-hl7.json.
"""

from __future__ import annotations

import argparse
import shutil
import ssl
from typing import Any

from bench import (
    CALLING_AE,
    GATEWAY_AE,
    GatewayProcess,
    log,
    machine,
    median,
    scratch_dir,
    table,
    verdict,
    write_gateway_config,
    write_json,
)
from bench.ingest import cached_series, send
from tests.dicomgen import free_port, storescu_args

TARGET = 0.8


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=None,
                        help="instances (default 300) or, with --protocol hl7, messages "
                             "(default 2000)")
    parser.add_argument("--protocol", choices=("dicom", "hl7"), default="dicom")
    args = parser.parse_args(argv)
    if args.protocol == "hl7":
        return hl7(args.rounds, args.count or 2000)
    args.count = args.count or 300

    from gateway.security.certs import make_dev_pki

    paths = cached_series(args.count)
    rows: list[list[Any]] = []
    plain: list[float] = []
    tls: list[float] = []
    for round_no in range(1, args.rounds + 1):
        folder = scratch_dir("tls-")
        pki = make_dev_pki(folder / "pki", client_names=("pacs",))
        tls_port = free_port()
        cfg = write_gateway_config(folder, dicom={"tls": tls_section(pki, tls_port)})
        gw = GatewayProcess(cfg)
        client = pki.client("pacs")
        # +II: new SOP Instance UIDs on every send, so the second send stores as much as
        # the first (a resent instance is only acknowledged, which is faster)
        base = storescu_args(
            paths, port=cfg.dicom_port, aet=CALLING_AE, aec=GATEWAY_AE, extra=["+II"]
        )
        secure = storescu_args(paths, port=tls_port, aet=CALLING_AE, aec=GATEWAY_AE, extra=["+II"])
        options = ["+tls", str(client.key), str(client.cert), "-pw", "+cf", str(pki.ca.cert)]
        secure = [secure[0], *options, *secure[1:]]
        # the order alternates between rounds: the first send into a fresh gateway is slower
        order = [("plain", base, plain), ("TLS", secure, tls)]
        if round_no % 2 == 0:
            order.reverse()
        try:
            gw.start()
            for name, argv, results in order:
                seconds, rc, _ = send(argv, instances=len(paths))
                if rc == 0:
                    results.append(len(paths) / seconds)
                    rows.append([round_no, name, len(paths) / seconds])
        finally:
            gw.stop()
            shutil.rmtree(folder, ignore_errors=True)
    return report(["round", "port", "inst/s"], rows, plain, tls, "inst", "tls.json", len(paths))


def tls_section(pki: Any, port: int) -> dict[str, Any]:
    """A listener's ``tls`` section: the development PKI's server certificate, clients
    verified against its CA."""
    return {
        "port": port,
        "cert": str(pki.server.cert),
        "key": str(pki.server.key),
        "ca": str(pki.ca.cert),
        "require_client_cert": True,
    }


def report(headers: list[str], rows: list[list[Any]], plain: list[float], tls: list[float],
           unit: str, file: str, count: int) -> int:
    """Print the rounds, the medians and the ratio; write them to bench/out/*file*."""
    if not plain or not tls:
        raise SystemExit("no good round for plain or TLS; see the messages above")
    ratio = median(tls) / median(plain)
    log(table(headers, rows))
    log(f"median plain: {median(plain):,.1f} {unit}/s, TLS: {median(tls):,.1f} {unit}/s")
    log(f"ratio TLS/plain = {ratio:.2f}   target >= {TARGET}: {verdict(ratio, TARGET)}")
    out = write_json(file, {"machine": machine(), "count": count, f"plain_{unit}_s": plain,
                            f"tls_{unit}_s": tls, "ratio": ratio})
    log(f"results written to {out}")
    return 0


def hl7(rounds: int, count: int) -> int:
    """HL7 over MLLP/TLS against plain MLLP on the same gateway (see the module doc)."""
    from bench.hl7 import measure as send_hl7
    from gateway.security.certs import make_dev_pki

    rows: list[list[Any]] = []
    plain: list[float] = []
    tls: list[float] = []
    for round_no in range(1, rounds + 1):
        folder = scratch_dir("tls-hl7-")
        pki = make_dev_pki(folder / "pki", client_names=("ehr",))
        tls_port = free_port()
        cfg = write_gateway_config(folder, hl7={"tls": tls_section(pki, tls_port)})
        client = pki.client("ehr")
        ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
        ctx.load_cert_chain(str(client.cert), str(client.key))
        gw = GatewayProcess(cfg)
        order: list[tuple[str, int, ssl.SSLContext | None, list[float]]] = [
            ("plain", cfg.hl7_port, None, plain),
            ("TLS", tls_port, ctx, tls),
        ]
        if round_no % 2 == 0:
            order.reverse()
        try:
            gw.start()
            for name, port, context, results in order:
                run = send_hl7(name, round_no, port, count, 50, 1, context)
                if run.ok:
                    results.append(run.per_second)
                    rows.append([round_no, name, run.per_second, run.p50_ms, run.p99_ms])
        finally:
            gw.stop()
            shutil.rmtree(folder, ignore_errors=True)
    return report(["round", "port", "msg/s", "p50 ms", "p99 ms"], rows, plain, tls, "msg",
                  "tls-hl7.json", count)


if __name__ == "__main__":
    raise SystemExit(main())
