"""Networks: MLPs with the reference code's init, ensembles, critics, vector fields, Gaussian actors."""

from fluxrl.nn.distributions import DiagGaussian
from fluxrl.nn.mlp import MLP, default_init, ensemblize
from fluxrl.nn.networks import GaussianActor, Value, VectorField, vector_field_given

__all__ = [
    "MLP", "DiagGaussian", "GaussianActor", "Value", "VectorField", "default_init", "ensemblize", "vector_field_given"
]
