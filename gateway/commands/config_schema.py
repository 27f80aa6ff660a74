"""``gateway config-schema``: the config's JSON Schema."""

from __future__ import annotations

import argparse
import json
from typing import TextIO

from gateway.commands.base import Subparsers, plain
from gateway.config import json_schema


def register(sub: Subparsers) -> None:
    plain(
        sub.add_parser(
            "config-schema",
            help="print the config's JSON Schema (for editors)",
            description="Print the JSON Schema of the config file, e.g. for the YAML language "
            "server: gateway config-schema > gateway.schema.json",
        ),
        config_schema,
    )


def config_schema(args: argparse.Namespace, out: TextIO) -> int:
    json.dump(json_schema(), out, indent=2)
    out.write("\n")
    return 0
