"""Registration losses: the linear elastic regularizer and the per-sample weighted registration loss."""

from .elastic import ElasticLoss, elastic_energy
from .registration import RegistrationLoss

__all__ = ["ElasticLoss", "RegistrationLoss", "elastic_energy"]
