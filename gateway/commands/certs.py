"""``gateway certs dev``: development certificates for trying TLS locally."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TextIO

from gateway.commands.base import Subparsers, plain
from gateway.errors import GatewayError
from gateway.security.certs import describe, make_dev_pki


def register(sub: Subparsers) -> None:
    certs = sub.add_parser("certs", help="certificates for trying TLS locally")
    csub = certs.add_subparsers(dest="certs_command", metavar="ACTION", required=True)
    dev = plain(
        csub.add_parser(
            "dev",
            help="make a development CA, a server and client certificates in DIR",
            description="Create DIR/ca.pem, server.pem (+ .key) for the hosts given, and a "
            "client certificate per --client name, with a throw-away development CA (EC "
            "P-256). For trying TLS on loopback only: never for production. Refuses to "
            "overwrite files unless --force.",
        ),
        dev_certs,
    )
    dev.add_argument("dir", type=Path, metavar="DIR")
    dev.add_argument(
        "--host",
        action="append",
        dest="hosts",
        metavar="HOST",
        help="server name or address (repeatable; default 127.0.0.1 and localhost)",
    )
    dev.add_argument(
        "--client",
        action="append",
        dest="clients",
        metavar="NAME",
        help="client certificate name (repeatable; default 'client')",
    )
    dev.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    dev.add_argument("--force", action="store_true", help="overwrite existing files")


def dev_certs(args: argparse.Namespace, out: TextIO) -> int:
    try:
        pki = make_dev_pki(
            args.dir,
            hosts=tuple(args.hosts or ("127.0.0.1", "localhost")),
            days=args.days,
            client_names=tuple(args.clients or ("client",)),
            overwrite=args.force,
        )
    except FileExistsError:
        raise GatewayError(
            f"{args.dir} already holds development certificates; nothing was written. Use "
            "--force to replace them (peers that trust the old CA stop working)"
        ) from None
    print(f"development certificates in {pki.folder} (NOT for production):", file=out)
    for files in (pki.ca, pki.server, *pki.clients.values()):
        print(f"\n{files.cert} (key {files.key})\n{describe(files.cert)}", file=out)
    print(
        f"\nuse: dicom.tls / hl7.tls {{cert: {pki.server.cert}, key: {pki.server.key}, "
        f"ca: {pki.ca.cert}}}",
        file=out,
    )
    return 0
