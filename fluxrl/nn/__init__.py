"""Networks: MLPs with the reference code's init, ensembles, critics, vector fields, Gaussian actors."""

from fluxrl.nn.distributions import DiagGaussian
from fluxrl.nn.mlp import MLP, default_init, ensemblize
from fluxrl.nn.networks import (
    EmbeddedTimeVectorField, GaussianActor, Value, VectorField, sinusoidal_embedding, vector_field_given,
)

__all__ = [
    "MLP", "DiagGaussian", "EmbeddedTimeVectorField", "GaussianActor", "Value", "VectorField", "default_init",
    "ensemblize", "sinusoidal_embedding", "vector_field_given",
]
