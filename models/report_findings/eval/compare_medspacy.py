"""medspaCy (sectionizer + ConText) against the rule engine, on the same sets and scoring.

Not part of the gateway: medspaCy is not a dependency of the project.  Run it from a
throwaway virtual environment, from the repository root::

    python -m venv /tmp/medspacy-venv && /tmp/medspacy-venv/bin/pip install medspacy
    /tmp/medspacy-venv/bin/python models/report_findings/eval/compare_medspacy.py

medspaCy gets the engine's vocabulary, so what is compared is the machinery (sections,
ConText scopes) and not the word lists: every finding synonym of ``rules.json`` is a
``TargetRule`` (``*`` gaps as up to three optional tokens), its ``absent_phrases`` are
targets that are absent unless ConText marks them uncertain, its ``exclusions`` are
targets that are dropped.  Statuses: ConText ``is_negated`` -> absent, else
``is_uncertain`` or ``is_hypothetical`` -> uncertain, else present; ``is_historical``
is the historical flag.  The per-concept rule is the engine's (``RuleEngine.report``).

Two section set-ups are measured:

- ``default``: medspaCy's own English section rules, their categories mapped to the
  engine's kinds (see ``DEFAULT_KINDS``);
- ``engine-headers``: the engine's header names (rules.json ``sections``) as section
  rules, each name with a colon and in three spellings (as listed, Title, CAPITALS).

and two ConText rule sets: medspaCy's ``default`` English rules, and ``engine``: the
engine's own triggers (negation, uncertainty, historical, pseudo, termination) as
ConText rules with the engine's windows.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import medspacy  # noqa: E402
from loguru import logger  # noqa: E402  (PyRuSH logs every sentence at DEBUG)
from medspacy.context import ConTextRule  # noqa: E402
from medspacy.ner import TargetRule  # noqa: E402
from medspacy.section_detection import SectionRule  # noqa: E402

from models.report_findings.engine import load  # noqa: E402
from models.report_findings.evaluate import (  # noqa: E402
    DEV,
    DEV_REPORTS,
    HELD_OUT,
    Counts,
    Report,
    _score,
    format_table,
    labels_of,
    read_set,
)

RULES = json.loads((ROOT / "models" / "report_findings" / "rules.json").read_text())
SECTION_RANK = {"body": 1, "impression": 2, "addendum": 2}
STATUS_RANK = {"present": 3, "uncertain": 2, "absent": 1}

# medspaCy 1.3 English section categories -> the engine's kinds (anything else: body)
DEFAULT_KINDS = {
    "history_of_present_illness": "context",
    "past_medical_history": "context",
    "reason_for_examination": "context",
    "chief_complaint": "context",
    "family_history": "context",
    "social_history": "context",
    "medications": "context",
    "allergies": "context",
    "allergy": "context",
    "imaging": "context",  # TECHNIQUE:, INTERPRETATION:, IMAGING: ...
    "observation_and_plan": "impression",  # IMPRESSION:, ASSESSMENT:, ...
    "diagnoses": "impression",
    "addendum": "addendum",
}


def _pattern(phrase: str) -> list[dict[str, Any]] | None:
    """A spaCy token pattern for a phrase with ``*`` gaps; None for a plain phrase."""
    if "*" not in phrase:
        return None
    out: list[dict[str, Any]] = []
    for k, part in enumerate(phrase.split("*")):
        if k:
            out += [{"IS_ALPHA": True, "OP": "?"}] * 3
        out += [{"LOWER": w} for w in part.split()]
    return out


def _context_rules() -> list[Any]:
    """The engine's triggers as ConText rules (same windows: 8 forward, 6 back)."""
    triggers = RULES["triggers"]
    out = []
    for category, kind in (
        ("negation", "NEGATED_EXISTENCE"),
        ("uncertainty", "POSSIBLE_EXISTENCE"),
        ("historical", "HISTORICAL"),
    ):
        pre, post = set(triggers[category]["pre"]), set(triggers[category]["post"])
        for phrase in sorted(pre | post):
            if phrase in pre and phrase in post:
                direction, scope = "BIDIRECTIONAL", 8
            elif phrase in pre:
                direction, scope = "FORWARD", 8
            else:
                direction, scope = "BACKWARD", 6
            out.append(ConTextRule(phrase, kind, direction=direction, max_scope=scope))
    out += [ConTextRule(p, "PSEUDO", direction="PSEUDO") for p in triggers["pseudo"]]
    out += [ConTextRule(p, "TERMINATE", direction="TERMINATE") for p in triggers["termination"]]
    return out


