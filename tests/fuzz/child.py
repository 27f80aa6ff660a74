"""One fuzzing process: a target under atheris (``python -m tests.fuzz.child``), started by
:mod:`tests.fuzz.runner`, which reads what it leaves behind.

    python -m tests.fuzz.child TARGET FINDINGS_DIR STATS_FILE -- LIBFUZZER_ARGS...

The target runs inside a wrapper that counts the inputs and keeps going after a finding:
an input whose target raises :class:`~tests.fuzz.AcceptedInvalid` is a success response to
invalid input, any other exception a crash.  The first input of each kind of finding (its
signature: kind, exception type, where it was raised, an oracle's message) is written to
``FINDINGS_DIR/TARGET-KIND-SHA1``, its traceback to ``FINDINGS_DIR/TARGET.log``, and the
signature to ``FINDINGS_DIR/TARGET.signatures.json`` (so that the processes that follow a
hang do not write it again).
Hangs (an input running past libFuzzer's ``-timeout``) and native crashes end the process;
libFuzzer writes those inputs (``-artifact_prefix``) and the runner starts another one.
``STATS_FILE`` (JSON) is rewritten every second and after each finding.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fuzz import TARGETS, AcceptedInvalid, function, quiet

_NUMBERS = re.compile(
    r"\([0-9A-F]{4},[0-9A-F]{4}\)|b?'[^']*'|\"[^\"]*\"|#x[0-9A-Fa-f]+|0x[0-9A-Fa-f]+|\d+"
)


@dataclass
class Stats:
    target: str
    findings: Path
    path: Path
    tried: int = 0
    crashes: int = 0
    invalid: int = 0
    signatures: dict[str, dict[str, Any]] = field(default_factory=dict)
    _flushed: float = 0.0

    def record(self, kind: str, data: bytes, exc: BaseException) -> None:
        if kind == "invalid":
            self.invalid += 1
        else:
            self.crashes += 1
        signature = _signature(kind, exc)
        seen = self.signatures.get(signature)
        if seen is not None:
            seen["count"] += 1
            return
        known = self._known()  # found by an earlier process of this run: its reproducer
        name = known.get(signature) or f"{self.target}-{kind}-{hashlib.sha1(data).hexdigest()[:12]}"
        if signature not in known:
            (self.findings / name).write_bytes(data)
            with (self.findings / f"{self.target}.log").open("a") as log:
                log.write(f"=== {name}: {signature}\n")
                log.write("".join(traceback.format_exception(exc)))
            known[signature] = name
            (self.findings / f"{self.target}.signatures.json").write_text(json.dumps(known))
        self.signatures[signature] = {"kind": kind, "count": 1, "file": name}
        self.flush()

    def _known(self) -> dict[str, str]:
        """Signature -> reproducer of the findings already written to FINDINGS_DIR."""
        try:
            known: dict[str, str] = json.loads(
                (self.findings / f"{self.target}.signatures.json").read_text()
            )
        except (OSError, ValueError):
            return {}
        return known

    def flush(self) -> None:
        self._flushed = time.monotonic()
        body = {
            "tried": self.tried,
            "crashes": self.crashes,
            "invalid": self.invalid,
            "signatures": self.signatures,
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body))
        tmp.replace(self.path)

    def tick(self) -> None:
        self.tried += 1
        if self.tried % 256 == 0 and time.monotonic() - self._flushed > 1.0:
            self.flush()


def _signature(kind: str, exc: BaseException) -> str:
    """Kind, exception type, the innermost frame of the gateway (else the innermost one),
    and for an oracle's finding its message, with numbers and quoted values taken out."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/gateway/" in f.filename] or frames
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
    if not isinstance(exc, AssertionError):  # the code's own exception: where it was raised
        return f"{kind} {type(exc).__name__} at {where}"
    gist = _NUMBERS.sub("_", str(exc).split("\n", 1)[0])[:80]  # an oracle's: what it says
    return f"{kind} {type(exc).__name__} at {where}: {gist}"


def main(argv: list[str]) -> None:
    import atheris  # the fuzz extra: only this process needs it

    target, findings, stats_file = argv[1], Path(argv[2]), Path(argv[3])
    libfuzzer = argv[argv.index("--") + 1 :] if "--" in argv else []
    with atheris.instrument_imports(include=list(TARGETS[target].instrument)):
        fn = function(target)
    stats = Stats(target, findings, stats_file)
    stats.flush()

    def one(data: bytes) -> None:
        stats.tick()
        try:
            fn(data)
        except AcceptedInvalid as exc:
            stats.record("invalid", data, exc)
        except Exception as exc:
            stats.record("crash", data, exc)

    atheris.Setup([argv[0], *libfuzzer], one)
    try:
        with quiet(cache=True):
            atheris.Fuzz()
    finally:
        stats.flush()


if __name__ == "__main__":
    main(sys.argv)
