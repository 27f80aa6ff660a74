"""docs/architecture.md names the code as it is: every module it names exists, every module
of gateway/ is named in it, and its Layers section names every layer of the import
contract that tests/unit/test_layers.py enforces."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "architecture.md"
NAMED = re.compile(r"`(gateway/[\w/]*?(?:\.py)?)/?`")


def _named(text: str) -> set[str]:
    return {m.group(1).rstrip("/") for m in NAMED.finditer(text)}


def test_every_module_the_doc_names_exists() -> None:
    missing = sorted(p for p in _named(DOC.read_text()) if not (REPO / p).exists())
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"


def test_every_module_of_the_package_is_in_the_doc() -> None:
    named = _named(DOC.read_text())
    modules = {
        str(p.relative_to(REPO))
        for p in (REPO / "gateway").rglob("*.py")
        if p.name != "__init__.py"
    }
    absent = sorted(modules - named)
    assert not absent, f"docs/architecture.md does not say what these modules own: {absent}"


def test_the_layers_section_names_every_layer_of_the_contract() -> None:
    text = DOC.read_text()
    section = text[text.index("## Layers") :]
    section = section[: section.index("\n## ", 1)]
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    (contract,) = config["tool"]["importlinter"]["contracts"]
    layer_modules = {
        name.strip(" ()").replace(".", "/")
        for layer in contract["layers"]
        for name in re.split(r"[|:]", layer)
    }
    named = _named(section)
    in_doc = {n.removesuffix(".py") for n in named}
    assert layer_modules <= in_doc, f"layers missing from the doc: {layer_modules - in_doc}"


def test_the_name_pattern_reads_paths_as_written() -> None:
    assert _named("`gateway/hl7/` and `gateway/app.py`, not gateway/x.py") == {
        "gateway/hl7",
        "gateway/app.py",
    }
