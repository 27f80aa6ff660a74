"""Property-based tests of the running gateway's HTTP API against its own OpenAPI schema
(schemathesis): every operation, with generated parameters (valid and not), as an
operator over HTTPS, answers with a documented status code, a documented content type
and a body that fits the schema, and never a server error.  A few examples per
operation keep it to seconds."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("schemathesis")

import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.dashboardkit import DashboardKit, make_dashboard
from tests.gatewayproc import GatewayProcess, write_config

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> DashboardKit:
    return make_dashboard(tmp_path_factory.mktemp("schema-kit"))


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, kit: DashboardKit
) -> Iterator[GatewayProcess]:
    folder = tmp_path_factory.mktemp("schema")
    gw = GatewayProcess(write_config(folder, dashboard=kit.section()), folder / "gateway.log")
    gw.start()
    yield gw
    gw.stop()


def test_every_operation_answers_as_its_schema_says(
    gateway: GatewayProcess, kit: DashboardKit
) -> None:
    """Each operation of the schema the gateway serves, with generated cases.  (Driven
    with hypothesis directly: schemathesis' lazy pytest fixture does not run on pytest 9.)"""
    ca = str(kit.pki.ca_cert)
    schema = schemathesis.openapi.from_url(gateway.http_url + "/openapi.json", verify=ca)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    tried: list[str] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=8,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        def check(case: Any) -> None:
            case.call_and_validate(headers=kit.bearer(kit.operator), verify=ca)

        check()
        tried.append(f"{operation.method.upper()} {operation.path}")
    assert "POST /api/dead/{job_id}/replay" in tried
