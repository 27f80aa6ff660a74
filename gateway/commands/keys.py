"""``gateway keys rotate``: a new at-rest data key, recorded in the audit trail."""

from __future__ import annotations

import argparse
from typing import TextIO

from gateway.commands.base import Subparsers, needs_config
from gateway.config import Config
from gateway.security.audit import AuditLog, records, trail_path
from gateway.security.crypto import KeyStore


def register(sub: Subparsers) -> None:
    keys = sub.add_parser("keys", help="manage the at-rest encryption keys")
    ksub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    needs_config(
        ksub.add_parser(
            "rotate",
            help="create a new data key; old data stays readable",
            description="Add a new data key and make it current. Blobs written before stay "
            "readable with their old key. Back up the key file afterwards.",
        ),
        rotate,
    )


def rotate(cfg: Config, args: argparse.Namespace, out: TextIO) -> int:
    store = KeyStore.open(cfg.key_file, create=True)
    new = store.rotate()
    _audit_key_rotation(cfg, new.key_id)
    print(
        f"new data key {new.key_id} is current; {len(store.key_ids)} keys in "
        f"{cfg.key_file} (back this file up)",
        file=out,
    )
    return 0


def _audit_key_rotation(cfg: Config, key_id: str) -> None:
    with AuditLog.open(trail_path(cfg.data_dir)) as trail:  # safe beside a running gateway
        trail.write(records.key_rotation(records.cli_user(), key_id))
