"""configs/metadata.json's eval_metrics are the model card's numbers, and the file still validates against the
model zoo's schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT.parent / "shared" / "reference" / "meta_schema_20240725.json"
ROWS = {
    "realistic_test": "realistic (test split",
    "default_phantom_test": "default phantom",
    "real_ct_test": "realistic on the cropped CT",
    "heldout_anatomy_test": "**held-out anatomy**",
}


def test_eval_metrics_are_the_cards_network_alone_column():
    metrics = json.loads((ROOT / "configs" / "metadata.json").read_text())["eval_metrics"]
    card = (ROOT / "docs" / "README.md").read_text()
    assert f"## Released model (version {metrics['release']})" in card
    header = next(line for line in card.splitlines() if line.startswith("| held-out pairs |"))
    column = [cell.strip() for cell in header.strip("|").split("|")].index(f"{metrics['release']} network")
    for key, start in ROWS.items():
        row = next(line for line in card.splitlines() if line.startswith(f"| {start}"))
        cell = [cell.replace("*", "").strip() for cell in row.strip("|").split("|")][column]
        assert cell == f"{metrics[f'{key}_tre_mm']:.2f} mm, {metrics[f'{key}_lung_dice']:.3f}", (key, cell)


def test_metadata_validates_against_the_zoo_schema():
    jsonschema = pytest.importorskip("jsonschema")
    if not SCHEMA.is_file():
        pytest.skip("the model zoo's schema is not on this machine")
    jsonschema.validate(json.loads((ROOT / "configs" / "metadata.json").read_text()), json.loads(SCHEMA.read_text()))


def test_the_citation_names_the_bundles_version():
    yaml = pytest.importorskip("yaml")
    version = json.loads((ROOT / "configs" / "metadata.json").read_text())["version"]
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["version"] == version and "2311.08239" in str(citation["preferred-citation"])
    assert f"version = {{{version}}}" in (ROOT / "docs" / "README.md").read_text()  # the card's BibTeX
