"""load_config: the shipped file is valid; every problem is one `FILE:LINE: path: message` line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gateway.config import MAX_DEPTH, MAX_VALUES
from gateway.errors import ConfigError
from gateway.preflight import load_config

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "config" / "gateway.yaml"

# A minimal valid file: lines 1-6.
MINIMAL = """\
dicom:
  allowed_callers:
    - {ae_title: PACS, hosts: [127.0.0.1]}
hl7:
  allowed_senders:
    - {application: EHR, facility: HOSP, hosts: [127.0.0.1]}
"""


def write(tmp_path: Path, text: str, name: str = "gw.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.errors


# --- valid files --------------------------------------------------------------------------


def test_shipped_config_is_valid_with_the_documented_defaults() -> None:
    cfg = load_config(SHIPPED)
    assert cfg.source == SHIPPED.resolve()
    assert cfg.dicom.ae_title == "AI_GATEWAY"
    assert (cfg.dicom.host, cfg.dicom.port, cfg.hl7.port) == ("127.0.0.1", 11112, 2575)
    assert [c.ae_title for c in cfg.dicom.allowed_callers] == ["PACS", "STORESCU", "ECHOSCU"]
    assert [(s.application, s.facility) for s in cfg.hl7.allowed_senders] == [("EHR", "HOSP")]
    assert cfg.dicom.study_complete_after == 5
    assert cfg.destinations == {}
    assert {n: m.bundle for n, m in cfg.models.items()} == {
        "lung-nodules": Path("../models/lung_nodules"),
        "report-findings": Path("../models/report_findings"),
    }
    assert [(r.name, r.run, r.send) for r in cfg.routes] == [
        ("chest-ct", ["lung-nodules"], []),
        ("radiology-reports", ["report-findings"], []),
    ]
    assert cfg.gateway.inference.processes == 1


def test_shipped_config_paths_resolve_relative_to_the_config_file() -> None:
    cfg = load_config(SHIPPED)
    assert cfg.data_dir == REPO / "var"
    assert cfg.key_file == REPO / "var" / "keys.json"


def test_relative_paths_resolve_against_the_file_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        tmp_path / "etc",
        "gateway:\n  data_dir: ../spooldir\n  encryption_key_file: keys/k.json\n" + MINIMAL,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(path)
    assert cfg.data_dir == tmp_path / "spooldir"
    assert cfg.key_file == tmp_path / "etc" / "keys" / "k.json"


def test_absolute_paths_are_kept_as_written(tmp_path: Path) -> None:
    path = write(tmp_path, f"gateway:\n  data_dir: {tmp_path / 'abs'}\n" + MINIMAL)
    assert load_config(path).data_dir == tmp_path / "abs"


def test_full_documented_example_with_routes_is_valid(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL
        + """\
destinations:
  pacs:
    dicom: {ae_title: ORTHANC, host: 127.0.0.1, port: 4242, tls: null}
  ehr:
    hl7: {host: 127.0.0.1, port: 2576, tls: null, application: EHR, facility: HOSP}
    retry: {initial: 1, max: 60, give_up_after: 3600}
models:
  lung-nodules: {bundle: REPO/models/lung_nodules}
routes:
  - name: chest-ct
    when: {dicom: {Modality: CT, BodyPartExamined: [CHEST, LUNG]}}
    run: [lung-nodules]
    send: [pacs, ehr]
  - name: adt-feed
    when: {hl7: {MSH-9: {regex: "^ADT"}, PID-3: {present: true}}}
    forward: [ehr]
