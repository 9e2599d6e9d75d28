"""Weight averaging during training: an exponential moving average (EMA) or airbench's Lookahead.

Both keep a float copy of the model's floating-point state (parameters and BatchNorm running
statistics) and update it every ``every`` optimiser steps:

- ``ema``: ``avg <- d * avg + (1 - d) * w`` with ``d = decay ** every``; evaluation and the saved
  weights use ``avg`` (:meth:`WeightAverager.averaged`), training continues on ``w``.
- ``lookahead`` (Jordan 2024, after hlb-CIFAR10): the same update with
  ``d = decay ** every * (step / total) ** 3``, after which ``w <- avg``; the last update uses
  ``d = 1``, so training ends on the average.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["WeightAverager"]


def _float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


class WeightAverager:
    """Tracks averaged weights of ``model`` (pass the unwrapped module, not a DDP wrapper)."""

    def __init__(self, model: nn.Module, *, mode: str, decay: float, every: int,
                 total_steps: int) -> None:
        if mode not in ("ema", "lookahead"):
            raise ValueError(f"mode must be 'ema' or 'lookahead', got {mode!r}")
        if not 0 < decay < 1 or every < 1 or total_steps < 1:
            raise ValueError("need 0 < decay < 1, every >= 1 and total_steps >= 1")
        self.mode, self.decay, self.every, self.total = mode, decay, every, total_steps
        self.avg = {k: v.detach().clone().float() for k, v in _float_state(model).items()}

    def decay_at(self, step: int) -> float:
        """Decay of the update made after optimiser step ``step`` (1-based)."""
        d = self.decay ** self.every
        if self.mode == "lookahead":
            d *= (min(step, self.total) / self.total) ** 3
        return d

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Call after every optimiser step with the 1-based global step."""
        last = step >= self.total
        if step % self.every and not last:
            return
        d = 1.0 if (last and self.mode == "lookahead") else self.decay_at(step)
        state = _float_state(model)
        for k, a in self.avg.items():
            w = state[k]
            a.lerp_(w.float(), 1.0 - d)
            if self.mode == "lookahead":
                w.copy_(a)

    @contextmanager
    def averaged(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily loads the averaged weights into ``model`` (EMA), restoring them after."""
        if self.mode != "ema":
            yield model
            return
        state = _float_state(model)
        saved = {k: v.detach().clone() for k, v in state.items()}
        with torch.no_grad():
            for k, v in state.items():
                v.copy_(self.avg[k])
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, v in state.items():
                    v.copy_(saved[k])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.avg.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.avg) - set(state)
        if missing:
            raise KeyError(f"averager state lacks {sorted(missing)[:3]}")
        for k, v in self.avg.items():
            v.copy_(state[k].to(v.device, v.dtype))
