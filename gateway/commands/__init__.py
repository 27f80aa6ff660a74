"""The ``gateway`` subcommands, one module per group, each defining its parser beside the
handler that runs it: ``register(subparsers)`` adds the parser and sets its handler
(:func:`~gateway.commands.base.needs_config` or :func:`~gateway.commands.base.plain`).
:data:`COMMANDS` lists their ``register`` functions in the order ``gateway --help`` shows them;
:mod:`gateway.cli` builds the top-level parser, loads the config and maps errors to exit
codes."""

from __future__ import annotations

from collections.abc import Callable

from gateway.commands import (
    audit,
    certs,
    check_config,
    config_schema,
    db,
    explain,
    findings,
    keys,
    models,
    purge,
    queue,
    run,
)
from gateway.commands.base import Subparsers

__all__ = ["COMMANDS", "Register"]

Register = Callable[[Subparsers], None]

#: Each command module's ``register``, in the order of ``gateway --help``.
COMMANDS: tuple[Register, ...] = (
    run.register,
    check_config.register,
    explain.register,
    config_schema.register,
    queue.register,
    models.register,
    findings.register,
    audit.register,
    certs.register,
    purge.register,
    db.register,
    keys.register,
)