""".replace("REPO/", f"{REPO}/"),
    )
    cfg = load_config(path)
    assert [r.name for r in cfg.routes] == ["chest-ct", "adt-feed"]
    assert cfg.destinations["ehr"].retry.give_up_after == 3600
    assert cfg.path(cfg.models["lung-nodules"].bundle) == REPO / "models" / "lung_nodules"
    assert (
        cfg.models["lung-nodules"].timeout == 300 and cfg.models["lung-nodules"].memory_mb == 4096
    )


def test_a_model_bundle_that_cannot_be_read_is_an_error_at_its_line(tmp_path: Path) -> None:
    (tmp_path / "b" / "configs").mkdir(parents=True)
    (tmp_path / "b" / "configs" / "metadata.json").write_text('{"version": "1"}')
    (tmp_path / "b" / "configs" / "inference.json").write_text("{}")
    path = write(
        tmp_path,
        MINIMAL + "models:\n  nodules:\n    bundle: missing\n  notes:\n    bundle: b\n",
    )
    assert errors_of(path) == [
        f"{path}:9: models.nodules.bundle: {tmp_path / 'missing'}: bundle folder not found",
        f"{path}:11: models.notes.bundle: {tmp_path / 'b'}: metadata.json has no 'gateway' "
        'section; add at least "gateway": {"input": "image"} (see docs/models.md)',
    ]


# --- one error each -----------------------------------------------------------------------


def test_unknown_key_suggests_the_closest_name(tmp_path: Path) -> None:
    path = write(tmp_path, "gateway:\n  data_dri: x\n" + MINIMAL)
    assert errors_of(path) == [
        f"{path}:2: gateway.data_dri: unknown key (did you mean 'data_dir'?)"
    ]


def test_unknown_top_level_key_suggests_the_section_name(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "routs: []\n")
    assert errors_of(path) == [f"{path}:7: routs: unknown key (did you mean 'routes'?)"]


def test_unknown_key_in_a_section_suggests_the_closest_name(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "  port: 2575\n  idle_timout: 5\n")
    assert errors_of(path) == [
        f"{path}:8: hl7.idle_timout: unknown key (did you mean 'idle_timeout'?)"
    ]


def test_unknown_key_inside_a_list_item_suggests_the_closest_name(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("facility: HOSP", "facilty: HOSP"))
    assert errors_of(path) == [
        f"{path}:6: hl7.allowed_senders.0.facilty: unknown key (did you mean 'facility'?)"
    ]


def test_unknown_key_with_nothing_close_has_no_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "  zzzzzz: 1\n")
    assert errors_of(path) == [f"{path}:7: hl7.zzzzzz: unknown key"]


def test_unknown_key_under_a_named_destination_suggests_the_closest_name(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        MINIMAL + "destinations:\n  pacs:\n    dicom: {ae_title: X, host: h, port: 1}\n"
        "    retyr: {}\n",
    )
    assert errors_of(path) == [
        f"{path}:10: destinations.pacs.retyr: unknown key (did you mean 'retry'?)"
    ]


def test_wrong_type_names_the_key_and_the_expected_type(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("dicom:\n", "dicom:\n  port: abc\n"))
    assert errors_of(path) == [
        f"{path}:2: dicom.port: Input should be a valid integer, "
        "unable to parse string as an integer"
    ]


def test_listening_port_above_65535_is_out_of_range(tmp_path: Path) -> None:
    path = write(tmp_path, "gateway:\n  http: {host: 127.0.0.1, port: 70000}\n" + MINIMAL)
    assert errors_of(path) == [
        f"{path}:2: gateway.http.port: Input should be less than or equal to 65535"
    ]


def test_destination_port_zero_is_out_of_range(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "destinations:\n  ehr:\n    hl7: {host: h, port: 0}\n")
    assert errors_of(path) == [
        f"{path}:9: destinations.ehr.hl7.port: Input should be greater than or equal to 1"
    ]


def test_listening_port_zero_means_any_free_port_and_is_valid(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("dicom:\n", "dicom:\n  port: 0\n"))
    assert load_config(path).dicom.port == 0


def test_missing_allowed_callers_is_required(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "dicom:\n  ae_title: GW\nhl7:\n  allowed_senders:\n"
        "    - {application: EHR, hosts: [127.0.0.1]}\n",
    )
    assert errors_of(path) == [f"{path}:1: dicom.allowed_callers: Field required"]


def test_empty_allowed_callers_list_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL.replace(
            "  allowed_callers:\n    - {ae_title: PACS, hosts: [127.0.0.1]}\n",
            "  allowed_callers: []\n",
        ),
    )
    assert errors_of(path) == [
        f"{path}:2: dicom.allowed_callers: List should have at least 1 item after validation, not 0"
    ]


def test_ae_title_longer_than_16_characters_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("ae_title: PACS", "ae_title: ABCDEFGHIJKLMNOPQ"))
    assert errors_of(path) == [
        f"{path}:3: dicom.allowed_callers.0.ae_title: String should have at most 16 characters"
    ]


def test_host_that_is_neither_address_nor_name_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path, MINIMAL.replace("hosts: [127.0.0.1]}\nhl7", 'hosts: ["bad host!"]}\nhl7')
    )
    assert errors_of(path) == [
        f"{path}:3: dicom.allowed_callers.0.hosts: "
        "'bad host!' is not an IP address, network or host name"
    ]


def test_bad_regex_in_a_route_condition_names_the_attribute(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL + "routes:\n  - name: r\n    when:\n      dicom:\n"
        '        Modality: CT\n        SeriesDescription: {regex: "(unclosed"}\n',
    )
    assert errors_of(path) == [
        f"{path}:12: routes.0.when.dicom.SeriesDescription: bad regex '(unclosed': "
        "missing ), unterminated subpattern at position 0"
    ]


def test_condition_with_an_unknown_operator_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path, MINIMAL + "routes:\n  - name: r\n    when: {hl7: {MSH-9: {like: ORU}}}\n"
    )
    assert errors_of(path) == [
        f"{path}:9: routes.0.when.hl7.MSH-9: a condition is a value, a list, {{regex: ...}} or "
        '{present: true|false}, not {"like": "ORU"}'
    ]


def test_route_without_conditions_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "routes:\n  - name: r\n    when: {}\n")
    assert errors_of(path) == [f"{path}:9: routes.0.when: 'when' needs 'dicom' or 'hl7' conditions"]


def test_unknown_model_and_destination_in_a_route_suggest_the_closest_names(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        MINIMAL
        + """\
