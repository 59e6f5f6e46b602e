"""Flow models: rectified-flow (flow-matching) sampling, the Flow-GRPO reverse SDE, rollout plans and rewards.

Convention: ``x_t = (1 - t) x_0 + t eps``, t = 1 is noise, the network predicts ``v = eps - x_0`` and samplers
run from t = 1 to t = 0. Training lives in :class:`entreg.modules.flow.FlowMatchingModule`.

Example:
    >>> import torch
    >>> from entreg.flow import ode_sample
    >>> ode_sample(lambda x, t, cond: x, torch.ones(2, 3), steps=4).shape
    torch.Size([2, 3])
"""

from entreg.flow.sampling import Velocity, ode_sample, time_grid

__all__ = ["Velocity", "ode_sample", "time_grid"]
