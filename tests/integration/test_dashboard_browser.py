"""The dashboard in a real browser (Debian's headless chromium, driven by Playwright),
against the whole gateway as a subprocess with the reference models.

A synthetic chest CT goes in by storescu, then its final report by MLLP with the same
accession number.  On the page, the study's timeline reaches "delivered" (the lung
model's result reached the EHR, an MLLP sink that accepts), and the concordance table
shows the study once the report is read.  No page shows the patient's name, identifier,
accession number or any UID; the page asks for nothing outside the gateway; a request
without a token is refused.  Screenshots are kept: in the test's folder, and copied to
``test-artifacts/`` at the top of the repository (ignored by git).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest

pytest.importorskip("torch")
pytest.importorskip("playwright.sync_api")

from playwright.sync_api import sync_playwright

from models.lung_nodules.synth import make_case
from tests.ctstudy import write_ct_series
from tests.dashboardkit import DashboardKit, make_dashboard
from tests.dicomgen import dcmtk_env, storescu_args
from tests.gatewayproc import REPO, GatewayProcess, write_config
from tests.hl7msgs import oru_r01, send_mllp
from tests.mllpsink import MLLPSink

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts"
PATIENT, PATIENT_ID, ACCESSION = "BROWSER^DASH^PATIENT", "PIDDASH42", "ACCDASH42"
SPACING = (0.7, 0.7, 2.5)

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make system-deps)"),
]


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> DashboardKit:
    return make_dashboard(tmp_path_factory.mktemp("browser-kit"))


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, kit: DashboardKit
) -> Iterator[GatewayProcess]:
    folder = tmp_path_factory.mktemp("browser")
    with MLLPSink() as ehr:  # accepts everything: results get delivered
        config = write_config(
            folder,
            dicom={"study_complete_after": 1},
            dashboard=kit.section(),
            destinations={"ehr": {"hl7": {"host": "127.0.0.1", "port": ehr.port}}},
            models={
                "lung-nodules": {"bundle": str(REPO / "models" / "lung_nodules"), "timeout": 120},
                "report-findings": {"bundle": str(REPO / "models" / "report_findings")},
            },
            routes=[
                {
                    "name": "chest-ct",
                    "when": {"dicom": {"Modality": "CT"}},
                    "run": ["lung-nodules"],
                    "send": ["ehr"],
                },
                {
                    "name": "reports",
                    "when": {"hl7": {"MSH-9": "ORU^R01"}},
                    "run": ["report-findings"],
                },
            ],
        )
        gw = GatewayProcess(config, folder / "gateway.log").start(timeout=90)
        yield gw
        gw.stop()


def keep(shot: Path) -> None:
    """Copy a screenshot to test-artifacts/ (a stable place, ignored by git)."""
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / shot.name)


def test_a_ct_study_and_its_report_show_on_the_dashboard_without_patient_data(
    gateway: GatewayProcess, kit: DashboardKit, tmp_path: Path
) -> None:
    case = make_case(
        np.random.default_rng(5), spacing=SPACING, nodules_mm=[((110.0, 150.0, 50.0), 14.0)]
    )
    paths = write_ct_series(
        case.volume,
        case.spacing,
        tmp_path / "ct",
        patient_name=PATIENT,
        patient_id=PATIENT_ID,
        accession=ACCESSION,
    )
    header = pydicom.dcmread(paths[0], stop_before_pixels=True)
    secrets = [PATIENT, "BROWSER", PATIENT_ID, ACCESSION, str(header.StudyInstanceUID),
               str(header.SeriesInstanceUID), str(header.SOPInstanceUID)]  # fmt: skip

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            # the test PKI's CA is not the browser's: its trust is checked by the API tests
            context = browser.new_context(
                ignore_https_errors=True, viewport={"width": 1400, "height": 900}
            )
            page = context.new_page()
            asked: list[str] = []
            page.on("request", lambda r: asked.append(r.url))

            # unauthenticated: the API refuses, the page asks for a token
            refused = context.request.get(gateway.http_url + "/api/studies")
            assert refused.status == 401
            assert refused.headers["www-authenticate"].startswith("Bearer")
            page.goto(gateway.http_url + "/")
            page.wait_for_selector("#login:not([hidden])")
            page.fill("#token", "a-token-nobody-has-0000")
            page.click("#login button[type=submit]")
            page.wait_for_selector("#login-error:has-text('refused')")

            page.fill("#token", kit.viewer)
            page.click("#login button[type=submit]")
            page.wait_for_selector("#who:has-text('ward-screen (viewer)')")
            page.wait_for_selector("#login", state="hidden")

            r = subprocess.run(storescu_args(paths, port=gateway.dicom_port), env=dcmtk_env(),
                               capture_output=True, text=True, timeout=120)  # fmt: skip
            assert r.returncode == 0, r.stdout + r.stderr

            page.click("#tabs button[data-view=studies]")
            delivered = page.wait_for_selector(
                "#studies-table tr[data-study] td[data-step=delivered][data-state=done]",
                timeout=150_000,
            )
            assert delivered is not None
            row = page.locator("#studies-table tr[data-study]").filter(
                has=page.locator("td[data-step=delivered][data-state=done]")
            )
            study = row.first.get_attribute("data-study")
            assert study is not None and len(study) == 12
            for step in ("received", "complete", "routed", "inferred", "results built"):
                assert (
                    row.first.locator(f"td[data-step='{step}']").get_attribute("data-state")
                    == "done"
                )
            studies_html = page.content()
            page.screenshot(path=tmp_path / "dashboard-studies.png", full_page=True)
            keep(tmp_path / "dashboard-studies.png")

            report = "FINDINGS: A 14 mm solid nodule in the right upper lobe.\nIMPRESSION: Nodule."
            oru = oru_r01(
                control_id="DASHREP1",
                text=report,
                accession=ACCESSION,
                mrn=PATIENT_ID,
                patient=PATIENT,
            )
            # python-hl7's client runs its own event loop: not in Playwright's thread
            with ThreadPoolExecutor(1) as pool:
                (ack,) = pool.submit(send_mllp, gateway.hl7_port, [oru]).result(timeout=60)
            assert b"MSA|AA|DASHREP1" in ack

            page.click("#tabs button[data-view=findings]")
            compared = page.wait_for_selector(
                f"#comparisons-table tr[data-study='{study}']", timeout=90_000
            )
            assert compared is not None
            assert "lung-nodule" in compared.inner_text() and "agree" in compared.inner_text()
            page.wait_for_selector("#concordance-table tbody tr:has-text('lung-nodules')")
            page.wait_for_function("() => window.Chart !== undefined")  # the shipped library ran
            findings_html = page.content()
            page.screenshot(path=tmp_path / "dashboard-findings.png", full_page=True)
            keep(tmp_path / "dashboard-findings.png")

            for view in ("queue", "dead", "destinations", "certificates"):
                page.click(f"#tabs button[data-view={view}]")
                page.wait_for_selector(f"#view-{view}:not([hidden]) tbody", state="attached")
                page.wait_for_selector("#updated:has-text('updated')")
            others = page.content()
        finally:
            browser.close()

    for html in (studies_html, findings_html, others):
        for secret in secrets:
            assert secret not in html, f"{secret!r} on the page"
    outside = [u for u in asked if not u.startswith(gateway.http_url + "/")]
    assert not outside, f"the page asked for something elsewhere: {outside}"
