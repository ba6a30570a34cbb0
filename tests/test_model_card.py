"""The model card (``model.json``): round trip, the cards earlier trainings wrote, the checks a run's settings
go through (network, preprocessing), and boolean ids parsed one way in the configs that build the network."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from elastic_hypermorph_bundle import __version__
from elastic_hypermorph_bundle.hyperparams import HyperSpace
from elastic_hypermorph_bundle.model_card import ModelCard, build_network, check_run
from elastic_hypermorph_bundle.networks import HyperUNet
from elastic_hypermorph_bundle.workflow import amp_enabled, parse_flag

ROOT = Path(__file__).resolve().parents[1]
KWARGS = {"spatial_dims": 3, "in_channels": 2, "hyper_dims": 2, "encoder_features": [4], "decoder_features": [4, 4],
          "hyper_hidden": 8, "hyper_layers": 2, "diffeomorphic": False}
#: the card as training wrote it before hu_window was recorded (a released model may carry one)
EARLIER_CARD = {
    "regularizer": "elastic", "names": ["lam", "mu"], "ranges": [[0.0, 1.0], [0.0, 2.0]],
    "hyper_sampling": "log_uniform", "network": {"name": "HyperUNet", "kwargs": KWARGS},
    "spatial_size": [32, 32, 32], "pixdim": None, "split_file": "eval/split.json", "training": {"learning_rate": 1e-4},
    "package_version": "0.1.0", "epochs": 3, "weights": "best", "key_metric": "val_mean_dice", "best_metric": 0.5,
    "best_metric_epoch": 2,
}  # fmt: skip


@pytest.fixture
def model(tmp_path, save_model) -> Path:
    torch.manual_seed(0)
    return save_model(tmp_path, HyperUNet(**KWARGS), HyperSpace(mu_range=(0, 2)), KWARGS, spatial_size=(32, 32, 32),
                      pixdim=(1.5, 1.5, 1.5), hu_window=(-1000, 400), epochs=3)


def test_round_trip_keeps_space_network_and_preprocessing(model):
    card = ModelCard.load(model)  # the checkpoint's path finds the card beside it
    assert card.hyper_space.ranges == ((0.0, 1.0), (0.0, 2.0)) and card.info["epochs"] == 3
    assert card.preprocessing == {"spatial_size": [32, 32, 32], "pixdim": [1.5, 1.5, 1.5], "hu_window": [-1000.0, 400.0]}
    network = card.build_network(default_hyper=[0.2, 0.1])
    assert isinstance(network, HyperUNet) and network.default_hyper.flatten().tolist() == pytest.approx([0.2, 0.1])
    network.load_state_dict(torch.load(model, weights_only=True))
    again = ModelCard.from_dict(json.loads(json.dumps(card.to_dict())))
    assert again.to_dict() == card.to_dict() and card.to_dict()["package_version"] == __version__


def test_earlier_cards_load_with_the_window_they_were_trained_with(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps(EARLIER_CARD))
    card = ModelCard.load(tmp_path / "model.json")
    assert card.hyper_space.sampling == "log_uniform" and card.hyper_space.ranges[1] == (0.0, 2.0)
    assert card.preprocessing == {"spatial_size": [32, 32, 32], "pixdim": None, "hu_window": [-1000.0, 500.0]}
    assert card.info["best_metric"] == 0.5 and card.info["training"] == {"learning_rate": 1e-4}
    card.check_preprocessing([32, 32, 32], None, (-1000, 500))
    rewritten = card.to_dict()
    kwargs = rewritten["network"].pop("kwargs")
    assert kwargs["hyper_rank"] is None  # before the rank-limited map, every model had the full map
    assert {k: kwargs[k] for k in KWARGS} == KWARGS and kwargs["integration_steps"] == 7  # defaults recorded
    assert {k: v for k, v in rewritten.items() if k != "hu_window"} == {**EARLIER_CARD, "network": {"name": "HyperUNet"}}
    card.build_network().load_state_dict(HyperUNet(**KWARGS, hyper_rank=None).state_dict())


def test_not_a_card_is_refused_by_name(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps({"names": ["lam", "mu"]}))
    with pytest.raises(ValueError, match=r"model.json lacks \['regularizer', 'ranges', 'network'\]"):
        ModelCard.load(tmp_path / "model.pt")
    with pytest.raises(FileNotFoundError, match="model card not found"):
        ModelCard.load(tmp_path / "other" / "model.pt")


def test_preprocessing_mismatch_names_both_values_and_the_override(model, caplog):
    card = ModelCard.load(model)
    with pytest.raises(ValueError, match=r"--spatial_size \[192, 192, 208\] \(trained: \[32, 32, 32\]\)") as error:
        card.check_preprocessing([192, 192, 208], [1.5, 1.5, 1.5], [-1000, 400])
    assert "--allow_preprocessing_mismatch true" in str(error.value)
    with pytest.raises(ValueError, match=r"--hu_window \[-1000.0, 500.0\] \(trained: \[-1000.0, 400.0\]\)"):
        check_run(model, "HyperUNet", KWARGS, [32, 32, 32], [1.5, 1.5, 1.5], [-1000, 500])
    with pytest.raises(ValueError, match=r"--pixdim null \(trained: \[1.5, 1.5, 1.5\]\)"):
        check_run(model, "HyperUNet", KWARGS, [32, 32, 32], None, [-1000, 400])
    with caplog.at_level(logging.WARNING, logger="elastic_hypermorph_bundle"):
        check_run(model, "HyperUNet", KWARGS, [64, 64, 64], [1.5, 1.5, 1.5], [-1000, 400],
                  allow_preprocessing_mismatch="true")
    assert "running anyway" in caplog.text
    with pytest.raises(ValueError, match="--allow_preprocessing_mismatch must be true or false"):
        check_run(model, "HyperUNet", KWARGS, [32, 32, 32], [1.5, 1.5, 1.5], [-1000, 400], "maybe")
    check_run(model, "HyperUNet", KWARGS, (32, 32, 32), (1.5, 1.5, 1.5), (-1000, 400))  # the trained values pass


def test_boolean_network_ids_are_parsed(model):
    card = ModelCard.load(model)
    card.check_network("HyperUNet", {**KWARGS, "diffeomorphic": "false"})  # as the command line gives it
    with pytest.raises(ValueError, match="diffeomorphic=True"):
        card.check_network("HyperUNet", {**KWARGS, "diffeomorphic": "TRUE"})
    assert not build_network("HyperUNet", {**KWARGS, "diffeomorphic": "false"}).diffeomorphic
    assert build_network("HyperUNet", {**KWARGS, "diffeomorphic": "true"}).diffeomorphic
    with pytest.raises(ValueError, match="--diffeomorphic must be true or false, got 'maybe'"):
        build_network("HyperUNet", {**KWARGS, "diffeomorphic": "maybe"})
    with pytest.raises(ValueError, match="network_name 'HyperNet' is not a network"):
        build_network("HyperNet", KWARGS)


def test_parse_flag_and_amp():
    assert parse_flag("x", "True") and not parse_flag("x", " false ") and parse_flag("x", True)
    for bad in ("maybe", "yes", 1, None):
        with pytest.raises(ValueError, match="--amp must be true or false"):
            parse_flag("amp", bad)
    assert not amp_enabled("false", "cuda:0") and not amp_enabled(True, "cpu") and amp_enabled("true", "cuda")


@pytest.mark.parametrize("configs", [("inference.json",), ("inference.json", "evaluate.json"), ("train.json",)])
def test_configs_parse_boolean_ids(configs, tmp_path):
    """``--diffeomorphic false`` builds a non-diffeomorphic network and ``--amp false`` / ``--amp maybe`` are parsed
    (the string "false" used to count as true), in every config that builds the network."""
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / name) for name in configs])
    parser["bundle_root"] = str(ROOT)
    parser["ckpt_path"] = str(tmp_path / "absent.pt")  # no card: the config's settings are used
    for flag, expected in (("false", False), ("true", True)):
        parser["diffeomorphic"] = flag
        parser.parse()
        assert parser.get_parsed_content("network_def", instantiate=True).diffeomorphic is expected
    amp_id = "use_amp"  # the one place a config turns --amp into the engines' flag
    parser["amp"] = "false"
    parser["device"] = "$torch.device('cuda')"
    parser.parse()
    assert parser.get_parsed_content(amp_id) is False
    parser["amp"] = "maybe"
    parser.parse()
    with pytest.raises(RuntimeError) as error:  # MONAI wraps the cause in "Failed to evaluate ConfigExpression"
        parser.get_parsed_content(amp_id)
    assert "--amp must be true or false, got 'maybe'" in str(error.value.__cause__)


def test_the_card_is_strict_json_when_a_metric_is_nan(tmp_path):
    """A validation metric that could not be computed (NaN: e.g. no pair had points) is written as null, as
    metrics.json and the sweep's files write it; Python's default would write NaN, which strict JSON readers refuse."""
    import numpy as np

    card = ModelCard(HyperSpace(), "HyperUNet", KWARGS, best_metric=float("nan"), best_metric_epoch=np.int64(3))
    text = card.save(tmp_path).read_text()

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    record = json.loads(text, parse_constant=refuse)
    assert record["best_metric"] is None and record["best_metric_epoch"] == 3


def test_every_id_of_the_readme_table_is_defined_by_the_configs_it_names():
    """The README's table of config ids a user changes: each id is defined by train.json or inference.json, and the
    ids of inference, evaluation and the sweep by inference.json (on which evaluate.json and sweep.json are
    layered), so ``--<id> value`` overrides a default instead of adding an unused id."""
    import re

    from elastic_hypermorph_bundle.cli import config_ids

    text = (ROOT / "README.md").read_text()
    table = text[text.index("### Config ids a user changes"):text.index("Outputs are never overwritten")]
    rows = [row for row in table.splitlines()[4:] if row.startswith("|")]
    documented = {name for row in rows for name in re.findall(r"`([a-z_]+)`", row.split("|")[1])}
    defined = {name: config_ids(ConfigParser.load_config_files(str(ROOT / "configs" / f"{name}.json")))
               for name in ("train", "inference", "apply")}
    training_only = {"epochs", "val_interval", "batch_size", "learning_rate", "resume", "hyper_sampling", "similarity",
                     "amortised_targets", "amortised_weight", "amortised_fraction", "amortised_mask"}
    assert len(documented) > 25
    missing = {name for name in documented if name not in defined["train"] | defined["inference"] | defined["apply"]}
    assert not missing, missing
    apply_only = set(defined["apply"]) - set(defined["inference"])  # apply.json stands alone (a written registration applied)
    inference_missing = {n for n in documented - training_only - apply_only - {"ckpt_dir"} if n not in defined["inference"]}
    assert not inference_missing, inference_missing
