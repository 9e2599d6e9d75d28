"""A learned prior over the VAE latent: a full-covariance Gaussian mixture fitted by EM.

The second stage of a two-stage VAE (Dai & Wipf 2019; Ghosh et al. 2020 fit a GMM "ex-post"):
after training, the posterior means ``mu`` of the training images are flattened to ``D =
L*h*w`` values and a ``K``-component mixture is fitted to them. Sampling from it instead of
``N(0, I)`` puts decoder inputs where the decoder was trained, which is what improves sample FID.

The mixture lives in the VAE as buffers (:class:`GaussianMixture`: log-weights ``[K]``, means
``[K, D]`` and the packed lower-triangular Cholesky factors ``[K, D(D+1)/2]``), so it is saved in
``model.safetensors`` and loads with the checkpoint; the VAE config records ``prior`` and
``prior_components``. Pure torch; EM runs in float64.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["GaussianMixture", "GMMFit", "fit_gmm", "encode_latents", "fit_latent_prior"]

logger = logging.getLogger(__name__)


class GaussianMixture(nn.Module):
    """``K`` full-covariance Gaussians over ``D`` dims, stored as buffers (no parameters)."""

    def __init__(self, components: int, dim: int) -> None:
        super().__init__()
        if components < 1 or dim < 1:
            raise ValueError(f"need components >= 1 and dim >= 1, got {components}, {dim}")
        self.components, self.dim = components, dim
        self.register_buffer("log_weights", torch.full((components,), -math.log(components)))
        self.register_buffer("means", torch.zeros(components, dim))
        self.register_buffer("scale_tril", torch.zeros(components, dim * (dim + 1) // 2))
        self.register_buffer("fitted", torch.zeros(()))

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted.item() > 0)

    def _tril_index(self) -> tuple[Tensor, Tensor]:
        idx = torch.tril_indices(self.dim, self.dim, device=self.means.device)
        return idx[0], idx[1]

    def cholesky(self) -> Tensor:
        """Lower-triangular Cholesky factors ``[K, D, D]`` of the covariances."""
        r, c = self._tril_index()
        out = self.means.new_zeros(self.components, self.dim, self.dim)
        out[:, r, c] = self.scale_tril
        return out

    @torch.no_grad()
    def set(self, weights: Tensor, means: Tensor, chol: Tensor) -> None:
        """Installs a fitted mixture: weights ``[K]``, means ``[K, D]``, Cholesky ``[K, D, D]``."""
        k, d = means.shape
        if (k, d) != (self.components, self.dim) or chol.shape != (k, d, d) or weights.shape != (k,):
            raise ValueError(f"mixture shapes {tuple(weights.shape)}, {tuple(means.shape)}, "
                             f"{tuple(chol.shape)} do not fit K={self.components}, D={self.dim}")
        r, c = self._tril_index()
        dev, dt = self.means.device, self.means.dtype
        w = weights.to(torch.float64).clamp_min(1e-12)
        self.log_weights.copy_((w / w.sum()).log().to(dev, dt))
        self.means.copy_(means.to(dev, dt))
        self.scale_tril.copy_(chol.to(dev)[:, r, c].to(dt))
        self.fitted.fill_(1.0)

    @torch.no_grad()
    def log_prob(self, x: Tensor) -> Tensor:
        """Log-density (nats) of rows of ``x`` [N, D] -> [N] (float64)."""
        return _mixture_log_prob(x.to(torch.float64), self.log_weights.double(),
                                 self.means.double(), self.cholesky().double()).logsumexp(1)

    @torch.no_grad()
    def sample(self, n: int, *, temperature: float = 1.0, seed: int | None = None) -> Tensor:
        """``n`` draws [n, D] on the CPU; ``temperature`` scales the spread around the means."""
        if not self.is_fitted:
            raise ValueError("the latent GMM prior is not fitted; run `mve vae fit-prior` first")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        probs = self.log_weights.detach().double().cpu().softmax(0)
        comp = torch.multinomial(probs, n, replacement=True, generator=gen)
        eps = torch.randn(n, self.dim, generator=gen, dtype=torch.float64)
        chol = self.cholesky().detach().double().cpu()[comp]  # [n, D, D]
        means = self.means.detach().double().cpu()[comp]
        return (means + temperature * (chol @ eps.unsqueeze(-1)).squeeze(-1)).float()


def _mixture_log_prob(x: Tensor, log_w: Tensor, means: Tensor, chol: Tensor) -> Tensor:
    """``log w_k + log N(x | m_k, L_k L_k^T)`` for every row and component -> [N, K]."""
    n, d = x.shape
    out = x.new_empty(n, len(log_w))
    const = d * math.log(2 * math.pi)
    for k in range(len(log_w)):
        y = torch.linalg.solve_triangular(chol[k], (x - means[k]).T, upper=False)  # [D, N]
        logdet = 2 * torch.log(torch.diagonal(chol[k])).sum()
        out[:, k] = log_w[k] - 0.5 * (const + logdet + y.pow(2).sum(0))
    return out


class GMMFit:
    """The result of :func:`fit_gmm`: weights ``[K]``, means ``[K, D]``, Cholesky ``[K, D, D]``."""

    def __init__(self, weights: Tensor, means: Tensor, chol: Tensor, log_likelihood: float,
                 iterations: int, converged: bool) -> None:
        self.weights, self.means, self.chol = weights, means, chol
        self.log_likelihood = log_likelihood  # mean per sample, nats
        self.iterations, self.converged = iterations, converged

    @property
    def covariances(self) -> Tensor:
        return self.chol @ self.chol.transpose(-1, -2)


def _kmeans_pp(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding: ``k`` rows of ``x``, each drawn proportional to squared distance."""
    n = len(x)
    first = torch.randint(n, (1,), generator=gen).item()
    centers = [x[first]]
    d2 = (x - x[first]).pow(2).sum(1)
    for _ in range(1, k):
        probs = (d2 / d2.sum()).cpu() if d2.sum() > 0 else torch.full((n,), 1.0 / n)
        i = torch.multinomial(probs, 1, generator=gen).item()
        centers.append(x[i])
        d2 = torch.minimum(d2, (x - x[i]).pow(2).sum(1))
    return torch.stack(centers)


