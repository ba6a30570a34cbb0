"""Registration losses: the linear elastic regularizer, the per-sample weighted registration loss, and the MIND-SSC
descriptor similarity of the test-time optimisation."""

from .elastic import ElasticLoss, elastic_energy
from .mind import MINDSSCLoss, mind_ssc
from .registration import RegistrationLoss, training_loss

__all__ = ["ElasticLoss", "MINDSSCLoss", "RegistrationLoss", "elastic_energy", "mind_ssc", "training_loss"]
