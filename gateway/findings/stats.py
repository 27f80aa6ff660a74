"""What the findings store says in aggregate: how often each model flags (by month, model
version and modality), how its probabilities are spread (a drift after a model update
shows as a changed histogram), and its concordance with the reports."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gateway.findings.concordance import Comparison, Summary, compare, summarise
from gateway.store.findings import ModelRun

BINS = 10


@dataclass(frozen=True)
class Prevalence:
    month: str  # YYYY-MM (UTC) of the runs
    model: str
    version: str
    modality: str
    runs: int
    positive: int  # runs with at least one finding present

    @property
    def rate(self) -> float:
        return self.positive / self.runs if self.runs else 0.0


@dataclass(frozen=True)
class Histogram:
    model: str
    version: str
    counts: tuple[int, ...]  # findings with a probability in [i/BINS, (i+1)/BINS), the last closed
    findings: int  # with a probability

    @property
    def edges(self) -> tuple[float, ...]:
        return tuple(i / len(self.counts) for i in range(len(self.counts) + 1))


@dataclass(frozen=True)
class Stats:
    prevalence: list[Prevalence]
    histograms: list[Histogram]
    concordance: list[Summary]
    comparisons: list[Comparison]  # what the concordance sums up, one per study and concept


def month_of(when: float) -> str:
    return dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m")


def prevalence(runs: Iterable[ModelRun]) -> list[Prevalence]:
    table: dict[tuple[str, str, str, str], list[int]] = {}
    for run in runs:
        key = (month_of(run.inferred_at), run.model, run.model_version, run.modality)
        row = table.setdefault(key, [0, 0])
        row[0] += 1
        row[1] += int(run.positive)
    return [Prevalence(*key, runs=n, positive=p) for key, (n, p) in sorted(table.items())]


def histograms(runs: Iterable[ModelRun], bins: int = BINS) -> list[Histogram]:
    table: dict[tuple[str, str], list[int]] = {}
    for run in runs:
        for f in run.findings:
            if f.probability is None:
                continue
            row = table.setdefault((run.model, run.model_version), [0] * bins)
            row[min(bins - 1, max(0, int(f.probability * bins)))] += 1
    return [
        Histogram(model, version, tuple(counts), sum(counts))
        for (model, version), counts in sorted(table.items())
    ]


def stats(runs: Sequence[ModelRun]) -> Stats:
    comparisons = compare(runs)
    return Stats(prevalence(runs), histograms(runs), summarise(comparisons), comparisons)