destinations:
  pacs: {dicom: {ae_title: ORTHANC, host: 127.0.0.1, port: 4242}}
  ehr: {hl7: {host: 127.0.0.1, port: 2576}}
models:
  lung-nodules: {bundle: ../models/lung}
routes:
  - name: chest-ct
    when: {dicom: {Modality: CT}}
    run: [lung-nodles]
    send: [ehr, pac]
    forward: [nowhere-near]
""",
    )
    assert errors_of(path) == [
        f"{path}:15: routes.0.run.0: unknown model 'lung-nodles' (did you mean 'lung-nodules'?)",
        f"{path}:16: routes.0.send.1: unknown destination 'pac' (did you mean 'pacs'?)",
        f"{path}:17: routes.0.forward.0: unknown destination 'nowhere-near'",
    ]


def test_duplicate_route_name_points_at_the_second_route(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL + "routes:\n"
        "  - name: r\n    when: {dicom: {Modality: CT}}\n"
        "  - name: r\n    when: {dicom: {Modality: MR}}\n",
    )
    assert errors_of(path) == [f"{path}:10: routes.1.name: duplicate route name 'r'"]


def test_duplicate_yaml_key_is_an_error_at_the_second_occurrence(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "  port: 2575\n  host: 0.0.0.0\n  port: 2576\n")
    assert errors_of(path) == [f"{path}:9: hl7.port: duplicate key"]


def test_destination_with_both_dicom_and_hl7_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL + "destinations:\n  both:\n"
        "    dicom: {ae_title: ORTHANC, host: 127.0.0.1, port: 4242}\n"
        "    hl7: {host: 127.0.0.1, port: 2576}\n",
    )
    assert errors_of(path) == [
        f"{path}:8: destinations.both: a destination has exactly one of 'dicom' or 'hl7'"
    ]


def test_destination_with_neither_dicom_nor_hl7_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "destinations:\n  empty: {}\n")
    assert errors_of(path) == [
        f"{path}:8: destinations.empty: a destination has exactly one of 'dicom' or 'hl7'"
    ]


def test_client_tls_cert_without_key_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    (tmp_path / "c.pem").write_text("x")
    path = write(
        tmp_path,
        MINIMAL + "destinations:\n  ehr:\n    hl7:\n      host: h\n      port: 1\n"
        "      tls: {ca: ca.pem, cert: c.pem}\n",
    )
    assert errors_of(path) == [f"{path}:12: destinations.ehr.hl7.tls: 'cert' and 'key' go together"]


def test_yaml_syntax_error_reports_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "gateway:\n  data_dir: x\n bad: 1\n" + MINIMAL)
    assert errors_of(path) == [f"{path}:3: expected <block end>, but found '<block mapping start>'"]


def test_unclosed_flow_mapping_reports_the_end_of_file_line(tmp_path: Path) -> None:
    path = write(tmp_path, "dicom:\n  allowed_callers:\n    - {ae_title: PACS\n")
    assert errors_of(path) == [f"{path}:4: expected ',' or '}}', but got '<stream end>'"]


# Found by fuzzing (tests/fuzz/corpus/config/regress-*): each of these raised something
# other than ConfigError (a traceback from `gateway check-config`), or hung.


def test_a_file_that_is_not_utf_8_is_an_error_at_its_line(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_bytes(MINIMAL.encode() + b"# caf\xe9\n")
    assert errors_of(path) == [f"{path}:7: the file is not UTF-8 text (byte 0xE9)"]


def test_a_control_character_is_an_error_at_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "gateway: {data_dir: \x01}\n")
    assert errors_of(path) == [
        f"{path}:7: character #x0001 is not allowed in YAML (special characters are not allowed)"
    ]


@pytest.mark.parametrize(
    ("tail", "line", "message"),
    [
        ("gateway: {data_dir: !!python/object:os.system x}\n", 7,
         "gateway.data_dir: could not determine a constructor for the tag "
         "'tag:yaml.org,2002:python/object:os.system'"),
        ("gateway: {retention_days: 2026-13-45}\n", 7,
         "gateway.retention_days: '2026-13-45' cannot be read: month must be in 1..12"),
        ("gateway: {retention_days: !!int }\n", 7,  # PyYAML's own IndexError
         "gateway.retention_days: '' cannot be read: IndexError"),
        ("gateway:\n  ? [a, b]\n  : 1\n", 8,
         "gateway: a key must be a single value, not a list or mapping"),
        ("base: &b {ae_title: X}\nx: {<<: *b}\n", 8,
         "x: YAML merge keys (<<) are not supported: write the keys out"),
        ("x: &a [1, *a]\n", 7, "x.1: an alias refers to a collection that holds it"),
    ],
)
def test_values_that_cannot_be_built_are_errors_at_their_line(
    tmp_path: Path, tail: str, line: int, message: str
) -> None:
    path = write(tmp_path, MINIMAL + tail)
    assert errors_of(path) == [f"{path}:{line}: {message}"]


def test_a_flow_key_without_a_value_reads_as_yaml_does(tmp_path: Path) -> None:
    # the loader built each value by serializing its node and parsing that again, which
    # failed for this node (a ParserError); a key without a value is null, as in PyYAML
    path = write(tmp_path, MINIMAL.replace("{ae_title: PACS,", "{ae_title: PACS, facility:,"))
    assert errors_of(path) == [f"{path}:3: dicom.allowed_callers.0.facility: unknown key"]


def test_a_route_naming_a_model_beside_models_named_by_numbers(tmp_path: Path) -> None:
    # seen reading the loader (tests/fuzz/corpus/config/regress-number-keys): "did you
    # mean" compared the name with the keys as YAML read them, and a number has no len()
    path = write(tmp_path, MINIMAL + "models: {1: {bundle: x}}\nroutes:\n"
                 "  - {name: r, when: {hl7: {a: 1}}, run: [x]}\n")  # fmt: skip
    errors = errors_of(path)
    assert f"{path}:7: models.1.[key]: Input should be a valid string" in errors
    assert f"{path}:9: routes.0.run.0: unknown model 'x'" in errors


def test_aliases_expanding_past_the_value_limit_are_refused(tmp_path: Path) -> None:
    levels = ["l0: &l0 [" + ", ".join(["x"] * 10) + "]"]
    levels += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 9)]
    path = write(tmp_path, "\n".join(levels) + "\n")  # 10**9 values: it hung
    (error,) = errors_of(path)
    assert error.endswith(f"more than {MAX_VALUES} values (aliases expanding?)")


def test_lists_nested_too_deeply_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "x:\n  " + "[" * 600 + "]" * 600 + "\n")  # recursed
    assert errors_of(path) == [f"{path}:8: lists or mappings nested more than {MAX_DEPTH} deep"]
    depth = MAX_DEPTH - 1  # inside the file's mapping
    path = write(tmp_path, MINIMAL + "x: " + "[" * depth + "]" * depth + "\n")
    assert errors_of(path) == [f"{path}:7: x: unknown key"]


def test_tls_file_that_does_not_exist_is_reported_with_its_resolved_path(
    tmp_path: Path,
) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "server.pem").write_text("cert")
    path = write(
        tmp_path,
        MINIMAL + "  tls:\n    port: 2577\n    cert: certs/server.pem\n    key: certs/server.key\n"
        "    require_client_cert: false\n",
    )
    assert errors_of(path) == [
        f"{path}:10: hl7.tls.key: file '{tmp_path / 'certs' / 'server.key'}' does not exist"
    ]


def test_tls_with_all_files_present_is_valid(tmp_path: Path) -> None:
    for name in ("s.pem", "s.key", "ca.pem"):
        (tmp_path / name).write_text("x")
    path = write(
        tmp_path,
        MINIMAL.replace(
            "dicom:\n",
            "dicom:\n  tls: {port: 2762, cert: s.pem, key: s.key, ca: ca.pem}\n",
        ),
    )
    tls = load_config(path).dicom.tls
    assert tls is not None and tls.require_client_cert is True


def test_destination_ca_that_does_not_exist_is_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL + "destinations:\n  pacs:\n    dicom:\n      ae_title: X\n      host: h\n"
        "      port: 1\n      tls: {ca: nope/ca.pem}\n",
    )
    assert errors_of(path) == [
        f"{path}:13: destinations.pacs.dicom.tls.ca: "
        f"file '{tmp_path / 'nope' / 'ca.pem'}' does not exist"
    ]


def test_require_client_cert_without_ca_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s.pem").write_text("x")
    (tmp_path / "s.key").write_text("x")
    path = write(tmp_path, MINIMAL + "  tls:\n    port: 2577\n    cert: s.pem\n    key: s.key\n")
    assert errors_of(path) == [
        f"{path}:7: hl7.tls: require_client_cert is true, so 'ca' must name the CA file"
    ]


def test_empty_file_reports_the_missing_required_sections(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert errors_of(path) == [f"{path}:1: dicom: Field required", f"{path}:1: hl7: Field required"]


def test_comment_only_file_is_treated_as_empty(tmp_path: Path) -> None:
    path = write(tmp_path, "# nothing here\n")
    assert errors_of(path) == [f"{path}:1: dicom: Field required", f"{path}:1: hl7: Field required"]


def test_top_level_list_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "- dicom\n- hl7\n")
    assert errors_of(path) == [f"{path}:1: (top): the config file must be a mapping of sections"]


def test_missing_file_is_reported_at_line_zero(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    assert errors_of(path) == [f"{path}:0: cannot read the config file: No such file or directory"]


# --- several errors -----------------------------------------------------------------------


def test_every_error_in_a_file_is_reported_one_line_each(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        gateway:
          data_dri: data
          http: {host: 127.0.0.1, port: 70000}
        dicom:
          port: abc
          allowed_callers: []
          max_associations: 0
        hl7:
          allowed_senders:
            - {application: EHR, hosts: [127.0.0.1]}
        destinations:
          both:
            dicom: {ae_title: ORTHANC, host: 127.0.0.1, port: 4242}
            hl7: {host: 127.0.0.1, port: 2576}
        """,
    )
    errors = errors_of(path)
    assert sorted(errors) == sorted(
        [
            f"{path}:2: gateway.data_dri: unknown key (did you mean 'data_dir'?)",
            f"{path}:3: gateway.http.port: Input should be less than or equal to 65535",
            f"{path}:5: dicom.port: Input should be a valid integer, "
            "unable to parse string as an integer",
            f"{path}:6: dicom.allowed_callers: List should have at least 1 item after "
            "validation, not 0",
            f"{path}:7: dicom.max_associations: Input should be greater than or equal to 1",
            f"{path}:12: destinations.both: a destination has exactly one of 'dicom' or 'hl7'",
        ]
    )
    assert all("\n" not in e for e in errors)


