"""Version counters that move after every optimizer step, which the fast path's caches rely on.

The fast path's cached scales, lambda's projection into its bound and the fold's check against a step between
forward and backward all ask "was this parameter written since?" through ``_version``. torch.optim's own
loops and foreach ops move it; its fused kernels do not, nor do optimizers that write ``p.data``
(bitsandbytes, prodigyopt). Importing this module registers a hook common to all optimizers that moves them.
"""

from __future__ import annotations

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


def _versions_after_step(optimizer: torch.optim.Optimizer, *_: object) -> None:
    """Move the counters of every parameter of an optimizer that may not have (all but torch's unfused ones).

    Without it, after such a step a cached no-grad forward (validation) reused the scales of before, and
    lambda's projection was skipped. Such optimizers then behave as torch's unfused ones do (autograd also sees
    their in-place writes). Not covered: DeepSpeed's ZeRO optimizers (not torch optimizers; the training
    script moves the counters itself).
    """
    fused = any(group.get("fused") for group in optimizer.param_groups)  # per group: a loaded state sets it
    if type(optimizer).__module__.startswith("torch.optim.") and not fused:
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            torch.autograd.graph.increment_version(param)


register_optimizer_step_post_hook(_versions_after_step)
