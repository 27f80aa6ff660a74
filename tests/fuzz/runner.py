"""The fuzzing runner: each target under atheris, one process at a time, for a bounded time.

For each target, :func:`fuzz` starts :mod:`tests.fuzz.child` with libFuzzer's options: the
time left, the per-input timeout (an input running longer is a hang), a memory ceiling,
the longest input, the target's dictionary (``tests/fuzz/dicts/``), and two
corpus folders: ``var/fuzz/TARGET/corpus`` (kept between runs, where libFuzzer adds what
reaches new code; not committed) and the committed seeds ``tests/fuzz/corpus/TARGET``.  A
hang, a native crash or running out of memory ends that process; libFuzzer writes the input
and a new process carries on until the time is spent.

Figures per target: inputs tried, crashes, hangs, success responses to invalid input (the
three must be 0), and the kinds of finding behind them.  Each new reproducer is copied to
``tests/fuzz/crashes/TARGET-KIND-SHA1`` (``KIND``: crash, invalid, hang, oom), which the
replay test feeds to every target: it fails until the bug is fixed.  The tracebacks are in
``var/fuzz/TARGET/findings/TARGET.log``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fuzz import CORPUS, CRASHES, DICTS, HERE, TARGETS

REPO = HERE.parents[1]
WORK = REPO / "var" / "fuzz"

_EXECUTED = re.compile(r"stat::number_of_executed_units:\s*(\d+)")
_COVERAGE = re.compile(r"cov: (\d+) ft: (\d+)")
_SHA1 = re.compile(r"[0-9a-f]{40}")  # libFuzzer's artifacts: PREFIX + kind + "-" + SHA1
_ARTIFACTS = {"timeout": "hang", "oom": "oom", "crash": "crash", "leak": "crash"}
_LIBFUZZER_KINDS = ("hang", "oom")  # libFuzzer's native crashes share "crash" with ours


@dataclass
class Figures:
    target: str
    seconds: float = 0.0
    tried: int = 0
    crashes: int = 0
    hangs: int = 0
    invalid: int = 0
    processes: int = 0
    coverage: str = ""
    corpus: int = 0
    kinds: dict[str, dict[str, Any]] = field(default_factory=dict)
    reproducers: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return self.crashes == self.hangs == self.invalid == 0

    def line(self) -> str:
        return (
            f"{self.target:14} {self.seconds:6.0f} s {self.tried:>10,} inputs "
            f"{self.tried / max(self.seconds, 1):>7,.0f}/s   crashes {self.crashes}  "
            f"hangs {self.hangs}  invalid accepted {self.invalid}   "
            f"({self.coverage}, corpus {self.corpus})"
        )


def fuzz(target: str, seconds: float, *, timeout: int, rss_mb: int, quiet: bool) -> Figures:
    """Fuzz *target* for *seconds*; its figures."""
    spec = TARGETS[target]
    work = WORK / target
    corpus, findings = work / "corpus", work / "findings"
    for folder in (corpus, findings):
        folder.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in findings.iterdir()}
    figures = Figures(target)
    started = time.monotonic()
    while (left := seconds - (time.monotonic() - started)) >= 2:
        figures.processes += 1
        stats = work / f"stats-{figures.processes}.json"
        stats.unlink(missing_ok=True)
        command = [
            sys.executable, "-m", "tests.fuzz.child", target, str(findings), str(stats), "--",
            str(corpus), str(CORPUS / target),
            f"-max_total_time={int(left)}", f"-timeout={timeout}", f"-rss_limit_mb={rss_mb}",
            f"-max_len={spec.max_len}", "-print_final_stats=1",
            f"-artifact_prefix={findings}/{target}-",
        ]  # fmt: skip
        command.append(f"-dict={DICTS / f'{spec.dictionary}.dict'}")
        log = work / f"libfuzzer-{figures.processes}.log"
        with log.open("w") as out:
            proc = subprocess.run(
                command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                timeout=left + 4 * timeout + 120, check=False,
            )  # fmt: skip
        text = log.read_text(errors="replace")
        counted = _read_stats(stats)
        executed = [int(n) for n in _EXECUTED.findall(text)]
        figures.tried += max([counted.get("tried", 0), *executed])
        figures.crashes += counted.get("crashes", 0)
        figures.invalid += counted.get("invalid", 0)
        for signature, seen in counted.get("signatures", {}).items():
            kind = figures.kinds.setdefault(signature, {**seen, "count": 0})
            kind["count"] += seen["count"]
        if coverage := _COVERAGE.findall(text):
            figures.coverage = f"cov {coverage[-1][0]} ft {coverage[-1][1]}"
        ended = _ended_by(findings, target, before)
        if not quiet:
            print(f"  {target}: process {figures.processes} exited {proc.returncode}"
                  f"{' (' + ended + ')' if ended else ''}", flush=True)  # fmt: skip
        if ended:
            what = _ARTIFACTS[ended]
            figures.hangs += what == "hang"
            figures.crashes += what in ("crash", "oom")
            figures.kinds.setdefault(f"{what} (libFuzzer)", {"kind": what, "count": 0})
            figures.kinds[f"{what} (libFuzzer)"]["count"] += 1
        elif proc.returncode != 0:
            raise RuntimeError(f"the fuzzing process of {target} failed; see {log}:\n"
                               f"{text[-2000:]}")  # fmt: skip
        before |= _rename_artifacts(findings, target)
        if not ended:
            break
    figures.seconds = time.monotonic() - started
    figures.corpus = sum(1 for _ in corpus.iterdir())
    figures.reproducers = _copy_new(findings, target)
    return figures


def _read_stats(path: Path) -> dict[str, Any]:
    try:
        stats: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return stats


def _ended_by(findings: Path, target: str, before: set[str]) -> str | None:
    """What libFuzzer wrote when it ended the process (``timeout``, ``oom``, ``crash``)."""
    for path in findings.iterdir():
        for prefix in _ARTIFACTS:
            if (
                path.name not in before
                and _SHA1.fullmatch(path.name[len(f"{target}-{prefix}-") :])
                and path.name.startswith(f"{target}-{prefix}-")
            ):
                return prefix
    return None


def _rename_artifacts(findings: Path, target: str) -> set[str]:
    """libFuzzer's ``TARGET-timeout-SHA1`` and the like as ``TARGET-hang-SHA`` etc."""
    names = set()
    for path in list(findings.iterdir()):
        for prefix, kind in _ARTIFACTS.items():
            start = f"{target}-{prefix}-"
            if path.name.startswith(start) and _SHA1.fullmatch(path.name[len(start) :]):
                new = findings / f"{target}-{kind}-{path.name[len(start) :][:12]}"
                path.replace(new)
                path = new
        names.add(path.name)
    return names