def test_route_reference_errors_are_reported_together_with_field_errors(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL + "  port: abc\nroutes:\n  - name: r\n    when: {dicom: {Modality: CT}}\n"
        "    run: [missing-model]\n",
    )
    assert sorted(errors_of(path)) == [
        f"{path}:11: routes.0.run.0: unknown model 'missing-model'",
        f"{path}:7: hl7.port: Input should be a valid integer, "
        "unable to parse string as an integer",
    ]


def test_config_error_message_joins_the_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.message == f"{path}:1: dicom: Field required\n{path}:1: hl7: Field required"


def test_forwarding_dicom_objects_to_an_hl7_destination_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "k.yaml"
    path.write_text(
        "dicom:\n  allowed_callers: [{ae_title: PACS, hosts: [127.0.0.1]}]\n"
        "hl7:\n  allowed_senders: [{application: EHR, hosts: [127.0.0.1]}]\n"
        "destinations:\n  ehr: {hl7: {host: 127.0.0.1, port: 2576}}\n"
        "routes:\n  - name: mr\n    when: {dicom: {Modality: MR}}\n    forward: [ehr]\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [
        f"{path}:10: routes.0.forward.0: 'ehr' is an HL7 destination but this route matches "
        "only DICOM objects; forward passes objects on unchanged, so it needs a destination "
        "of the same kind"
    ]


