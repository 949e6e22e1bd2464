"""Flow matching: interpolation paths, losses and ODE integrators."""

from fluxrl.flows.losses import flow_matching_errors, flow_matching_loss
from fluxrl.flows.ode import euler, integrate, midpoint
from fluxrl.flows.paths import linear_path

__all__ = ["euler", "flow_matching_errors", "flow_matching_loss", "integrate", "linear_path", "midpoint"]
