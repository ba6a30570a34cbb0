"""Bad inputs and faults, second round (issue 24): nothing outside the output folder touched, nothing silently
wrong, and one clear line for each refused input. In-process and small (16^3-32^3): a few seconds each."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from elastic_hypermorph_bundle.workflow.writers import OutputFiles

ROOT = Path(__file__).resolve().parents[1]


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def _write(files: OutputFiles, *names: str) -> None:
    for name in names:
        files.new(name).write_text(f"{name} of this run")


# ------------------------------------------------------------------ 1. records never reach outside the folder


@pytest.mark.parametrize("escape", ["../victim.txt", "../X2/deep.txt", "absolute", "link/inside.txt"])
def test_an_overwrite_refuses_a_record_naming_a_file_outside_the_output_folder(tmp_path, escape):
    out, other = tmp_path / "X", tmp_path / "X2"
    out.mkdir()
    other.mkdir()
    victim, deep = tmp_path / "victim.txt", other / "deep.txt"
    victim.write_text("user file")
    deep.write_text("user file")
    named = {"absolute": str(victim), "link/inside.txt": "link/inside.txt"}.get(escape, escape)
    if escape == "link/inside.txt":  # a folder inside that is a link to one outside
        (other / "inside.txt").write_text("user file")
        (out / "link").symlink_to(other, target_is_directory=True)
    (out / OutputFiles.MANIFEST).write_text(json.dumps({"files": [named]}))
    before = {**_tree(tmp_path)}
    files = OutputFiles(out, overwrite=True)
    with pytest.raises(ValueError, match=rf"{re.escape(OutputFiles.MANIFEST)}.*{re.escape(named)}.*outside"):
        files.run(lambda: _write(files, "metrics.csv"))
    assert _tree(tmp_path) == before and other.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X", "X2", "victim.txt"]  # no staging folder left


def test_an_overwrite_removes_only_the_earlier_files_never_a_folder_it_did_not_make(tmp_path):
    out = tmp_path / "out"
    first = OutputFiles(out)
    first.run(lambda: _write(first, "a/ddf.nii.gz", "metrics.csv"))
    (out / "user").mkdir()  # an empty folder of the user's, e.g. made for notes
    second = OutputFiles(out, overwrite=True)
    second.run(lambda: _write(second, "metrics.csv"))
    assert set(_tree(out)) == {"metrics.csv", OutputFiles.MANIFEST}
    assert (out / "user").is_dir() and not (out / "a").exists()


def test_an_output_path_is_refused_if_it_leaves_the_output_folder(tmp_path):
    files = OutputFiles(tmp_path / "out")
    with pytest.raises(ValueError, match=r"\.\./escape\.txt.*outside"):
        files.new("../escape.txt")


# -------------------------------------- 2. an existing file is no output folder; writability checked before work


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_existing_file_as_output_dir_is_refused_before_any_work(tmp_path, overwrite):
    afile = tmp_path / "afile"
    afile.write_text("user file")
    files = OutputFiles(afile, overwrite=overwrite)
    worked = []
    with pytest.raises(NotADirectoryError, match=rf"output_dir {afile} is a file"):
        files.run(lambda: worked.append(1))
    assert not worked and afile.read_text() == "user file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    below = OutputFiles(afile / "sub", overwrite=overwrite)
    with pytest.raises(NotADirectoryError, match=rf"{afile} is a file"):
        below.run(lambda: worked.append(1))
    assert not worked and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_read_only_output_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    from elastic_hypermorph_bundle.workflow import writers

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("user file")
    out.chmod(0o555)
    if os.access(out, os.W_OK):  # root writes into read-only folders: ask the kernel's answer for a user
        access = os.access
        monkeypatch.setattr(writers.os, "access", lambda path, mode: Path(path) != out and access(path, mode))
    try:
        files = OutputFiles(out, overwrite=True)
        worked = []
        with pytest.raises(PermissionError, match=rf"output_dir {out} is not writable"):
            files.run(lambda: worked.append(1))
        assert not worked and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
        # a folder still to be made below a read-only one: named before any work too
        below = OutputFiles(out / "new" / "deeper")
        with pytest.raises(PermissionError, match=rf"cannot be created: {out} is not writable"):
            below.run(lambda: worked.append(1))
        assert not worked and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    finally:
        out.chmod(0o755)
