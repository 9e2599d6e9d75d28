"""Muon for convolution filters, Nesterov SGD for everything else, in one optimiser.

Muon (K. Jordan, 2024; airbench94_muon reaches 94% in 8 epochs instead of ~10) takes the
momentum of a filter's gradient, viewed as a ``[c_out, c_in * k * k]`` matrix, and replaces it
by the nearest semi-orthogonal matrix (a few Newton-Schulz iterations), so that every direction
of the filter bank moves at the same rate. The filter is renormalised to Frobenius norm
``sqrt(c_out)`` before each step, which makes weight decay pointless for it.

Why not ``torch.optim.Muon``: in torch 2.14 it takes 2-D parameters only, and a conv filter is
4-D. Why one optimiser for both kinds: ``LambdaLR``, checkpoints and Ray Train's resume all
expect one ``torch.optim.Optimizer``; a group's ``orthogonal`` flag picks its update.
"""

from __future__ import annotations

import torch

__all__ = ["Muon", "orthogonalize"]

# Quintic Newton-Schulz coefficients tuned for the steepest slope at zero (Jordan 2024): the
# singular values land in about [0.7, 1.2] after 3-5 steps rather than at exactly 1, which
# trains as well as an exact orthogonalisation and costs a handful of small matmuls.
_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """An approximately semi-orthogonal matrix with ``g``'s singular vectors (``g`` is 2-D).

    bfloat16 on CUDA (tensor cores; the iteration tolerates it), fp32 elsewhere.
    """
    if g.ndim != 2:
        raise ValueError(f"orthogonalize takes a 2-D matrix, got shape {tuple(g.shape)}")
    a, b, c = _NS_COEFFS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    x = x / (x.norm() + eps)  # the spectral norm is at most the Frobenius norm: now <= 1
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T  # iterate on the smaller Gram matrix
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Groups with ``orthogonal=True`` take Muon steps; the others Nesterov SGD with
    PyTorch's coupled weight decay (the same update as ``torch.optim.SGD``).

    Every group has ``lr``, ``momentum`` and ``weight_decay``; ``nesterov`` applies to both
    kinds. A group whose ``lr`` is 0 does not move (weight decay included), which is how a
    schedule freezes a parameter without touching autograd (safe under DDP).
    """

    def __init__(self, params, *, lr: float, momentum: float = 0.85, weight_decay: float = 0.0,
                 nesterov: bool = True, orthogonal: bool = False, ns_steps: int = 5):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("lr, momentum and weight_decay must be >= 0")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "nesterov": nesterov, "orthogonal": orthogonal,
                                  "ns_steps": ns_steps})
        for group in self.param_groups:
            if group["orthogonal"] and any(p.ndim < 2 for p in group["params"]):
                raise ValueError("orthogonal (Muon) groups take matrices or filters, not vectors")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        lr, mom = group["lr"], group["momentum"]
        g = p.grad
        if not group["orthogonal"] and group["weight_decay"]:
            g = g.add(p, alpha=group["weight_decay"])
        buf = self.state[p].get("momentum_buffer")
        if buf is None:
            buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        buf.mul_(mom).add_(g)
        g = g.add(buf, alpha=mom) if group["nesterov"] else buf
        if group["orthogonal"]:
            if lr == 0:
                return
            p.mul_(p.size(0) ** 0.5 / p.norm().clamp_min(1e-12))
            g = orthogonalize(g.reshape(len(g), -1), group["ns_steps"]).view_as(p)
        p.add_(g, alpha=-lr)