def _copy_new(findings: Path, target: str) -> list[str]:
    """Copy reproducers not yet in ``tests/fuzz/crashes``; their names.  libFuzzer's
    (hangs, running out of memory, native crashes) have no signature: a few of each kind
    are enough to start from."""
    CRASHES.mkdir(exist_ok=True)
    copied: list[str] = []
    for path in sorted(findings.iterdir(), key=lambda p: p.stat().st_mtime):
        if not path.name.startswith(f"{target}-") or path.suffix == ".log":
            continue
        kind = path.name[len(target) + 1 :].split("-", 1)[0]
        if kind in _LIBFUZZER_KINDS and sum(f"-{kind}-" in n for n in copied) >= 3:
            continue
        if not (CRASHES / path.name).exists():
            shutil.copyfile(path, CRASHES / path.name)
            copied.append(path.name)
    return copied


def run(targets: list[str], seconds: float, *, timeout: int, rss_mb: int, quiet: bool) -> int:
    """Fuzz each target in turn; print the figures; 1 when any finding, else 0."""
    try:
        import atheris  # noqa: F401 (only to say how to get it)
    except ImportError:
        print("atheris is not installed: pip install -e '.[fuzz]' (or make fuzz)", file=sys.stderr)
        return 2
    results = []
    for target in targets:
        print(f"fuzzing {target} for {seconds:.0f} s", flush=True)
        figures = fuzz(target, seconds, timeout=timeout, rss_mb=rss_mb, quiet=quiet)
        results.append(figures)
        print(figures.line(), flush=True)
        for signature, seen in sorted(figures.kinds.items()):
            print(f"    {seen['count']:>6} x {signature}  [{seen.get('file', '')}]")
        for name in figures.reproducers:
            print(f"    new reproducer: tests/fuzz/crashes/{name}")
    print("\nfigures (each of crashes, hangs and invalid accepted must be 0):")
    for figures in results:
        print(figures.line())
    return 0 if all(f.clean for f in results) else 1
