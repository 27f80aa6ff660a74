"""``gateway models list`` and ``gateway models run``: the registry, and one model run
offline, in this process, on files."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from gateway.config import Config
from gateway.errors import Permanent
from gateway.infer.bundles import Registry


def models_list(cfg: Config, as_json: bool, out: TextIO) -> int:
    registry = Registry.from_config(cfg.models, cfg.base_dir)
    if as_json:
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
    import torch

    from gateway.infer.runtime import (
        FilesInput,
        InputError,
        TextInput,
        load_model,
        pick_device,
        summarize,
    )
    from gateway.infer.text import identifiers_from_file, report_text_from_file
    from gateway.security.deid import reidentify, scrub_text

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
                text = scrub_text(text, identifiers_from_file(path))
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
