"""Planning with flows: Flow-Opt's multi-robot trajectory generation (fluxrl.plan.flowopt) on planar problems with
a differentiable safety filter (fluxrl.plan.multirobot) over Bernstein trajectories (fluxrl.plan.bernstein)."""
