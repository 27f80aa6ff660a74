"""Measure the rule model on a labelled sentence set or a set of whole reports.

    python -m models.report_findings.evaluate                 # the held-out sentences
    python -m models.report_findings.evaluate eval/dev.jsonl  # the development sentences
    python -m models.report_findings.evaluate --errors        # also list the mistakes
    python -m models.report_findings.evaluate --reports eval/dev_reports.jsonl
    python -m models.report_findings.evaluate --reports PATH --per-mention   # the old way

A sentence set has lines ``{"id", "text", "labels": [[finding, status], ...]}``; per
sentence the distinct (finding, status) pairs of the model's mentions are compared with
the labels as sets.

A report set has lines ``{"id", "style", "text", "labels": [{"finding", "status"}, ...]}``
with the report's gold findings, one per concept (the impression's status where the
impression names it; concepts named only in the history / indication / comparison left
out).  Per report the model's report-level findings (:meth:`RuleEngine.report`) are
compared with the labels as sets; ``--per-mention`` scores instead the distinct pairs of
all its mentions, whatever their section (what the gateway sent before rules 1.1.0).

Reported:

- (finding, status) micro precision / recall / F1 over all sentences: the headline;
- per finding: detection (the finding mentioned, whatever its status) and
  (finding, status) scores;
- per status (present / absent / uncertain): the (finding, status) pairs with that status,
  so the ``absent`` row is the negation score.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python models/report_findings/evaluate.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from models.report_findings.engine import STATUSES, RuleEngine, load

HERE = Path(__file__).resolve().parent
HELD_OUT = HERE / "eval" / "sentences.jsonl"
DEV = HERE / "eval" / "dev.jsonl"
DEV_REPORTS = HERE / "eval" / "dev_reports.jsonl"

Pair = tuple[str, str]


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, predicted: set[Any], expected: set[Any]) -> None:
        self.tp += len(predicted & expected)
        self.fp += len(predicted - expected)
        self.fn += len(expected - predicted)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def support(self) -> int:
        return self.tp + self.fn


@dataclass
class Report:
    sentences: int = 0  # items scored: sentences, or reports with --reports
    overall: Counts = field(default_factory=Counts)
    detection: Counts = field(default_factory=Counts)
    by_finding: dict[str, Counts] = field(default_factory=dict)
    detection_by_finding: dict[str, Counts] = field(default_factory=dict)
    by_status: dict[str, Counts] = field(default_factory=dict)
    by_style: dict[str, Counts] = field(default_factory=dict)  # report sets only
    errors: list[tuple[str, str, list[Pair], list[Pair]]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        def row(c: Counts) -> dict[str, float | int]:
            return {
                "precision": round(c.precision, 4),
                "recall": round(c.recall, 4),
                "f1": round(c.f1, 4),
                "support": c.support,
            }

        return {
            "sentences": self.sentences,
            "overall": row(self.overall),
            "detection": row(self.detection),
            "by_finding": {k: row(v) for k, v in sorted(self.by_finding.items())},
            "detection_by_finding": {
                k: row(v) for k, v in sorted(self.detection_by_finding.items())
            },
            "by_status": {k: row(self.by_status[k]) for k in STATUSES if k in self.by_status},
            "by_style": {k: row(v) for k, v in sorted(self.by_style.items())},
        }


def read_set(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def labels_of(item: dict[str, Any]) -> set[Pair]:
    """An item's gold (finding, status) pairs: ``[f, s]`` lists or ``{"finding", "status"}``."""
    out: set[Pair] = set()
    for label in item["labels"]:
        if isinstance(label, dict):
            out.add((label["finding"], label["status"]))
        else:
            finding, status = label
            out.add((finding, status))
    return out


def evaluate(engine: RuleEngine, items: Iterable[dict[str, Any]]) -> Report:
    """Sentence-level: every mention counts, whatever its section."""
    report = Report()
    for item in items:
        _score(report, engine, item, engine.statuses(item["text"]))
    return report


