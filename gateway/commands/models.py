"""``gateway models list`` and ``gateway models run``: the registry, and one model run
offline, in this process, on files.

torch is imported inside :func:`models_run` only: every ``gateway`` command (``gateway
--help`` too) imports this module, and torch takes seconds to import and is an optional
dependency (``pip install -e '.[models]'``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from gateway.commands.base import Subparsers, needs_config
from gateway.config import Config
from gateway.errors import Permanent
from gateway.infer.bundles import Registry
from gateway.infer.runtime import (
    FilesInput,
    InputError,
    TextInput,
    load_model,
    pick_device,
    summarize,
)
from gateway.infer.text import identifiers_from_file, report_text_from_file
from gateway.security.deid import deidentify_text, reidentify


def register(sub: Subparsers) -> None:
    models = sub.add_parser("models", help="the configured models: list them, run one offline")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    mlist = needs_config(
        msub.add_parser(
            "list",
            help="name, version, input and weights hash of each configured model",
            description="Read each configured bundle (no torch needed). Exit 1 when a bundle "
            "cannot be read; the line says why.",
        ),
        models_list,
    )
    mlist.add_argument("--json", action="store_true", help="machine-readable output")
    mrun = needs_config(
        msub.add_parser(
            "run",
            help="run one model offline on DICOM files/folders or text/HL7 files",
            description="Run model NAME here, in this process, on INPUT: for an image model "
            "the DICOM files and folders given (one study; the bundle's series selection "
            "picks the series), for a note model each text or HL7 file in turn (report "
            "text from OBX TX/FT/ST). Prints the findings. Nothing is sent or stored.",
        ),
        models_run,
    )
    mrun.add_argument("name", metavar="NAME", help="a model name from the config's models:")
    mrun.add_argument("inputs", nargs="+", type=Path, metavar="INPUT")
    mrun.add_argument("--json", action="store_true", help="print the whole result as JSON")
    mrun.add_argument("--mask", type=Path, metavar="FILE.npy", help="save the mask (image models)")
    mrun.add_argument("--threads", type=int, default=0, metavar="N", help="torch threads")
    mrun.add_argument("--device", default="auto", help="auto (default), cpu or cuda")


def models_list(cfg: Config, args: argparse.Namespace, out: TextIO) -> int:
    registry = Registry.from_config(cfg.models, cfg.base_dir)
    if args.json:
        rows: list[dict[str, Any]] = [
            {**m.identity, "input": m.input, "bundle_path": str(m.root)} for m in registry
        ]
        rows += [{"name": n, "error": e} for n, e in registry.problems.items()]
        json.dump(rows, out, indent=2)
        out.write("\n")
        return 1 if registry.problems else 0
    if not cfg.models:
        print(f"no models configured in {cfg.source} (add them under models:)", file=out)
        return 0
    header = ("NAME", "VERSION", "INPUT", "WEIGHTS SHA256", "BUNDLE")
    table = [header] + [
        (m.name, m.version, m.input, m.weights_sha256[:16] or "-", str(m.root)) for m in registry
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print(
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1],
            file=out,
        )
    for name, problem in registry.problems.items():
        print(f"{name}: UNAVAILABLE: {problem}", file=out)
    return 1 if registry.problems else 0


def _dicom_files(inputs: list[Path]) -> list[str]:
    files: list[str] = []
    for path in inputs:
        if path.is_dir():
            files += sorted(str(p) for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            files.append(str(path))
        else:
            raise Permanent(f"{path}: no such file or folder")
    return files


def models_run(cfg: Config, args: argparse.Namespace, out: TextIO) -> int:
    import torch  # lazily: see the module docstring

    registry = Registry.from_config(cfg.models, cfg.base_dir)
    if args.name not in cfg.models:
        known = ", ".join(sorted(cfg.models)) or "none"
        raise Permanent(f"no model '{args.name}' in {cfg.source} (configured: {known})")
    info = registry.get(args.name)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    model = load_model(info, pick_device(args.device))
    loaded_s = time.monotonic() - started
    if not args.json:
        print(
            f"{info.name} {info.version} ({info.input}, weights {info.weights_sha256[:16]}, "
            f"{model.device}) loaded in {loaded_s:.1f} s",
            file=out,
        )
    deidentify = cfg.models[args.name].deidentify  # run it as the gateway would
    if deidentify and not args.json:
        print("input de-identified first, as the gateway gives it (deidentify: true)", file=out)
    runs: list[tuple[str, Any]] = []
    if info.input == "text":
        for path in args.inputs:
            text = report_text_from_file(path)
            if deidentify:
                text = deidentify_text(text, identifiers_from_file(path))
            runs.append((str(path), TextInput(text)))
    else:
        files = _dicom_files(args.inputs)
        runs.append((", ".join(str(p) for p in args.inputs), FilesInput(tuple(files), deidentify)))
    results = []
    failed = 0
    for label, model_input in runs:
        try:
            result = model.run(model_input, threads=args.threads or None)
        except InputError as exc:
            failed += 1
            print(f"{label}: cannot run {info.name}: {exc.message}", file=out)
            continue
        mask = result.pop("mask", None)
        if "crosswalk" in result:
            crosswalk = result.pop("crosswalk")
            result = reidentify(result, crosswalk)  # findings name the files' own UIDs
        if args.mask is not None and mask is not None:
            np.save(args.mask, mask)
        if args.json:
            results.append({"input": label, **result})
            continue
        lines = summarize(result)
        print(f"{label}: {len(result['findings'])} findings in {result['seconds']:.2f} s", file=out)
        for line in lines or ["(no findings)"]:
            print(f"  {line}", file=out)
        if args.mask is not None and mask is not None:
            print(f"  mask {tuple(mask.shape)} saved to {args.mask}", file=out)
    if args.json:
        json.dump(results, out, indent=2)
        out.write("\n")
    return 1 if failed else 0
