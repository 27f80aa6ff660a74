"""Run the DICOM validators on objects the gateway makes: dicom3tools' ``dciodvfy``
(IOD, modules, attributes, SR content constraints) and dcmtk's ``dsrdump`` (SR parse).

Both tools read files, so a ``Dataset`` is written to a temporary file first.  A missing
tool skips the calling test (``pytest.skip``) rather than failing it.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from pydicom import Dataset

__all__ = ["dciodvfy_errors", "dciodvfy_report", "dsrdump_ok"]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def _run_on(ds_or_path: Dataset | Path | str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    if isinstance(ds_or_path, Dataset):
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "object.dcm"
            ds_or_path.save_as(path, enforce_file_format=True)
            return _run_on(path, argv)
    return subprocess.run(
        [*argv, str(ds_or_path)], capture_output=True, text=True, timeout=60, check=False
    )


def dciodvfy_report(ds_or_path: Dataset | Path | str) -> tuple[list[str], list[str]]:
    """``dciodvfy``'s (errors, warnings): its ``Error ...`` and ``Warning ...`` lines
    (it reports on stderr)."""
    done = _run_on(ds_or_path, [_tool("dciodvfy")])
    lines = [line.strip() for line in (done.stderr + done.stdout).splitlines()]
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    if done.returncode != 0 and not errors:
        errors.append(f"dciodvfy exited {done.returncode}: {' | '.join(lines[-3:])}")
    return errors, warnings


def dciodvfy_errors(ds_or_path: Dataset | Path | str) -> list[str]:
    """``dciodvfy``'s error lines; empty when the object is valid."""
    return dciodvfy_report(ds_or_path)[0]


def dsrdump_ok(ds_or_path: Dataset | Path | str) -> tuple[bool, str]:
    """(``dsrdump`` parsed the SR without complaint, its output)."""
    done = _run_on(ds_or_path, [_tool("dsrdump")])
    output = done.stdout + done.stderr
    complaints = [
        line
        for line in output.splitlines()
        if line.startswith(("E:", "F:")) or "error" in line.lower()
    ]
    return done.returncode == 0 and not complaints, output