def evaluate_reports(
    engine: RuleEngine, items: Iterable[dict[str, Any]], *, per_mention: bool = False
) -> Report:
    """Report-level: each concept once per report (:meth:`RuleEngine.report`)."""
    report = Report()
    for item in items:
        text = item["text"]
        predicted = engine.statuses(text) if per_mention else engine.report(text).statuses()
        _score(report, engine, item, predicted)
        expected = labels_of(item)
        report.by_style.setdefault(str(item.get("style", "")), Counts()).add(predicted, expected)
    return report


def _score(report: Report, engine: RuleEngine, item: dict[str, Any], predicted: set[Pair]) -> None:
    findings = set(engine.findings)
    expected = labels_of(item)
    report.sentences += 1
    report.overall.add(predicted, expected)
    report.detection.add({f for f, _ in predicted}, {f for f, _ in expected})
    for name in findings:
        p = {x for x in predicted if x[0] == name}
        e = {x for x in expected if x[0] == name}
        if p or e:
            report.by_finding.setdefault(name, Counts()).add(p, e)
            report.detection_by_finding.setdefault(name, Counts()).add(
                {name} if p else set(), {name} if e else set()
            )
    for status in STATUSES:
        p = {x for x in predicted if x[1] == status}
        e = {x for x in expected if x[1] == status}
        report.by_status.setdefault(status, Counts()).add(p, e)
    if predicted != expected:
        report.errors.append((item["id"], item["text"], sorted(expected), sorted(predicted)))


def format_table(report: Report, what: str = "sentences") -> str:
    lines = [f"{report.sentences} {what}", ""]
    header = f"{'':<22}{'P':>7}{'R':>7}{'F1':>7}{'n':>6}"
    rule = "-" * len(header)

    def row(name: str, c: Counts) -> str:
        return f"{name:<22}{c.precision:>7.3f}{c.recall:>7.3f}{c.f1:>7.3f}{c.support:>6}"

    lines += ["(finding, status), micro", header, rule, row("all", report.overall)]
    lines += ["", "by status (absent = negation)", header, rule]
    lines += [row(s, report.by_status[s]) for s in STATUSES if s in report.by_status]
    lines += ["", "by finding: (finding, status)", header, rule]
    lines += [row(k, v) for k, v in sorted(report.by_finding.items())]
    lines += ["", "by finding: detection (status ignored)", header, rule]
    lines += [row(k, v) for k, v in sorted(report.detection_by_finding.items())]
    lines += [row("all", report.detection)]
    if report.by_style:
        lines += ["", "by report style: (finding, status)", header, rule]
        lines += [row(k, v) for k, v in sorted(report.by_style.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("set", nargs="?", default=str(HELD_OUT), help="a .jsonl sentence set")
    parser.add_argument("--bundle", default=str(HERE), help="the bundle folder")
    parser.add_argument("--errors", action="store_true", help="list the sentences it gets wrong")
    parser.add_argument("--json", action="store_true", help="print the scores as JSON")
    parser.add_argument(
        "--reports", metavar="PATH", help="score a .jsonl set of whole reports instead"
    )
    parser.add_argument(
        "--per-mention",
        action="store_true",
        help="with --reports: score every mention's pair, sections ignored (the old output)",
    )
    args = parser.parse_args(argv)
    engine = load(args.bundle)
    what = "reports" if args.reports else "sentences"
    if args.reports:
        report = evaluate_reports(engine, read_set(args.reports), per_mention=args.per_mention)
    else:
        report = evaluate(engine, read_set(args.set))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(f"rules sha256 {engine.rules_sha256}")
        print(format_table(report, what))
    if args.errors:
        print(f"\n{len(report.errors)} {what} with a difference:")
        for ident, text, expected, predicted in report.errors:
            print(f"{ident}: {text}\n    expected  {expected}\n    predicted {predicted}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
