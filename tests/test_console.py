"""The command line's one list of user ids: the README table is it, its defaults are the configs' values, and
--help prints it; Ignite's per-run lines are kept out of a run's log unless ELASTIC_HYPERMORPH_DEBUG is set."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from ignite.engine import Engine
from monai.bundle import ConfigParser

from elastic_hypermorph_bundle.cli import check_overrides
from elastic_hypermorph_bundle.console import USER_IDS, QuietEngineLog, ids_table
from elastic_hypermorph_bundle.losses.regularizers import REGULARIZERS
from elastic_hypermorph_bundle.losses.similarity import SIMILARITIES

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "inference": ["inference.json", "evaluate.json"],
    "train": ["train.json"],
    "apply": ["apply.json"],
    "sweep": ["inference.json", "sweep.json"],
}
MAIN = "/site-packages/monai/bundle/__main__.py"  # argv[0] of `python -m monai.bundle`


def _configs() -> dict[str, dict]:
    return {name: ConfigParser.load_config_files([str(ROOT / "configs" / f) for f in files])
            for name, files in CONFIGS.items()}


def _spellings(value) -> set[str]:
    """How a config literal may be written in the table's default column (spaces and backticks removed)."""
    if value is None:
        return {"none"}
    if isinstance(value, bool):
        return {str(value).lower()}
    if isinstance(value, (int, float)):
        return {f"{value:g}", f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e")}
    if isinstance(value, list):
        return {"[" + ",".join(f"{v:g}" for v in value) + "]"}
    return {str(value)}


def test_the_readme_table_is_the_one_list():
    readme = (ROOT / "README.md").read_text()
    assert ids_table() in readme


def test_every_id_exists_and_its_stated_default_is_the_configs_value():
    configs = _configs()
    for ids, _, default in USER_IDS:
        stated = default.replace("`", "").replace(" ", "")
        for config_id in ids:
            holders = {name: config[config_id] for name, config in configs.items() if config_id in config}
            assert holders, f"{config_id} is in the table but no config defines it"
            for name, value in holders.items():
                if isinstance(value, dict) or (isinstance(value, str) and value.startswith(("$", "@"))):
                    continue  # an expression (a path, the device, a reference): the table describes it in words
                assert any(s in stated for s in _spellings(value)), (config_id, name, value, default)


@pytest.mark.parametrize("config_id, table", [("regularizer", REGULARIZERS), ("similarity", SIMILARITIES),
                                               ("instance_similarity", SIMILARITIES)])
def test_the_choices_shown_are_the_rows_of_their_table(config_id, table):
    """--help and the README name every row of the regularizer and similarity tables, and nothing else: console
    sits below losses in the layering (tests/test_layering.py), so it cannot read the tables, and this test is the
    link that makes a new row show up."""
    (meaning,) = [meaning for ids, meaning, _ in USER_IDS if ids[0] == config_id]
    named = {word for word in re.findall(r"`([^`]+)`", meaning) if word.isidentifier()}
    assert named == set(table), (config_id, sorted(named), sorted(table))


def test_help_prints_the_ids_of_the_loaded_configs_with_their_values(capsys):
    argv = [MAIN, "run", "--config_file", str(ROOT / "configs" / "apply.json"), "--help"]
    with pytest.raises(SystemExit) as stop:
        check_overrides(argv)
    assert stop.value.code == 0
    shown = capsys.readouterr().out
    assert "--points_space voxel, --points_direction fixed_to_moving, --moving_grid none" in shown
    assert "--lam" not in shown  # apply.json has no hyperparameters


@pytest.mark.parametrize("debug, level", [("", logging.WARNING), ("1", logging.NOTSET)])
def test_engine_lines_are_quiet_unless_debugging(monkeypatch, debug, level):
    monkeypatch.setenv("ELASTIC_HYPERMORPH_DEBUG", debug)
    engine = Engine(lambda engine, batch: None)
    engine.logger = logging.getLogger(f"test_console.engine{debug}")
    QuietEngineLog().attach(engine)
    assert engine.logger.level == level
