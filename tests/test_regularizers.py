"""The regularizer table (``losses/regularizers.py``) and its readers: the training loss, the hyperparameter space,
the test-time optimisation (which must optimise the energy the model was trained with) and the plots."""

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from elastic_hypermorph_bundle.hyperparams import HyperSpace
from elastic_hypermorph_bundle.model_card import ModelCard

ROOT = Path(__file__).resolve().parents[1]
KWARGS = {"spatial_dims": 3, "in_channels": 2, "encoder_features": [4], "decoder_features": [4, 4],
          "hyper_hidden": 8, "hyper_layers": 2, "diffeomorphic": False}


def test_inference_optimises_the_fixed_lame_parameters_the_model_was_trained_with(tmp_path):
    """A model trained with ``--regularizer elastic_fixed --fixed_lam 4 --fixed_mu 2`` is optimised at test time at
    alpha * (4, 2), the constants its card records, not at the loss's defaults."""
    card = ModelCard(HyperSpace("elastic_fixed"), "HyperUNet", {**KWARGS, "hyper_dims": 1}, spatial_size=[16, 16, 16],
                     training={"fixed_lam": 4.0, "fixed_mu": 2.0, "weighting": "paper"})
    card.save(tmp_path)
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser["bundle_root"] = str(ROOT)
    parser["ckpt_path"] = str(tmp_path / "model.pt")
    parser["regularizer"] = "elastic_fixed"
    parser.parse()
    stages = parser.get_parsed_content("instance_optimization", instantiate=True)
    lam, mu = stages.elastic_parameters(torch.tensor([[0.5]]))
    assert (lam.item(), mu.item()) == (2.0, 1.0)
    assert json.loads((tmp_path / "model.json").read_text())["training"]["fixed_lam"] == 4.0


def test_every_reader_takes_the_row_of_the_table(monkeypatch):
    """A row added to the table is used by the loss, the space and the optimisation, and a one-weight regularizer
    without elastic parameters turns the optimisation off instead of falling through to the elastic energy."""
    from elastic_hypermorph_bundle.losses import RegistrationLoss
    from elastic_hypermorph_bundle.losses import regularizers
    from elastic_hypermorph_bundle.workflow.instance import InstanceOptimization

    def total_variation(field, hyper, spacing, constants):
        return hyper[:, 0] * field.diff(dim=2).abs().flatten(1).mean(1)

    row = regularizers.Regularizer(("beta",), total_variation, lame=None, uses_spacing=False)
    monkeypatch.setitem(regularizers.REGULARIZERS, "total_variation", row)
    space = HyperSpace("total_variation", ranges={"beta": (0.0, 2.0)})
    assert space.names == ("beta",) and space.ranges == ((0.0, 2.0),)
    assert space.point(beta=1.5).tolist() == [[1.5]]
    loss = RegistrationLoss("total_variation", reduction="none")
    ddf = torch.zeros(2, 3, 6, 6, 6)
    ddf[:, 0, 3:] = 1.0  # one step of 1 voxel along axis 0 in channel 0
    fixed = torch.rand(2, 1, 6, 6, 6, generator=torch.Generator().manual_seed(0))
    parts = loss(fixed, fixed, ddf, torch.tensor([[1.0], [2.0]]), return_components=True)
    step = ddf.diff(dim=2).abs().flatten(1).mean(1)
    torch.testing.assert_close(parts["regularization"], torch.tensor([1.0, 2.0]) * step)
    stages = InstanceOptimization(steps=5, hyper_space=space)
    assert not stages.optimizes
    with pytest.raises(ValueError, match="no elastic parameters"):
        stages.elastic_parameters(torch.tensor([[1.0]]))


@pytest.mark.parametrize("name", ["elastic", "elastic_fixed"])
def test_the_optimisation_energy_is_the_training_energy(name):
    """The (lam, mu) a row gives the optimisation make the elastic energy equal the row's training energy."""
    from elastic_hypermorph_bundle.losses.elastic import elastic_energy
    from elastic_hypermorph_bundle.losses.regularizers import get_regularizer
    from elastic_hypermorph_bundle.physics import LameParameters

    row = get_regularizer(name)
    field = torch.randn(2, 3, 6, 7, 8, generator=torch.Generator().manual_seed(1))
    hyper = torch.tensor([[0.3, 0.7], [0.9, 0.1]])[:, : len(row.names)]
    constants = LameParameters(4.0, 2.0)
    lam, mu = row.lame(hyper, constants)
    torch.testing.assert_close(elastic_energy(field, lam, mu, (1.5, 1.0, 2.0)),
                               row.energy(field, hyper, (1.5, 1.0, 2.0), constants))
