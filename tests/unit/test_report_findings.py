"""The reference note model: findings with negation and uncertainty from report text."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from gateway.infer.text import report_text_from_hl7
from models.report_findings.engine import RuleEngine, load, split_sentences, tokenize
from models.report_findings.evaluate import (
    DEV,
    DEV_REPORTS,
    HELD_OUT,
    evaluate,
    evaluate_reports,
    labels_of,
    read_set,
)
from tests.hl7msgs import oru_r01

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "report_findings"

# The held-out scores README.md reports (rules 1.0.0); the test fails on a regression.
REPORTED_F1 = 0.979
REPORTED_NEGATION_F1 = 0.982
REPORTED_UNCERTAINTY_F1 = 0.977


@pytest.fixture(scope="module")
def engine() -> RuleEngine:
    return load()


def statuses(engine: RuleEngine, text: str) -> set[tuple[str, str]]:
    return engine.statuses(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("No pneumothorax.", {("pneumothorax", "absent")}),
        ("Without pleural effusion.", {("pleural_effusion", "absent")}),
        ("Negative for pulmonary embolism.", {("pulmonary_embolism", "absent")}),
        ("Free of pneumothorax after thoracentesis.", {("pneumothorax", "absent")}),
        ("There is no evidence of acute hemorrhage.", {("haemorrhage", "absent")}),
        ("Pneumothorax has been ruled out.", {("pneumothorax", "absent")}),
        ("The right pneumothorax has resolved.", {("pneumothorax", "absent")}),
        ("The 5 mm nodule is no longer seen.", {("nodule", "absent")}),
        ("Pulmonary nodules: none.", {("nodule", "absent")}),
        (
            "No focal consolidation, pleural effusion, or pneumothorax.",
            {("consolidation", "absent"), ("pleural_effusion", "absent"),
             ("pneumothorax", "absent")},
        ),
    ],
)
def test_negation(engine: RuleEngine, text: str, expected: set[tuple[str, str]]) -> None:
    assert statuses(engine, text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Possible small left effusion.", {("pleural_effusion", "uncertain")}),
        ("Findings suspicious for a small pneumothorax.", {("pneumothorax", "uncertain")}),
        ("A small subsegmental PE cannot be excluded.", {("pulmonary_embolism", "uncertain")}),
        ("Opacity may represent early consolidation.", {("consolidation", "uncertain")}),
        ("Indication: ? pneumothorax after line placement.", {("pneumothorax", "uncertain")}),
        ("Is there a fracture?", {("fracture", "uncertain")}),
        ("Rule out PE.", {("pulmonary_embolism", "uncertain")}),
        ("Atelectasis versus consolidation.", {("consolidation", "uncertain")}),
        ("Hemorrhage is unlikely.", {("haemorrhage", "uncertain")}),
    ],
)
def test_uncertainty(engine: RuleEngine, text: str, expected: set[tuple[str, str]]) -> None:
    assert statuses(engine, text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "No pneumothorax, but there is a small right pleural effusion.",
            {("pneumothorax", "absent"), ("pleural_effusion", "present")},
        ),
        (
            "No consolidation; however, a small effusion is present.",
            {("consolidation", "absent"), ("pleural_effusion", "present")},
        ),
        (
            "No effusion; small left pneumothorax.",
            {("pleural_effusion", "absent"), ("pneumothorax", "present")},
        ),
        (
            "No pneumothorax, small right effusion.",
            {("pneumothorax", "absent"), ("pleural_effusion", "present")},
        ),
        (
            "No definite fracture, although a scaphoid fracture cannot be excluded.",
            {("fracture", "absent"), ("fracture", "uncertain")},
        ),
        (
            "No pneumothorax. Small effusion.",
            {("pneumothorax", "absent"), ("pleural_effusion", "present")},
        ),
    ],
)
def test_termination(engine: RuleEngine, text: str, expected: set[tuple[str, str]]) -> None:
    assert statuses(engine, text) == expected


def test_plurals_abbreviations_and_variants(engine: RuleEngine) -> None:
    assert statuses(engine, "Small bilateral pneumothoraces.") == {("pneumothorax", "present")}
    assert statuses(engine, "Multiple pulmonary nodules.") == {("nodule", "present")}
    assert statuses(engine, "Bilateral pleural effusions.") == {("pleural_effusion", "present")}
    assert statuses(engine, "Rib fractures.") == {("fracture", "present")}
    assert statuses(engine, "No PTX.") == {("pneumothorax", "absent")}
    assert statuses(engine, "Fx of the tibia.") == {("fracture", "present")}
    assert statuses(engine, "Acute subdural haematoma.") == {("haemorrhage", "present")}
    assert statuses(engine, "Mediastinal ADENOPATHY.") == {("lymphadenopathy", "present")}
    assert statuses(engine, "The heart is mildly enlarged.") == {("cardiomegaly", "present")}
    assert statuses(engine, "Heart size is normal.") == {("cardiomegaly", "absent")}
    assert statuses(engine, "Heart is not enlarged.") == {("cardiomegaly", "absent")}


def test_whole_words_and_exclusions(engine: RuleEngine) -> None:
    assert statuses(engine, "Nodular opacity.") == set()
    assert statuses(engine, "Lymph nodes are normal in size.") == {("lymphadenopathy", "absent")}
    assert statuses(engine, "Mild mass effect on the ventricle.") == set()
    assert statuses(engine, "Mass-like opacity in the hilum.") == set()
    assert statuses(engine, "Small pericardial effusion.") == set()
    assert statuses(engine, "Right knee joint effusion.") == set()
    assert statuses(engine, "Septic emboli in both lungs.") == set()
    assert statuses(engine, "Pipe and pexy.") == set()


def test_pseudo_negations_do_not_negate(engine: RuleEngine) -> None:
    assert statuses(engine, "No change in the right pleural effusion.") == {
        ("pleural_effusion", "present")
    }
    assert statuses(engine, "No significant change in size of the nodule.") == {
        ("nodule", "present")
    }
    assert statuses(engine, "The consolidation has improved but not resolved.") == {
        ("consolidation", "present")
    }


FIXED_REPORTS = {
    "chest_ct": (
        "FINDINGS:\nNo pulmonary embolism. There is a 7 mm solid nodule in the right upper "
        "lobe. Small left pleural effusion; no pneumothorax.\nThe heart size is normal. "
        "Enlarged subcarinal lymph node, possibly reactive.\nIMPRESSION: Possible early "
        "consolidation in the left lower lobe.",
        [
            ("pulmonary_embolism", "absent", "59282003", 13, 31, 1),
            ("nodule", "present", "27925004", 55, 61, 2),
            ("pleural_effusion", "present", "60046008", 98, 114, 3),
            ("pneumothorax", "absent", "36118008", 119, 131, 3),
            ("cardiomegaly", "absent", "8186001", 137, 157, 4),
            ("lymphadenopathy", "present", "30746006", 159, 189, 5),
            ("consolidation", "uncertain", "95436008", 237, 250, 6),
        ],
    ),
    "trauma": (
        "Acute nondisplaced fractures of the left 7th and 8th ribs without pneumothorax. "
        "No intracranial hemorrhage. Subtle lucency in the right scaphoid, a fracture cannot "
        "be excluded.",
        [
            ("fracture", "present", "125605004", 19, 28, 0),
            ("pneumothorax", "absent", "36118008", 66, 78, 0),
            ("haemorrhage", "absent", "50960005", 96, 106, 1),
            ("fracture", "uncertain", "125605004", 148, 156, 2),
        ],
    ),
    "follow_up": (
        "The previously seen right pneumothorax has resolved. No change in the moderate "
        "cardiomegaly. Mass effect from the known left frontal mass is stable. "
        "No pericardial effusion.",
        [
            ("pneumothorax", "absent", "36118008", 26, 38, 0),
            ("cardiomegaly", "present", "8186001", 79, 91, 1),
            ("mass", "present", "4147007", 133, 137, 2),
        ],
    ),
    "normal": ("Lungs are clear. No acute osseous abnormality.", []),
}


@pytest.mark.parametrize("name", sorted(FIXED_REPORTS))
def test_fixed_reports_give_exactly_the_expected_mentions(engine: RuleEngine, name: str) -> None:
    text, expected = FIXED_REPORTS[name]
    found = [m.to_dict() for m in engine.mentions(text)]
    got = [
        (f["finding"], f["status"], f["code"], f["text_span"][0], f["text_span"][1],
         f["sentence"])
        for f in found
    ]
    assert got == expected
    for f in found:
        start, end = f["text_span"]
        assert f["text"] == text[start:end]
        assert f["meaning"]


def test_output_is_deterministic(engine: RuleEngine) -> None:
    text = FIXED_REPORTS["chest_ct"][0]
    assert engine(text) == engine(text) == load()(text)


def test_report_from_an_hl7_message(engine: RuleEngine) -> None:
    msg = oru_r01(text=r"No pneumothorax.\.br\Small right pleural effusion\F\ stable.")
    assert statuses(engine, report_text_from_hl7(msg)) == {
        ("pneumothorax", "absent"), ("pleural_effusion", "present")
    }


def test_sentences_and_tokens() -> None:
    text = "A 4.5 mm nodule vs. scar. No effusion?\nIMPRESSION: 1. Normal."
    assert [text[a:b] for a, b in split_sentences(text)] == [
        "A 4.5 mm nodule vs. scar.", "No effusion?", "IMPRESSION: 1.", "Normal.",
    ]
    assert [t.text for t in tokenize("s/p ORIF; can\u2019t exclude ?PE,")] == [
        "s", "p", "orif", ";", "can't", "exclude", "?", "pe", ",",
    ]


def test_rules_hash_is_the_model_identity(engine: RuleEngine) -> None:
    data = (BUNDLE / "rules.json").read_bytes()
    assert engine.rules_sha256 == hashlib.sha256(data).hexdigest()


def test_bundle_metadata_codes_every_finding() -> None:
    metadata = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    rules = json.loads((BUNDLE / "rules.json").read_text())
    section = metadata["gateway"]
    assert (section["input"], section["engine"], section["rules"]) == (
        "text", "rules", "rules.json"
    )
    assert set(section["findings"]) == set(rules["findings"])
    for code in section["findings"].values():
        assert code["snomed"].isdigit() and code["meaning"]
    assert metadata["name"] == "report_findings" and metadata["version"]


def test_bundle_loads_with_monai_config_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = pytest.importorskip("monai.bundle")
    monkeypatch.syspath_prepend(str(BUNDLE))
    parser = bundle.ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser["bundle_root"] = str(BUNDLE)
    parser["text"] = "No pneumothorax."
    findings = parser.get_parsed_content("run")
    assert [(f["finding"], f["status"]) for f in findings] == [("pneumothorax", "absent")]


def test_eval_sets_are_well_formed(engine: RuleEngine) -> None:
    held_out, dev = read_set(HELD_OUT), read_set(DEV)
    assert len(held_out) >= 200
    assert {i["text"] for i in held_out}.isdisjoint(i["text"] for i in dev)
    for item in held_out + dev:
        for finding, status in item["labels"]:
            assert finding in engine.findings
            assert status in ("present", "absent", "uncertain")


def test_held_out_scores_do_not_regress(engine: RuleEngine) -> None:
    report = evaluate(engine, read_set(HELD_OUT))
    assert report.overall.f1 >= REPORTED_F1 - 0.01
    assert report.by_status["absent"].f1 >= REPORTED_NEGATION_F1 - 0.01
    assert report.by_status["uncertain"].f1 >= REPORTED_UNCERTAINTY_F1 - 0.01


def test_held_out_reports_meet_the_target_and_do_not_regress(engine: RuleEngine) -> None:
    """163 whole reports written apart from the rules (eval/REPORTS.md): the issue's
    target is P and R >= 0.95 on (finding, status); measured 0.993 / 0.989 with rules
    1.1.0 (models/report_findings/README.md)."""
    report = evaluate_reports(engine, read_set(HELD_OUT.parent / "reports.jsonl"))
    assert report.overall.support == 441
    assert report.overall.precision >= 0.993 - 0.01
    assert report.overall.recall >= 0.989 - 0.01


def test_dev_set_is_right(engine: RuleEngine) -> None:
    assert evaluate(engine, read_set(DEV)).errors == []


# -- whole reports: sections, one finding per concept ----------------------------------


def findings_of(engine: RuleEngine, text: str) -> dict[str, str]:
    """The report-level findings, finding -> status (each concept once)."""
    found = engine(text)
    names = [f["finding"] for f in found]
    assert len(names) == len(set(names)), found
    return {f["finding"]: f["status"] for f in found}


@pytest.mark.parametrize(
    ("text", "indication"),
    [
        (
            "CLINICAL HISTORY: Chest pain. Evaluate for pulmonary embolism.\n"
            "FINDINGS: The lungs are clear.\nIMPRESSION: No acute abnormality.",
            {("pulmonary_embolism", "uncertain")},
        ),
        (
            "INDICATION: Rule out pneumothorax after line placement.\n"
            "FINDINGS: Right IJ line tip in the SVC.",
            {("pneumothorax", "uncertain")},
        ),
        (
            "Reason for exam: Follow-up of lung nodule.\nFindings: Emphysema.\n"
            "Impression: Emphysema.",
            {("nodule", "present")},
        ),
        (
            "Clinical details: ?fracture ?haemorrhage\nReport: Normal appearances.",
            {("fracture", "uncertain"), ("haemorrhage", "uncertain")},
        ),
        (
            "TECHNIQUE: CT pulmonary angiogram, PE protocol.\n"
            "COMPARISON: CT of 2025 which showed mediastinal lymphadenopathy.\n"
            "FINDINGS: Clear lungs.",
            {("pulmonary_embolism", "present"), ("lymphadenopathy", "present")},
        ),
        (  # the title and history before any header: context, as there is a FINDINGS
            "CT CHEST FOR PULMONARY EMBOLISM\nFINDINGS:\nNo acute abnormality.",
            {("pulmonary_embolism", "present")},
        ),
    ],
)
def test_indication_mentions_are_not_findings(
    engine: RuleEngine, text: str, indication: set[tuple[str, str]]
) -> None:
    result = engine.report(text)
    assert result.findings == ()
    assert engine(text) == []
    assert {(m.finding, m.status) for m in result.indication} == indication
    assert all(m.section == "context" for m in result.indication)


def test_indication_and_finding_of_the_same_concept(engine: RuleEngine) -> None:
    text = (
        "INDICATION: Evaluate for pulmonary embolism.\n"
        "FINDINGS: Acute pulmonary emboli in the right lower lobe segmental arteries."
    )
    assert findings_of(engine, text) == {"pulmonary_embolism": "present"}
    (mention,) = engine.report(text).indication
    assert (mention.finding, mention.status, mention.section_name) == (
        "pulmonary_embolism", "uncertain", "indication"
    )


@pytest.mark.parametrize(
    ("text", "expected", "section"),
    [
        (
            "FINDINGS: Small right pleural effusion.\nIMPRESSION: Small right pleural effusion.",
            {"pleural_effusion": "present"},
            "impression",
        ),
        (  # the impression's word wins over the body's
            "FINDINGS: Patchy opacity at the left base.\nNo consolidation elsewhere.\n"
            "IMPRESSION: Possible left basal consolidation.",
            {"consolidation": "uncertain"},
            "impression",
        ),
        (
            "FINDINGS: Possible small left pneumothorax.\nIMPRESSION: No pneumothorax.",
            {"pneumothorax": "absent"},
            "impression",
        ),
        (  # named in the body only: the body decides
            "FINDINGS: No pneumothorax. Cardiomegaly.\nIMPRESSION: Cardiomegaly.",
            {"pneumothorax": "absent", "cardiomegaly": "present"},
            None,
        ),
    ],
)
def test_a_concept_in_findings_and_impression_is_reported_once(
    engine: RuleEngine, text: str, expected: dict[str, str], section: str | None
) -> None:
    assert findings_of(engine, text) == expected
    if section is not None:
        (finding,) = engine(text)
        assert finding["section"] == section
        assert [m["section"] for m in finding["mentions"]] == ["body", "impression"]
        start, end = finding["text_span"]
        assert text[start:end] == finding["text"]


def test_within_a_section_present_beats_uncertain_beats_absent(engine: RuleEngine) -> None:
    assert findings_of(engine, "No right pneumothorax; small left pneumothorax.") == {
        "pneumothorax": "present"
    }
    assert findings_of(
        engine, "No definite fracture. A scaphoid fracture cannot be excluded."
    ) == {"fracture": "uncertain"}
    assert findings_of(engine, "No pleural effusion. No pleural effusion on the left.") == {
        "pleural_effusion": "absent"
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The right pneumothorax has resolved.", {"pneumothorax": "absent"}),
        ("Interval resolution of the left pleural effusion.", {"pleural_effusion": "absent"}),
        ("The left lower lobe nodule is no longer seen.", {"nodule": "absent"}),
        ("The previously seen effusion is no longer visible.", {"pleural_effusion": "absent"}),
        ("The right lower lobe consolidation has cleared.", {"consolidation": "absent"}),
        ("Stable 6 mm nodule in the right upper lobe.", {"nodule": "present"}),
        ("Unchanged mild cardiomegaly.", {"cardiomegaly": "present"}),
        ("New small left pleural effusion.", {"pleural_effusion": "present"}),
        ("The right hilar mass is again seen.", {"mass": "present"}),
        ("Persistent bilateral airspace disease.", {"consolidation": "present"}),
        ("Known mediastinal lymphadenopathy.", {"lymphadenopathy": "present"}),
        ("No new fracture.", {"fracture": "absent"}),
        (  # a previous statement gives way to the current one
            "Previously seen right pleural effusion. No pleural effusion today.",
            {"pleural_effusion": "absent"},
        ),
        (
            "The previously described pleural effusion has decreased and is now small.",
            {"pleural_effusion": "present"},
        ),
        (
            "Previously noted left lower lobe nodule has resolved. New 9 mm right middle "
            "lobe nodule.",
            {"nodule": "present"},
        ),
        # hedging stays uncertain
        ("Possible new small pneumothorax.", {"pneumothorax": "uncertain"}),
        ("Stable opacity, which may represent consolidation.", {"consolidation": "uncertain"}),
    ],
)
def test_temporal_words(engine: RuleEngine, text: str, expected: dict[str, str]) -> None:
    assert findings_of(engine, text) == expected


def test_historical_mentions_are_flagged(engine: RuleEngine) -> None:
    (finding,) = engine("Previously seen right pleural effusion. No pleural effusion today.")
    assert [(m["status"], m["historical"]) for m in finding["mentions"]] == [
        ("present", True), ("absent", False)
    ]
    assert finding["historical"] is False


def test_an_unsectioned_report_is_all_body(engine: RuleEngine) -> None:
    text = (
        "Frontal and lateral views of the chest. The heart is enlarged. Small right pleural "
        "effusion. No pneumothorax. Evaluate for pulmonary embolism with CT if clinically "
        "indicated."
    )
    result = engine.report(text)
    assert [(s.kind, s.name) for s in result.sections] == [("body", "")]
    assert result.indication == ()
    assert findings_of(engine, text) == {
        "cardiomegaly": "present",
        "pleural_effusion": "present",
        "pneumothorax": "absent",
        "pulmonary_embolism": "uncertain",
    }


def test_organ_subheadings_are_not_sections(engine: RuleEngine) -> None:
    text = (
        "HISTORY\nStaging.\n\nFINDINGS\nLungs: Two 4 mm nodules. No consolidation.\n"
        "Pleura: No pleural effusion.\nHeart: Normal size.\nLYMPH NODES: Enlarged "
        "subcarinal lymph node.\nBones: No fracture.\n\nIMPRESSION\nTwo small nodules."
    )
    result = engine.report(text)
    assert [(s.kind, s.name) for s in result.sections] == [
        ("context", "history"), ("body", "findings"), ("impression", "impression")
    ]
    assert findings_of(engine, text) == {
        "nodule": "present",
        "consolidation": "absent",
        "pleural_effusion": "absent",
        "cardiomegaly": "absent",
        "lymphadenopathy": "present",
        "fracture": "absent",
    }


@pytest.mark.parametrize(
    ("text", "sections"),
    [
        (
            "CLINICAL HISTORY: Cough.\nTECHNIQUE: PA and lateral.\nCOMPARISON: None.\n"
            "FINDINGS: Clear.\nIMPRESSION: Normal.",
            [("context", "clinical history"), ("context", "technique"),
             ("context", "comparison"), ("body", "findings"), ("impression", "impression")],
        ),
        (
            "Clinical details: Fall.\nReport: No fracture.\nConclusion: Normal.",
            [("context", "clinical details"), ("body", "report"), ("impression", "conclusion")],
        ),
        (
            "Indication:\n?PE\n\nFindings\nClear.\n\nOpinion -  Normal.\nSummary: Normal.",
            [("context", "indication"), ("body", "findings"), ("impression", "opinion"),
             ("impression", "summary")],
        ),
        (  # flattened onto one line: after a full stop, or in capitals anywhere
            "HISTORY: Cough. FINDINGS: No effusion IMPRESSION: Normal. Addendum: None.",
            [("context", "history"), ("body", "findings"), ("impression", "impression"),
             ("addendum", "addendum")],
        ),
        (  # a header inside another is not one; a numbered addendum is one
            "REASON FOR EXAM: r/o PE\nFINAL IMPRESSION: No PE.\nADDENDUM 2: Discussed.",
            [("context", "reason for exam"), ("impression", "final impression"),
             ("addendum", "addendum")],
        ),
        (  # in mid-line, words like "exam" or "prior" are not headers
            "FINDINGS: Limited. Exam: limited by motion. No pneumothorax. Prior: none.\n"
            "IMPRESSION: Normal.",
            [("body", "findings"), ("impression", "impression")],
        ),
        (  # before the first header: the title, context when a body header follows
            "CT HEAD\nHistory: Fall.\nFindings: No bleed.",
            [("context", ""), ("context", "history"), ("body", "findings")],
        ),
        (  # no body header: the text before IMPRESSION is the body
            "The lungs are clear.\nImpression: Normal.",
            [("body", ""), ("impression", "impression")],
        ),
        (  # no body header: a one-line indication ends at its line, then the body
            "Indication: pain, ?fracture.\nNo fracture.\nImpression: Normal.",
            [("context", "indication"), ("body", ""), ("impression", "impression")],
        ),
        (  # ... also without a full stop when the next line starts a statement
            "Clinical: ?PE\nCTPA: No pulmonary embolism.\nConclusion: No PE.",
            [("context", "clinical"), ("body", ""), ("impression", "conclusion")],
        ),
        (  # ... but a line wrapped in mid-sentence goes on
            "History: 65M with cough and fever,\nRule out pneumothorax.\nNo pneumothorax.\n"
            "Impression: Normal.",
            [("context", "history"), ("body", ""), ("impression", "impression")],
        ),
        (  # ... and a multi-line one at the blank line
            "Reason for exam:\nFall.\nRule out fracture.\n\nNo fracture.\n\nImpression: Normal.",
            [("context", "reason for exam"), ("body", ""), ("impression", "impression")],
        ),
    ],
)
def test_section_headers(
    engine: RuleEngine, text: str, sections: list[tuple[str, str]]
) -> None:
    found = engine.sections(text)
    assert [(s.kind, s.name) for s in found] == sections
    assert found[0].start == 0 and found[-1].end == len(text)


def test_british_report(engine: RuleEngine) -> None:
    text = (
        "Clinical details: Fall. ?rib fracture ?pneumothorax.\n"
        "Report: Displaced fractures of the right 6th and 7th ribs. No pneumothorax. "
        "Heart not enlarged.\n"
        "Conclusion: Right 6th and 7th rib fractures. No pneumothorax."
    )
    assert findings_of(engine, text) == {
        "fracture": "present", "pneumothorax": "absent", "cardiomegaly": "absent"
    }
    assert {(m.finding, m.status) for m in engine.report(text).indication} == {
        ("fracture", "uncertain"), ("pneumothorax", "uncertain")
    }


def test_addendum(engine: RuleEngine) -> None:
    # an addendum adds a finding the report had said absent
    text = (
        "Reason for exam: Pneumothorax follow-up.\n"
        "Findings: Small left apical pneumothorax. No pleural effusion.\n"
        "Impression: Stable small left pneumothorax.\n"
        "Addendum: On review of the lateral view there is a small left pleural effusion."
    )
    assert findings_of(engine, text) == {
        "pneumothorax": "present", "pleural_effusion": "present"
    }
    (_, effusion) = engine(text)
    assert (effusion["section"], effusion["section_name"]) == ("addendum", "addendum")
    # it ranks with the impression: one questionable nodule there does not undo another
    text = (
        "Findings: 5 mm left upper lobe nodule.\nImpression: 5 mm nodule.\n"
        "Addendum 1: The questionable right lower lobe nodule is a vessel."
    )
    assert findings_of(engine, text) == {"nodule": "present"}


def test_report_output_for_the_gateway(engine: RuleEngine) -> None:
    text = FIXED_REPORTS["chest_ct"][0]
    found = engine(text)
    assert [(f["finding"], f["status"], f["section"]) for f in found] == [
        ("pulmonary_embolism", "absent", "body"),
        ("nodule", "present", "body"),
        ("pleural_effusion", "present", "body"),
        ("pneumothorax", "absent", "body"),
        ("cardiomegaly", "absent", "body"),
        ("lymphadenopathy", "present", "body"),
        ("consolidation", "uncertain", "impression"),
    ]
    for f in found:
        assert f["code"] and f["meaning"]
        assert f["mentions"] and all(m["section"] != "context" for m in f["mentions"])
    assert json.loads(json.dumps(engine.report(text).to_dict()))["findings"] == found


def test_dev_reports_are_well_formed_and_right(engine: RuleEngine) -> None:
    reports = read_set(DEV_REPORTS)
    assert len(reports) >= 30
    assert len({r["style"] for r in reports}) >= 5
    for item in reports:
        assert set(item) == {"id", "style", "text", "labels"}
        for finding, status in labels_of(item):
            assert finding in engine.findings
            assert status in ("present", "absent", "uncertain")
    scores = evaluate_reports(engine, reports)
    # tuned on: the one known miss is "heart size is at the upper limit of normal"
    assert scores.overall.precision >= 0.99 and scores.overall.recall >= 0.98
    assert [e[0] for e in scores.errors] == ["r005"]
