"""Route matching: every operator, AND across keys, first match wins, kinds kept apart;
and the attribute builders that feed it."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.dataset import Dataset

from gateway.config import Route
from gateway.errors import MalformedInput
from gateway.hl7.message import split_messages as split_hl7_messages
from gateway.route import Attributes, Decision, decide
from gateway.route.attributes import (
    calling_ae_of,
    from_datasets,
    from_hl7,
    from_stored_dicom,
    hl7_keys,
)
from tests.hl7msgs import oru_r01


def route(name: str, *, dicom: Any = None, hl7: Any = None, **actions: list[str]) -> Route:
    when = {k: v for k, v in (("dicom", dicom), ("hl7", hl7)) if v is not None}
    return Route.model_validate({"name": name, "when": when, **actions})


def dicom(calling_ae: str | None = None, **values: list[str]) -> Attributes:
    return Attributes("dicom", values, calling_ae)


def hl7(**values: list[str]) -> Attributes:
    """HL7 attributes; ``MSH_9=[...]`` stands for the path ``MSH-9``."""
    return Attributes("hl7", {k.replace("_", "-"): v for k, v in values.items()})


def matches(attrs: Attributes, **when: Any) -> bool:
    return decide(attrs, [route("r", **when)]).matched


# --- scalars ----------------------------------------------------------------------------


def test_scalar_is_equal_ignoring_case_and_spaces() -> None:
    """A string condition matches its value whatever the case, and nothing else."""
    assert matches(dicom(Modality=["CT"]), dicom={"Modality": "ct"})
    assert matches(dicom(BodyPartExamined=["chest "]), dicom={"BodyPartExamined": "CHEST"})
    assert not matches(dicom(Modality=["CTX"]), dicom={"Modality": "CT"})
    assert not matches(dicom(Modality=["MR"]), dicom={"Modality": "CT"})


def test_number_in_config_matches_the_value_as_text_or_number() -> None:
    """``SeriesNumber: 5`` matches "5", "5.0" and "05"; a quoted "5" compares as text."""
    assert matches(dicom(SeriesNumber=["5"]), dicom={"SeriesNumber": 5})
    assert matches(dicom(SeriesNumber=["5.0"]), dicom={"SeriesNumber": 5})
    assert matches(dicom(SeriesNumber=["05"]), dicom={"SeriesNumber": 5})
    assert matches(hl7(MSH_12=["2.5"]), hl7={"MSH-12": 2.5})
    assert not matches(hl7(MSH_12=["2.5.1"]), hl7={"MSH-12": 2.5})
    assert not matches(dicom(SeriesNumber=["6"]), dicom={"SeriesNumber": 5})
    assert not matches(dicom(SeriesNumber=["five"]), dicom={"SeriesNumber": 5})
    assert matches(dicom(SeriesNumber=["5"]), dicom={"SeriesNumber": "5"})
    assert not matches(dicom(SeriesNumber=["5.0"]), dicom={"SeriesNumber": "5"})


def test_unquoted_yaml_boolean_matches_yes_no_words() -> None:
    """YAML reads ``yes`` as true: it then matches Y/YES/TRUE/ON values, not N."""
    assert matches(hl7(OBR_5=["Y"]), hl7={"OBR-5": True})
    assert matches(hl7(OBR_5=["no"]), hl7={"OBR-5": False})
    assert not matches(hl7(OBR_5=["N"]), hl7={"OBR-5": True})


# --- lists, regex, present --------------------------------------------------------------


def test_list_matches_any_of_its_items() -> None:
    when = {"BodyPartExamined": ["CHEST", "LUNG"]}
    assert matches(dicom(BodyPartExamined=["LUNG"]), dicom=when)
    assert matches(dicom(BodyPartExamined=["chest"]), dicom=when)
    assert not matches(dicom(BodyPartExamined=["HEAD"]), dicom=when)
    assert matches(dicom(SeriesNumber=["2"]), dicom={"SeriesNumber": [1, 2]})


def test_regex_searches_anywhere_and_respects_anchors() -> None:
    """``re.search``: unanchored patterns match inside the value; ``^`` anchors."""
    assert matches(hl7(MSH_9=["ADT^A01"]), hl7={"MSH-9": {"regex": "^ADT"}})
    assert matches(dicom(StudyDescription=["CT THX"]), dicom={"StudyDescription": {"regex": "TH"}})
    assert not matches(hl7(MSH_9=["ORU^R01"]), hl7={"MSH-9": {"regex": "^ADT"}})
    assert not matches(hl7(MSH_9=["XADT^A01"]), hl7={"MSH-9": {"regex": "^ADT"}})


def test_regex_is_case_sensitive_unless_the_pattern_says_otherwise() -> None:
    assert not matches(hl7(MSH_9=["adt^a01"]), hl7={"MSH-9": {"regex": "^ADT"}})
    assert matches(hl7(MSH_9=["adt^a01"]), hl7={"MSH-9": {"regex": "(?i)^ADT"}})


def test_bad_regex_is_refused_when_the_route_is_built() -> None:
    """A broken pattern never reaches matching: the config refuses it, naming the key."""
    with pytest.raises(ValueError, match=r"MSH-9: bad regex"):
        route("r", hl7={"MSH-9": {"regex": "(unclosed"}})


def test_present_true_needs_a_value_and_false_needs_none() -> None:
    assert matches(hl7(PV1_3=["RAD"]), hl7={"PV1-3": {"present": True}})
    assert not matches(hl7(), hl7={"PV1-3": {"present": True}})
    assert matches(hl7(), hl7={"PV1-3": {"present": False}})
    assert not matches(hl7(PV1_3=["RAD"]), hl7={"PV1-3": {"present": False}})


def test_absent_attribute_matches_no_value_condition() -> None:
    assert not matches(dicom(), dicom={"Modality": "CT"})
    assert not matches(dicom(), dicom={"Modality": ["CT", "MR"]})
    assert not matches(dicom(), dicom={"Modality": {"regex": ".*"}})


# --- combining --------------------------------------------------------------------------


def test_every_key_must_hold() -> None:
    when = {"Modality": "CT", "BodyPartExamined": ["CHEST", "LUNG"]}
    assert matches(dicom(Modality=["CT"], BodyPartExamined=["CHEST"]), dicom=when)
    assert not matches(dicom(Modality=["CT"], BodyPartExamined=["HEAD"]), dicom=when)
    assert not matches(dicom(Modality=["MR"], BodyPartExamined=["CHEST"]), dicom=when)


def test_first_matching_route_wins_and_later_ones_are_not_tried() -> None:
    routes = [
        route("mr", dicom={"Modality": "MR"}, forward=["pacs"]),
        route("any-ct", dicom={"Modality": "CT"}, run=["m1"], send=["pacs"]),
        route("chest-ct", dicom={"Modality": "CT", "BodyPartExamined": "CHEST"}, run=["m2"]),
    ]
    decision = decide(dicom(Modality=["CT"], BodyPartExamined=["CHEST"]), routes)
    assert decision == Decision(
        route="any-ct",
        run=("m1",),
        send=("pacs",),
        forward=(),
        reasons=(
            "route 'mr': Modality CT is not MR → no",
            "route 'any-ct': Modality CT matches → yes",
        ),
    )


def test_no_match_means_no_route_and_no_actions() -> None:
    routes = [route("ct", dicom={"Modality": "CT"}, run=["m1"], send=["pacs"])]
    decision = decide(dicom(Modality=["US"]), routes)
    assert decision.route is None and not decision.matched
    assert (decision.run, decision.send, decision.forward) == ((), (), ())
    assert decision.reasons == ("route 'ct': Modality US is not CT → no",)
    assert decide(dicom(Modality=["US"]), []) == Decision(route=None)


def test_dicom_only_route_never_matches_hl7_and_the_other_way_round() -> None:
    """Even a condition that would hold (present: false) does not cross kinds."""
    dicom_route = route("d", dicom={"Modality": {"present": False}})
    hl7_route = route("h", hl7={"MSH-9": {"present": False}})
    assert not decide(hl7(MSH_9=["ORU^R01"]), [dicom_route]).matched
    assert not decide(dicom(Modality=["CT"]), [hl7_route]).matched
    assert decide(hl7(MSH_9=["ORU^R01"]), [dicom_route]).reasons == (
        "route 'd': DICOM conditions only, this is HL7 → no",
    )


def test_route_with_both_kinds_uses_the_conditions_for_the_input_kind() -> None:
    both = route("both", dicom={"Modality": "CT"}, hl7={"MSH-9": "ORU^R01"})
    assert decide(dicom(Modality=["CT"]), [both]).matched
    assert decide(hl7(MSH_9=["ORU^R01"]), [both]).matched
    assert not decide(hl7(MSH_9=["ADT^A01"]), [both]).matched


def test_calling_ae_is_a_dicom_pseudo_attribute() -> None:
    when = {"Modality": "MR", "calling_ae": "PACS"}
    assert matches(dicom("pacs", Modality=["MR"]), dicom=when)
    assert not matches(dicom("MODALITY1", Modality=["MR"]), dicom=when)
    assert not matches(dicom(None, Modality=["MR"]), dicom=when)
    assert matches(dicom("PACS"), dicom={"calling_ae": ["PACS", "PACS2"]})
    assert matches(dicom(None), dicom={"calling_ae": {"present": False}})


def test_study_matches_when_any_instance_matches() -> None:
    """A study with a CT and an SR series matches ``Modality: CT`` (and ``SR``)."""
    study = from_stored_dicom(
        [{"Modality": "CT", "BodyPartExamined": "CHEST"}, {"Modality": "SR"}], "PACS"
    )
    assert study.get("Modality") == ["CT", "SR"]
    assert matches(study, dicom={"Modality": "CT"})
    assert matches(study, dicom={"Modality": "SR", "BodyPartExamined": "CHEST"})
    assert not matches(study, dicom={"Modality": "MR"})


def test_reasons_explain_each_condition() -> None:
    routes = [
        route("chest-ct", dicom={"Modality": "CT", "BodyPartExamined": ["CHEST", "LUNG"]}),
        route("archive", dicom={"calling_ae": "PACS", "StationName": {"present": True}}),
        route("rx", dicom={"SeriesDescription": {"regex": "^AX"}}),
    ]
    attrs = dicom(None, Modality=["CT"], BodyPartExamined=["HEAD"], SeriesDescription=["COR"])
    assert decide(attrs, routes).reasons == (
        "route 'chest-ct': Modality CT matches; BodyPartExamined HEAD not in [CHEST, LUNG] → no",
        "route 'archive': calling_ae absent (calling AE unknown); "
        "StationName absent, wanted present → no",
        "route 'rx': SeriesDescription COR does not match /^AX/ → no",
    )


# --- attribute builders -----------------------------------------------------------------


def test_stored_dicom_attrs_become_strings_without_empties_or_duplicates() -> None:
    study = from_stored_dicom(
        [
            {"Modality": "CT", "SeriesNumber": 1, "ImageType": ["ORIGINAL", "PRIMARY"],
             "StationName": None, "ProtocolName": ""},
            {"Modality": "CT", "SeriesNumber": 2, "SliceThickness": 2.5},
        ],
        " PACS ",
    )
    assert study == Attributes(
        "dicom",
        {"Modality": ["CT"], "SeriesNumber": ["1", "2"], "ImageType": ["ORIGINAL", "PRIMARY"],
         "SliceThickness": ["2.5"]},
        "PACS",
    )


def test_datasets_give_the_routing_keywords_of_every_instance() -> None:
    """Only routing keywords are read (not PatientName); multi-values become items."""
    first, second = Dataset(), Dataset()
    first.Modality, first.BodyPartExamined, first.PatientName = "CT", "CHEST", "DOE^JANE"
    first.SeriesNumber = 3
    second.Modality, second.SeriesDescription = "SR", ""
    study = from_datasets([first, second], "PACS")
    assert study.values == {
        "Modality": ["CT", "SR"], "BodyPartExamined": ["CHEST"], "SeriesNumber": ["3"]
    }
    assert matches(study, dicom={"SeriesNumber": 3, "calling_ae": "pacs"})


def test_calling_ae_of_reads_an_envelope_source() -> None:
    assert calling_ae_of("PACS@127.0.0.1") == "PACS"
    assert calling_ae_of("MY@AE@10.0.0.1") == "MY@AE"
    assert calling_ae_of("@127.0.0.1") is None


def test_hl7_paths_follow_the_standard_numbering() -> None:
    attrs = from_hl7(oru_r01())
    assert attrs.get("MSH-1") == ["|"]
    assert attrs.get("MSH-2") == ["^~\\&"]
    assert attrs.get("MSH-3") == ["EHR"]
    assert attrs.get("MSH-9") == ["ORU^R01^ORU_R01", "ORU^R01"]
    assert attrs.get("MSH-9.1") == ["ORU"]
    assert attrs.get("MSH-9.2.1") == ["R01"]
    assert attrs.get("OBR-4.2") == ["CT CHEST"]
    assert attrs.get("obr-4.1") == ["71250"]
    assert attrs.get("PV1-3") == ["RAD^^^HOSP"]
    assert attrs.get("OBX") == ["OBX"]
    assert attrs.get("ZZZ") == []


def test_hl7_repeated_segments_repetitions_and_other_separators() -> None:
    message = (  # field #, component $, repetition *, escape @, subcomponent %
        b"MSH#$*@%#EHR#HOSP###20260101##ORU$R01#C1#P#2.5\n"
        b"PID#1##A1$$$HOSP*B2$$$OTHER\n"
        b"OBX#1#CE#X$Nodule@S@mass$L##yes\n"
        b"OBX#2#CE#Y$Effusion%pleural$L\n"
    )
    attrs = from_hl7(message)
    assert attrs.get("MSH-9") == ["ORU^R01"]
    assert attrs.get("PID-3.1") == ["A1", "B2"]
    assert attrs.get("PID-3") == ["A1^^^HOSP", "B2^^^OTHER"]
    assert attrs.get("OBX-3.2") == ["Nodule$mass", "Effusion&pleural"]
    assert attrs.get("OBX-3.2.2") == ["pleural"]
    assert attrs.get("OBX-3") == ["X^Nodule$mass^L", "Y^Effusion&pleural^L"]
    assert attrs.get("OBX-5") == ["yes"]
    assert matches(attrs, hl7={"OBX-3.2.1": "effusion"})


def test_hl7_segment_separators_cr_lf_and_crlf_give_the_same_attributes() -> None:
    cr = oru_r01()
    assert from_hl7(cr.replace(b"\r", b"\n")) == from_hl7(cr)
    assert from_hl7(cr.replace(b"\r", b"\r\n")) == from_hl7(cr)


def test_hl7_without_msh_is_malformed() -> None:
    with pytest.raises(MalformedInput):
        from_hl7(b"PID|1||X\r")


def test_split_hl7_messages_at_every_msh() -> None:
    one = oru_r01(control_id="A")
    two = oru_r01(control_id="B").replace(b"\r", b"\r\n")
    messages = split_hl7_messages(b"\n" + one + b"\n\n" + two + b"\n")
    assert messages == [one, oru_r01(control_id="B")]


@pytest.mark.parametrize(
    "message",
    [
        oru_r01(),
        oru_r01(patient="O\\S\\NEIL^PAT", text="line one\\.br\\line two"),
        b"MSH#$*@%#EHR#HOSP###20260101##ORU$R01#C1#P#2.5\n"
        b"PID#1##A1$$$HOSP*B2$$$OTHER\n OBX#1#CE#X$Nodule@S@mass$L##yes\n"
        b"OBX#2#CE#Y$Effusion%pleural$L\n",
    ],
)
def test_reading_only_the_keys_routes_test_gives_the_same_values(message: bytes) -> None:
    keys = [
        "MSH", "MSH-1", "MSH-2", "MSH-3", "MSH-9", "MSH-9.1", "MSH-9.2.1", "PID", "PID-3",
        "PID-3.1", "PID-5", "obx-3.2", "OBX-3.2.2", "OBX-5", "OBR-4.2", "ZZZ", "ZZZ-1",
    ]
    full = from_hl7(message)
    for key in keys:
        assert from_hl7(message, [key]).get(key) == full.get(key), key
    assert from_hl7(message, keys).get("MSH-9") == full.get("MSH-9")
    routes = [
        route("a", hl7={"MSH-9": "ORU^R01", "PID-3.1": "B2"}),
        route("b", hl7={"OBX-3.2.1": "effusion"}),
        route("c", hl7={"PID": {"present": True}}),
    ]
    assert decide(from_hl7(message, hl7_keys(routes)), routes) == decide(full, routes)
