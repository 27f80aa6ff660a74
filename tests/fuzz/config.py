"""Fuzz target: a config file into the loader (:func:`gateway.config.read_config`).

Input: the file's bytes.  ``read_config`` returns a ``Config`` or raises
:class:`~gateway.errors.ConfigError` whose every line says where the problem is
(``FILE:LINE: ...``); never another exception.

Oracle: a file it accepts is YAML that PyYAML's own safe loader reads, and the same schema
validates that to the same configuration (the loader builds its values node by node, to
know their lines: it must build the values PyYAML does).
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path

import yaml
from pydantic import ValidationError

from gateway.config import Config, read_config
from gateway.errors import ConfigError
from tests.fuzz import AcceptedInvalid

_DIR = Path(
    tempfile.mkdtemp(
        prefix="gateway-fuzz-config-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
    )
)
_FILE = _DIR / "gateway.yaml"
_WHERE = re.compile(re.escape(str(_FILE)) + r":\d+: \S")


def TestOneInput(data: bytes) -> None:
    _FILE.write_bytes(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = read_config(_FILE)
    except ConfigError as exc:
        assert exc.errors, "a ConfigError without a message"
        for line in exc.errors:
            assert _WHERE.match(line), f"a config message that does not say where: {line!r}"
        return
    try:
        plain = yaml.safe_load(data.decode("utf-8"))
        again = Config.model_validate(plain)
    except (yaml.YAMLError, ValidationError, UnicodeDecodeError) as exc:
        raise AcceptedInvalid(
            f"read_config accepted a file that PyYAML and the schema refuse: {exc}"
        ) from None
    if again.model_dump() != cfg.model_dump():
        raise AcceptedInvalid("read_config built another configuration than PyYAML's values give")
