"""``gateway explain``: which route a DICOM file/folder or HL7 message takes, and why."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

from gateway.commands.base import Subparsers, needs_config
from gateway.config import Config
from gateway.errors import MalformedInput
from gateway.route import decide
from gateway.route.attributes import subjects_in
from gateway.route.keywords import routing_keywords


def register(sub: Subparsers) -> None:
    p = needs_config(
        sub.add_parser(
            "explain",
            help="dry run: which route a DICOM file/folder or HL7 message takes",
            description="For each INPUT (a DICOM file, a folder of DICOM files = one study per "
            "StudyInstanceUID, or an HL7 file with one or more messages): the matching route, "
            "the models it would run and where results would go. Reads the config and the "
            "inputs only: no network, nothing written. Exit 1 if an input cannot be read.",
        ),
        explain,
    )
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT")
    p.add_argument("-v", "--verbose", action="store_true", help="why each route was tried")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--calling-ae",
        metavar="AE",
        help="calling AE title to assume for DICOM inputs (routes on calling_ae)",
    )


def explain(cfg: Config, args: argparse.Namespace, out: TextIO) -> int:
    """``gateway explain``: routing as a dry run.  Only the config and the inputs are read."""

    def where(name: str) -> dict[str, str]:
        dest = cfg.destinations[name]
        tls = " TLS" if (dest.dicom or dest.hl7).tls else ""  # type: ignore[union-attr]
        if dest.dicom is not None:
            d = dest.dicom
            return {
                "name": name,
                "kind": "dicom",
                "address": f"{d.ae_title}@{d.host}:{d.port}",
                "text": f"{name} (DICOM{tls} {d.ae_title}@{d.host}:{d.port})",
            }
        h = dest.hl7
        assert h is not None
        address = f"{h.application}^{h.facility}@{h.host}:{h.port}"
        return {
            "name": name,
            "kind": "hl7",
            "address": address,
            "text": f"{name} (HL7{tls} {address})",
        }

    failed = False
    report: list[dict[str, object]] = []
    for path in args.inputs:
        try:
            subjects = subjects_in(path, args.calling_ae, routing_keywords(cfg.routes))
        except MalformedInput as exc:
            print(f"gateway: error: {exc.message}", file=sys.stderr)
            failed = True
            continue
        for subject in subjects:
            decision = decide(subject.attrs, cfg.routes)
            send = [where(n) for n in decision.send]
            forward = [where(n) for n in decision.forward]
            if args.json:
                report.append(
                    {
                        "input": subject.label,
                        "kind": subject.attrs.kind,
                        **subject.ids,
                        "route": decision.route,
                        "run": list(decision.run),
                        "send": [{k: v for k, v in d.items() if k != "text"} for d in send],
                        "forward": [{k: v for k, v in d.items() if k != "text"} for d in forward],
                        "reasons": list(decision.reasons),
                    }
                )
                continue
            outcome = (
                f"route '{decision.route}'"
                if decision.matched
                else "no route matches: stored, logged, not processed"
            )
            print(f"{subject.label}: {subject.summary} → {outcome}", file=out)
            if args.verbose:
                for reason in decision.reasons or ("no routes configured",):
                    print(f"  {reason}", file=out)
            if decision.run:
                print(f"  run: {', '.join(decision.run)}", file=out)
            if send:
                print(f"  send results to: {', '.join(d['text'] for d in send)}", file=out)
            if forward:
                print(
                    f"  forward as received to: {', '.join(d['text'] for d in forward)}", file=out
                )
            if decision.matched and not (decision.run or send or forward):
                print("  (the route names no models and no destinations)", file=out)
    if args.json:
        json.dump(report, out, indent=2)
        out.write("\n")
    return 1 if failed else 0
