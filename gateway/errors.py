"""The one exception tree of the gateway.

Every failure is either :class:`Transient` (try again later: disk full, peer down)
or :class:`Permanent` (retrying cannot help: malformed data, unknown sender).
Each edge maps the two branches to its protocol once: DICOM 0xA700 / 0xC000-range,
HL7 AE / AR, CLI exit codes.  Each class's docstring is its default message.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Gateway error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class Transient(GatewayError):
    """A temporary failure; the same request can succeed later."""


class Permanent(GatewayError):
    """A failure that retrying cannot fix."""


class SpoolFull(Transient):
    """The spool cannot write: disk full or not writable."""


class SpaceLow(Transient):
    """A volume the gateway writes to has less free space than ``gateway.min_free_mb``."""


class QueueUnavailable(Transient):
    """The queue database is busy or cannot be written."""


class MalformedInput(Permanent):
    """The received data cannot be parsed."""


class NotAllowed(Permanent):
    """The peer is not on the allow-list."""


class ConfigError(Permanent):
    """The configuration is invalid."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


class ListenError(Permanent):
    """A listener cannot bind its address (port in use, no permission)."""


class ProcessFailed(Permanent):
    """A process of the gateway (an ingest or worker process) did not start."""


class KeyStoreError(Permanent):
    """The encryption key file is missing, unreadable or corrupt."""


class IntegrityError(Permanent):
    """Stored data failed its authentication check (tampered or wrong key)."""


class ResultInvalid(Permanent):
    """The model result cannot be built into a valid SR, SEG or ORU^R01."""