def fit_gmm(x: Tensor, components: int, *, iters: int = 100, tol: float = 1e-4, reg: float = 1e-4,
            seed: int = 0, kmeans_iters: int = 10) -> GMMFit:
    """Fits a full-covariance GMM to ``x`` [N, D] by EM (float64, on ``x``'s device).

    Initialised by seeded k-means++ and a few Lloyd iterations; every covariance gets ``reg``
    times the mean per-dim variance of ``x`` added to its diagonal, which keeps it positive
    definite. Stops when the mean log-likelihood improves by less than ``tol`` nats per sample.
    """
    if x.ndim != 2 or len(x) < components or components < 1:
        raise ValueError(f"need x [N, D] with N >= components >= 1, got {tuple(x.shape)}, "
                         f"{components}")
    x = x.detach().to(torch.float64)
    n, d = x.shape
    gen = torch.Generator().manual_seed(seed)
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    floor = reg * x.var(0).mean().clamp_min(1e-12) * eye
    centers = _kmeans_pp(x, components, gen)
    for _ in range(kmeans_iters):
        assign = torch.cdist(x, centers).argmin(1)
        for k in range(components):
            members = x[assign == k]
            if len(members):
                centers[k] = members.mean(0)
    resp = torch.nn.functional.one_hot(torch.cdist(x, centers).argmin(1), components).to(x.dtype)
    prev, ll, done, converged = -math.inf, -math.inf, 0, False
    for step in range(1, iters + 1):
        done = step
        # M step
        nk = resp.sum(0) + 1e-10
        weights = nk / n
        means = (resp.T @ x) / nk[:, None]
        chol = torch.empty(components, d, d, dtype=x.dtype, device=x.device)
        for k in range(components):
            diff = x - means[k]
            cov = (resp[:, k, None] * diff).T @ diff / nk[k] + floor
            chol[k] = torch.linalg.cholesky(0.5 * (cov + cov.T))
        # E step
        logp = _mixture_log_prob(x, weights.log(), means, chol)
        norm = logp.logsumexp(1, keepdim=True)
        resp = (logp - norm).exp()
        ll = norm.mean().item()
        if abs(ll - prev) < tol:
            converged = True
            break
        prev = ll
    logger.info("GMM prior: K=%d, D=%d, N=%d, %d EM iterations%s, mean log-lik %.2f nats",
                components, d, n, done, " (converged)" if converged else "", ll)
    return GMMFit(weights.float(), means.float(), chol.float(), ll, done, converged)