def build(sections: str, context: str = "default") -> Any:
    nlp = medspacy.load(
        medspacy_enable=[
            "medspacy_pyrush",
            "medspacy_target_matcher",
            "medspacy_context",
            "medspacy_sectionizer",
        ]
    )
    targets = []
    for finding, spec in RULES["findings"].items():
        for kind in ("synonyms", "absent_phrases", "exclusions"):
            for phrase in spec.get(kind, ()):
                label = finding if kind == "synonyms" else f"{finding}|{kind}"
                targets.append(TargetRule(phrase, label, pattern=_pattern(phrase)))
    nlp.get_pipe("medspacy_target_matcher").add(targets)
    if context == "engine":
        nlp.remove_pipe("medspacy_context")
        nlp.add_pipe("medspacy_context", config={"rules": None}, after="medspacy_target_matcher")
        nlp.get_pipe("medspacy_context").add(_context_rules())
    sectionizer = nlp.get_pipe("medspacy_sectionizer")
    if sections == "engine-headers":
        nlp.remove_pipe("medspacy_sectionizer")
        sectionizer = nlp.add_pipe("medspacy_sectionizer", config={"rules": None}, last=True)
        rules = []
        for kind, names in RULES["sections"].items():
            if kind == "line_start_only":
                continue
            for name in names:
                for spelling in {name, name.title(), name.upper()}:
                    rules.append(SectionRule(f"{spelling}:", kind))
        sectionizer.add(rules)
    return nlp


def mentions(nlp: Any, text: str, sections: str) -> list[tuple[str, str, str, bool]]:
    """(finding, status, section kind, historical) per target, in text order."""
    doc = nlp(text)
    out = []
    for ent in doc.ents:
        finding, _, kind = ent.label_.partition("|")
        if kind == "exclusions":
            continue
        if kind == "absent_phrases":
            status = "uncertain" if ent._.is_uncertain else "absent"
        elif ent._.is_negated:
            status = "absent"
        elif ent._.is_uncertain or ent._.is_hypothetical:
            status = "uncertain"
        else:
            status = "present"
        category = ent._.section_category
        if category is None:
            section = "body"
        elif sections == "default":
            section = DEFAULT_KINDS.get(category, "body")
        else:
            section = category
        out.append((finding, status, section, bool(ent._.is_historical)))
    return out


def report_statuses(found: list[tuple[str, str, str, bool]]) -> set[tuple[str, str]]:
    by: dict[str, list[tuple[str, str, str, bool]]] = {}
    for m in found:
        if m[2] != "context":
            by.setdefault(m[0], []).append(m)
    out = set()
    for finding, ms in by.items():
        top = max(SECTION_RANK[m[2]] for m in ms)
        deciding = [m for m in ms if SECTION_RANK[m[2]] == top]
        current = [m for m in deciding if not m[3]] or deciding
        out.add((finding, max((m[1] for m in current), key=STATUS_RANK.__getitem__)))
    return out


def main() -> int:
    logger.remove()
    engine = load()
    reports = read_set(DEV_REPORTS)
    setups = [("default", "default"), ("engine-headers", "default"), ("engine-headers", "engine")]
    for sections, context in setups:
        nlp = build(sections, context)
        scores = Report()
        for item in reports:
            predicted = report_statuses(mentions(nlp, item["text"], sections))
            _score(scores, engine, item, predicted)
            scores.by_style.setdefault(item["style"], Counts()).add(predicted, labels_of(item))
        print(
            f"== medspaCy {medspacy.__version__}, sections: {sections}, ConText rules: "
            f"{context}: dev reports"
        )
        print(format_table(scores, "reports"))
        for ident, _, expected, predicted in scores.errors:
            print(
                f"  {ident}: missing {sorted(set(expected) - set(predicted))}, "
                f"extra {sorted(set(predicted) - set(expected))}"
            )
        print()
    for context in ("default", "engine"):
        nlp = build("engine-headers", context)
        for name, path in (("held-out sentences", HELD_OUT), ("dev sentences", DEV)):
            scores = Report()
            for item in read_set(path):
                found = mentions(nlp, item["text"], "engine-headers")
                _score(scores, engine, item, {(f, s) for f, s, _, _ in found})
            print(f"== medspaCy ConText ({context} rules), per mention: {name}")
            print("\n".join(format_table(scores).splitlines()[:12]))
            print()
    texts = [item["text"] for item in reports] * 20
    t0 = time.perf_counter()
    for text in texts:
        nlp(text)
    medspacy_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for text in texts:
        engine.report(text)
    engine_s = time.perf_counter() - t0
    words = sum(len(t.split()) for t in texts) / len(texts)
    print(f"speed, {len(texts)} reports of {words:.0f} words on average, one core:")
    print(f"  medspaCy {len(texts) / medspacy_s:8.0f} reports/s")
    print(f"  engine   {len(texts) / engine_s:8.0f} reports/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