# --- the queue database and the spool (scale-out) -----------------------------------------


def test_database_is_null_or_a_postgresql_url_and_the_spool_defaults_to_the_data_dir(
    tmp_path: Path,
) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.gateway.database is None and cfg.spool_dir == tmp_path.parent / "var" / "spool"
    (tmp_path / "pw").write_text("s3cret\n")
    path = write(
        tmp_path,
        "gateway:\n  database: postgresql://gw@db.example:5432/gateway\n"
        "  database_password_file: pw\n  spool_dir: /mnt/shared/spool\n" + MINIMAL,
    )
    cfg = load_config(path)
    assert cfg.gateway.database == "postgresql://gw@db.example:5432/gateway"
    assert cfg.spool_dir == Path("/mnt/shared/spool")


@pytest.mark.parametrize(
    "url, message",
    [
        ("postgresql://gw:s3cret@db:5432/gw", "the URL holds a password: put it in"),
        ("mysql://gw@db/gw", "is not a PostgreSQL URL: write postgresql://USER@HOST:5432/DB"),
        ("postgresql://gw@db:port/gw", "the URL's port is not a number"),
        ("postgresql:///gw", "the URL names no host"),
    ],
)
def test_a_database_url_that_cannot_be_used_is_an_error_at_its_line(
    tmp_path: Path, url: str, message: str
) -> None:
    path = write(tmp_path, f"gateway:\n  database: {url}\n" + MINIMAL)
    (error,) = errors_of(path)
    assert error.startswith(f"{path}:2: gateway.database: ") and message in error
    assert "s3cret" not in error


def test_a_password_file_needs_a_database_and_must_exist(tmp_path: Path) -> None:
    path = write(tmp_path, "gateway:\n  database_password_file: pw\n" + MINIMAL)
    (error,) = errors_of(path)
    assert "database_password_file is set, but database is null" in error
    path = write(
        tmp_path,
        "gateway:\n  database: postgresql://gw@db/gw\n  database_password_file: pw\n" + MINIMAL,
    )
    assert errors_of(path) == [
        f"{path}:3: gateway.database_password_file: file '{tmp_path / 'pw'}' does not exist"
    ]
