"""Pre-training -> fine-tuning for agents that have a reward-free phase (InFOM and its ablations).

Such an agent module adds to the contract:
    PRETRAIN_BATCH_SPEC                              the fields pre-training reads (no rewards)
    pretrain_update(state, batch, key) -> (state, metrics)
    pretrain_loss_metrics(state, batch, key) -> metrics
    begin_finetune(state) -> state                   e.g. copy the online vector field into its target
and, optionally, any agent may define
    set_data_stats(state, stats) -> state            stats of the (normalised) dataset of the current phase
The engine runs pre-training as an ordinary run of the agent's *pre-training view*: the same module with update,
loss_metrics and BATCH_SPEC swapped for the pre-training ones, registered as `NAME:pretrain`. A fine-tuning run is
an ordinary run of the agent with TrainConfig.init_from naming the pre-training run directory.
"""

from __future__ import annotations

import functools
import types

from fluxrl.errors import FluxrlError

PRETRAIN_ATTRIBUTES = ("PRETRAIN_BATCH_SPEC", "pretrain_update", "pretrain_loss_metrics", "begin_finetune")


def has_pretraining(module: types.ModuleType) -> bool:
    return all(hasattr(module, a) for a in PRETRAIN_ATTRIBUTES)


@functools.lru_cache(maxsize=None)
def pretrain_view(module: types.ModuleType, spec: str | None = None) -> types.ModuleType:
    """The agent as it trains in its reward-free pre-training phase (one object per module, so the engine's
    compilation caches keep working)."""
    if not has_pretraining(module):
        raise FluxrlError(f"Agent {getattr(module, 'NAME', module.__name__)} has no pre-training phase; train it "
                          f"with `fluxrl train` instead.")
    view = types.ModuleType(spec or f"{module.__name__}:pretrain")
    view.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
    view.NAME = f"{getattr(module, 'NAME', module.__name__)}:pretrain"
    view.BATCH_SPEC = module.PRETRAIN_BATCH_SPEC
    view.__dict__.pop("batch_spec", None)  # a config-dependent spec describes the fine-tuning batches
    view.update = module.pretrain_update
    view.loss_metrics = module.pretrain_loss_metrics
    view.FINETUNE_MODULE = module
    return view