def _batches(data: Any, batch_size: int) -> Iterable[Tensor]:
    """Model-space image batches from uint8/float tensors or an iterable of batches."""
    if isinstance(data, Tensor):
        for i in range(0, len(data), batch_size):
            b = data[i:i + batch_size]
            yield b.float() / 127.5 - 1.0 if b.dtype == torch.uint8 else b
        return
    for item in data:
        b = item[0] if isinstance(item, tuple | list) else item
        yield b.float() / 127.5 - 1.0 if b.dtype == torch.uint8 else b


@torch.no_grad()
def encode_latents(model: nn.Module, data: Any, *, batch_size: int = 500,
                   limit: int | None = None, progress: bool = False) -> Tensor:
    """Posterior means of ``data`` flattened to ``[N, L*h*w]`` (float32, CPU).

    ``data``: uint8 images ``[N, 3, H, W]``, model-space float images, or an iterable of such
    batches (or of ``(x, y)`` pairs, e.g. a :class:`~mve.data.TensorLoader` with mean=std=0.5).
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out, seen = [], 0
    try:
        for x in tqdm(_batches(data, batch_size), desc="encode", disable=not progress,
                      unit="batch", leave=False):
            if limit is not None and seen >= limit:
                break
            mu, _ = model.encode(x.to(device))
            out.append(mu.flatten(1).float().cpu())
            seen += len(x)
    finally:
        model.train(was_training)
    if not out:
        raise ValueError("no images to encode")
    z = torch.cat(out)
    return z[:limit] if limit is not None else z


def fit_latent_prior(model: nn.Module, data: Any, *, components: int = 10, iters: int = 100,
                     seed: int = 0, batch_size: int = 500, limit: int | None = None,
                     reg: float = 1e-4, device: str | torch.device | None = None,
                     progress: bool = False) -> dict[str, Any]:
    """Fits a ``components``-GMM to the posterior means of ``data`` and installs it in ``model``.

    After this ``model.config.prior == "gmm"`` and ``model.sample`` draws from the mixture; save
    the model with ``model_config=model.config`` so the checkpoint rebuilds the prior buffers.
    ``device`` is where EM runs (default: the model's device). Returns a summary for the
    checkpoint manifest.
    """
    z = encode_latents(model, data, batch_size=batch_size, limit=limit, progress=progress)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    fit = fit_gmm(z.to(dev), components, iters=iters, reg=reg, seed=seed)
    model.set_latent_prior(fit.weights, fit.means, fit.chol)
    d = z.shape[1]
    std_ll = -0.5 * (z.double().pow(2).sum(1) + d * math.log(2 * math.pi)).mean().item()
    return {"kind": "gmm", "components": components, "latent_dim": d, "samples": len(z),
            "iterations": fit.iterations, "converged": fit.converged, "seed": seed,
            "reg": reg, "mean_log_likelihood_nats": fit.log_likelihood,
            "standard_normal_log_likelihood_nats": std_ll}
