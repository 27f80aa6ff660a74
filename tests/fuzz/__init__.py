"""Coverage-guided fuzzing of the gateway's input surfaces (atheris / libFuzzer).

One module per surface, each with ``TestOneInput(data: bytes) -> None``, usable by atheris
and by the replay test (``tests/unit/test_fuzz_corpus.py``):

- :mod:`tests.fuzz.dicom_dataset`: data set bytes into the SCP's decision
  (``StoreHandler``: the structural check, the file meta and the header reader), in memory
  and through a received file;
- :mod:`tests.fuzz.dicom_pdata`: P-DATA-TF PDUs, reassembled by pynetdicom as the SCP
  receives them, then into the same decision;
- :mod:`tests.fuzz.dicom_file`: Part 10 bytes into the file meta walker and the header
  reader (what delivery, ``gateway explain`` and the workers read);
- :mod:`tests.fuzz.mllp`: a byte stream into the MLLP frame reader;
- :mod:`tests.fuzz.hl7_message`: the one HL7 reader (separators, segments, escapes, files);
- :mod:`tests.fuzz.hl7_ack`: the MLLP edge's MSH reader and the ACK builder;
- :mod:`tests.fuzz.config`: a config file into ``read_config``.

A target's contract: it returns, or the code under test raises the project's own error
(:class:`~gateway.errors.MalformedInput`, :class:`~gateway.errors.ConfigError`, ...),
which the target catches.  Any other exception is a *crash*.  Each target also has an
oracle: when the code under test accepts an input that the oracle finds invalid, the
target raises :class:`AcceptedInvalid` (a *success response to invalid input*).

``python -m tests.fuzz run [--seconds 300] [TARGET...]`` fuzzes (see
:mod:`tests.fuzz.runner`); ``python -m tests.fuzz seeds`` rewrites the seed corpora.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import structlog

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"  # committed seeds: CORPUS / TARGET / file
CRASHES = HERE / "crashes"  # reproducers the runner writes: TARGET-KIND-SHA1
DICTS = HERE / "dicts"  # libFuzzer dictionaries, one per kind of input


@dataclass(frozen=True)
class Target:
    """What the runner needs to know of a target before importing it."""

    instrument: tuple[str, ...]  # the packages atheris instruments for coverage
    max_len: int  # the longest input libFuzzer makes
    dictionary: str  # DICTS / (this + ".dict"): tokens libFuzzer splices in


TARGETS = {
    "dicom_dataset": Target(("gateway", "pydicom"), 64 * 1024, "dicom"),
    "dicom_pdata": Target(("gateway", "pydicom", "pynetdicom"), 64 * 1024, "dicom"),
    "dicom_file": Target(("gateway", "pydicom"), 64 * 1024, "dicom"),
    "mllp": Target(("gateway",), 16 * 1024, "hl7"),
    "hl7_message": Target(("gateway",), 8 * 1024, "hl7"),
    "hl7_ack": Target(("gateway",), 8 * 1024, "hl7"),
    "config": Target(("gateway", "yaml"), 8 * 1024, "config"),
}

FuzzFunction = Callable[[bytes], None]


class AcceptedInvalid(AssertionError):
    """The code under test accepted an input that the target's oracle finds invalid."""


def load(target: str) -> ModuleType:
    """The module of *target* (one of :data:`TARGETS`)."""
    if target not in TARGETS:
        raise ValueError(f"unknown fuzz target {target!r}; targets: {', '.join(TARGETS)}")
    return importlib.import_module(f"tests.fuzz.{target}")


def function(target: str) -> FuzzFunction:
    """The ``TestOneInput`` of *target*."""
    fn: FuzzFunction = load(target).TestOneInput
    return fn


def inputs(*, crashes: bool = True) -> list[Path]:
    """Every seed file of every target, and (with *crashes*) every reproducer in
    ``crashes/``; dot files (``.gitkeep``) are not inputs."""
    dirs = [CORPUS / t for t in TARGETS] + ([CRASHES] if crashes else [])
    return sorted(
        p for d in dirs if d.is_dir() for p in d.iterdir() if p.is_file() and p.name[0] != "."
    )


@contextlib.contextmanager
def quiet(*, cache: bool = False) -> Iterator[None]:
    """The gateway's structlog set-up (standard library loggers, as
    ``configure_logging`` makes it: the code asks them ``isEnabledFor``), with every line
    dropped, and no warnings: what the code under test logs reaches no output.  The
    previous set-up is restored after."""
    saved = structlog.get_config()
    disabled = logging.root.manager.disable
    structlog.configure(
        processors=[_drop],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=cache,
    )
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)
        structlog.configure(**saved)


def _drop(logger: object, method: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
    raise structlog.DropEvent
