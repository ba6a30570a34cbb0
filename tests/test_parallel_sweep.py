"""The sweep across processes (``configs/multi_gpu_sweep.json`` under ``torchrun``): the pairs split across
processes, their rows merged into the one table a single process writes, and a run interrupted across processes
resumed from its parts."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from elastic_hypermorph_bundle.discovery.parallel import merge_parts, part_path, share
from elastic_hypermorph_bundle.hyperparams import HyperSpace
from elastic_hypermorph_bundle.networks import HyperUNet
from elastic_hypermorph_bundle.simulation.dataset import make_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["grid_index", "lam", "pair_id", "tre_mm"]


def _table(path: Path, rows: list[list], cut: str = "") -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
        handle.write(cut)


def test_share_gives_each_item_to_exactly_one_process():
    items = list(range(7))
    shares = [share(items, rank, 3) for rank in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]] and share(items) == items  # no process group: everything


def test_merge_orders_rows_as_one_process_keeps_each_once_and_removes_the_parts(tmp_path):
    table = tmp_path / "sweep.csv"
    _table(table, [[0, 0.0, "b", 1.5]])
    _table(part_path(table, 0), [[0, 0.0, "a", 1.0], [1, 0.5, "a", 2.0]], cut="2,1.0,a,")  # cut by a kill
    _table(part_path(table, 1), [[1, 0.5, "b", 2.5], [0, 0.0, "b", 9.9]])  # (0, b) is already in the table
    assert merge_parts(table, COLUMNS, ["a", "b"]) == 3
    with table.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows == [COLUMNS, ["0", "0.0", "a", "1.0"], ["0", "0.0", "b", "1.5"], ["1", "0.5", "a", "2.0"],
                    ["1", "0.5", "b", "2.5"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.csv"]
    assert merge_parts(table, COLUMNS, ["a", "b"]) == 0  # nothing left to merge
    part_path(table, 0).write_text("grid_index,mu,pair_id,tre_mm\r\n")
    with pytest.raises(ValueError, match="belongs to another configuration"):
        merge_parts(table, COLUMNS, ["a", "b"])


def _sweep(dataset: Path, ckpt: Path, output_dir: Path, processes: int) -> subprocess.CompletedProcess:
    configs = ["inference.json", "sweep.json", *(["multi_gpu_sweep.json"] if processes > 1 else [])]
    launcher = [sys.executable, "-m", "monai.bundle"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                    "-m", "monai.bundle"]
    command = [
        *launcher, "run", "sweep", "--config_file", str([str(ROOT / "configs" / name) for name in configs]),
        "--bundle_root", str(ROOT), "--meta_file", str(ROOT / "configs" / "metadata.json"),
        "--dataset_dir", str(dataset), "--split", "all", "--ckpt_dir", str(ckpt.parent), "--output_dir",
        str(output_dir), "--spatial_size", "[16, 16, 16]", "--grid_size", "2", "--refine_steps", "1",
        "--progress", "false", "--sweep_instance_steps", "1", "--prealign", "none",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=output_dir.parent, env=env, capture_output=True, text=True, timeout=600)


def _rows(path: Path) -> list[dict]:
    """The table's rows without their timings (which differ from run to run)."""
    with path.open(newline="") as handle:
        return [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in csv.DictReader(handle)]


@pytest.mark.slow
def test_two_processes_write_the_table_and_summary_of_one_and_resume_from_their_parts(tmp_path, save_model):
    """Also the sweep from the bundle config (``monai.bundle run sweep``, one process): its summary, its table, and
    the pipeline it scores (instance optimisation is on by default in ``sweep.json``)."""
    dataset = make_synthetic_dataset(tmp_path / "LungCT", num_pairs=3, spatial_size=(16, 16, 16), seed=3)
    kwargs = {"spatial_dims": 3, "in_channels": 2, "hyper_dims": 2, "encoder_features": [4, 8, 8],
              "decoder_features": [8, 8, 8, 4], "hyper_hidden": 16, "hyper_layers": 2}
    torch.manual_seed(0)
    ckpt = save_model(tmp_path / "models", HyperUNet(**kwargs), HyperSpace(), kwargs, spatial_size=(16, 16, 16))
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"sweep_{processes}"
        done = _sweep(dataset, ckpt, out, processes)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[processes] = out
    one, two = runs[1], runs[2]
    summary = json.loads((one / "summary.json").read_text())
    assert summary["criterion"]["name"] == "dice" and summary["num_grid_points"] == 4 and summary["num_pairs"] == 3
    # the sweep scores the pipeline (network columns beside it), as by default, and the gradient refinement, which
    # differentiates the network alone, says why it did not run
    assert json.loads((ROOT / "configs" / "sweep.json").read_text())["sweep_instance_steps"] > 0
    assert "network_dice_mean" in _rows(one / "sweep.csv")[0]
    assert "pipeline" in summary["refinement"]["skipped"]
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # no part left
    assert len(_rows(one / "sweep.csv")) == 12 and _rows(two / "sweep.csv") == _rows(one / "sweep.csv")
    summaries = [json.loads((out / "summary.json").read_text()) for out in (one, two)]
    for summary in summaries:
        summary["registration"].pop("seconds_per_row"), summary["instance_optimization"].pop("seconds_per_pair")
    assert summaries[0] == summaries[1] and summaries[1]["evaluations"]["grid_computed_this_run"] == 12

    # a run across processes killed midway: 5 rows merged, 3 in process 1's part (the last one cut), 4 missing
    rows = (one / "sweep.csv").read_text().splitlines(keepends=True)
    (two / "sweep.csv").write_text("".join(rows[:6]))
    part_path(two / "sweep.csv", 1).write_text(rows[0] + "".join(rows[6:9]) + rows[9][:7])
    (two / "summary.json").unlink()
    done = _sweep(dataset, ckpt, two, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["evaluations"]["grid_computed_this_run"] == 4
    assert _rows(two / "sweep.csv") == _rows(one / "sweep.csv") and not list(two.glob("sweep.csv.part*"))
