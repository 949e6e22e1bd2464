"""Agent registry: name -> module implementing the agent contract (see fluxrl/agents/base.py).

To add an agent, write fluxrl/agents/<name>.py and add one line to _MODULES.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Any

from fluxrl.agents.base import check_preset
from fluxrl.errors import FluxrlError

_MODULES = {
    "bc": "fluxrl.agents.bc",
    "flow_bc": "fluxrl.agents.flow_bc",
    "iql": "fluxrl.agents.iql",
    "rebrac": "fluxrl.agents.rebrac",
    "fql": "fluxrl.agents.fql",
    "infom": "fluxrl.agents.infom",
    "fom": "fluxrl.agents.fom",
    "infom_gpi": "fluxrl.agents.infom_gpi",
    "flowq": "fluxrl.agents.flowq",
    "qam": "fluxrl.agents.qam",
    "gfp": "fluxrl.agents.gfp",
    "dflow": "fluxrl.agents.dflow",
    "fpmd": "fluxrl.agents.fpmd",
    "sfp": "fluxrl.agents.sfp",
    "swfp": "fluxrl.agents.swfp",
}


def names() -> tuple[str, ...]:
    return tuple(_MODULES)


def get(name: str) -> ModuleType:
    """The agent module called `name`."""
    if name not in _MODULES:
        raise FluxrlError(f"Unknown agent '{name}'; known agents: {', '.join(_MODULES)}.")
    return importlib.import_module(_MODULES[name])


def make_config(name: str, preset: str = "paper", task: str | None = None, **overrides: Any):
    """The agent's preset, with the task's paper values, then `overrides` (field=value; lists become tuples)."""
    agent = get(name)
    check_preset(agent.PRESETS, preset)
    config = agent.for_task(agent.PRESETS[preset], task, preset)
    fields = {f.name for f in dataclasses.fields(config)}
    for key in overrides:
        if key not in fields:
            raise FluxrlError(f"Agent {name} has no config field '{key}'; its fields: {', '.join(sorted(fields))}.")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return dataclasses.replace(config, **overrides)
