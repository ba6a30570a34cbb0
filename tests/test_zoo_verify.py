"""The model zoo's CI checks of a bundle, offline, on this bundle root.

Project-MONAI/model-zoo ``ci/verify_bundle.py`` runs, in ``min`` mode: the bundle directory (large files fetched
from ``large_files.yml`` at the bundle root and checked by hash, the necessary ``configs/metadata.json`` and
``LICENSE``, the preferred ``models/model.pt`` and ``configs/inference.*``), version and changelog, the metadata
against the schema named in its ``schema`` field; in ``full`` mode also the network's input/output shapes
(``verify_net_in_out`` of ``network_def`` with the inference config) and a TorchScript export by scripting. These
tests are our own equivalents, run without network: the schema is the local copy in ``../shared/reference/``
(skipped when absent), and downloading is disabled so that a large file that is not already here with its hash
fails instead of being fetched. The TorchScript-by-scripting step is excluded (the zoo's
``exclude_verify_torchscript_list``), for the reason the model card gives.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
from monai.apps.utils import check_hash, download_url
from monai.bundle import ConfigParser, verify_metadata, verify_net_in_out

ROOT = Path(__file__).resolve().parents[1]
METADATA = ROOT / "configs" / "metadata.json"


def _large_files_file() -> Path:
    found = [ROOT / f"large_files.{s}" for s in ("json", "yaml", "yml") if (ROOT / f"large_files.{s}").is_file()]
    assert len(found) == 1, f"the zoo reads exactly one large_files.(json|yaml|yml) at the bundle root, found {found}"
    return found[0]


def _schema_copy() -> Path | None:
    name = json.loads(METADATA.read_text())["schema"].rsplit("/", 1)[-1]
    for parent in ROOT.parents:  # ../shared next to the bundle root (CI); a git worktree may sit deeper
        candidate = parent / "shared" / "reference" / name
        if candidate.is_file():
            return candidate
    return None


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted: the file is missing or its hash does not match")

    monkeypatch.setattr(urllib.request, "urlretrieve", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_large_files_are_present_with_their_hashes(no_network):
    parser = ConfigParser()
    parser.read_config(str(_large_files_file()))
    entries = parser.get()["large_files"]
    assert entries, "large_files lists nothing"
    for entry in entries:
        assert {"path", "url", "hash_val", "hash_type"} <= set(entry), entry
        path = ROOT / entry["path"]
        assert path.is_file(), f"{entry['path']} listed in large_files is not in the bundle"
        assert check_hash(str(path), entry["hash_val"], entry["hash_type"]), f"hash of {entry['path']} does not match"
        # the zoo's own step: download_url skips an existing file whose hash matches (here: must not download)
        download_url(url=entry["url"], filepath=str(path), hash_val=entry["hash_val"], hash_type=entry["hash_type"],
                     fuzzy=True, progress=False)


def test_bundle_directory_has_the_necessary_and_preferred_files():
    for necessary in ("configs/metadata.json", "LICENSE"):
        assert (ROOT / necessary).is_file(), f"necessary file {necessary} is missing"
    assert (ROOT / "models" / "model.pt").is_file(), "preferred file models/model.pt is missing"
    assert any((ROOT / "configs" / f"inference.{s}").is_file() for s in ("json", "yaml", "yml"))


def test_version_is_in_the_changelog_and_named_by_the_release_urls():
    metadata = json.loads(METADATA.read_text())
    version, changelog = metadata["version"], metadata["changelog"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), version
    assert version in changelog and changelog[version].strip()

    def key(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in v.split("."))

    assert version == max(changelog, key=key), "the version must be the newest changelog entry"
    parser = ConfigParser()
    parser.read_config(str(_large_files_file()))
    for entry in parser.get()["large_files"]:
        assert f"_v{version}_" in entry["url"], f"{entry['url']} does not name release {version}"


def test_metadata_validates_against_the_zoo_schema():
    schema = _schema_copy()
    if schema is None:
        pytest.skip("no local copy of the metadata schema in ../shared/reference/")
    verify_metadata(meta_file=str(METADATA), filepath=str(schema), create_dir=False)


def test_network_input_and_output_match_the_metadata():
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(METADATA),
        config_file=str(ROOT / "configs" / "inference.json"),
        device="cpu",
        bundle_root=str(ROOT),
    )


def test_model_card_gives_the_torchscript_exclusion_reason():
    card = (ROOT / "docs" / "README.md").read_text()
    section = card[card.index("## Model zoo checks"):]
    assert "TorchScript" in section and "verify_bundle.py" in section
