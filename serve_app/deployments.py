"""Model deployments: the classifier and the VAE, each hot-swappable and dynamically batched.

A replica loads the checkpoint named by its ``user_config`` (see
:class:`~serve_app.schemas.ModelUserConfig`) in ``reconfigure``. Changing ``user_config``
(``serve deploy``, a RayService's ``serveConfigV2``) calls ``reconfigure`` in place: the new
checkpoint loads in a worker thread while the old one keeps answering, then the reference is
swapped atomically. A missing or invalid checkpoint is refused with an error log line, a
``ray_mve_model_swaps_total{outcome="failure"}`` increment and ``swap.last_error`` in
``/v1/models``; the old model keeps serving. With no old model (first load) the replica fails.

Requests are split into chunks of at most ``max_batch_size`` images and go through
``@serve.batch`` (batch size counted in images); a batch runs each model snapshot it holds
separately, so a swap in the middle of a batch is safe. ``max_batch_size`` and
``batch_wait_timeout_s`` are applied live with ``set_max_batch_size`` /
``set_batch_wait_timeout_s``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import ValidationError
from ray import serve

from serve_app.errors import ApiError
from serve_app.images import input_size, preprocess, to_uint8_hwc
from serve_app.loading import LoadedModel, load_model
from serve_app.metrics import ModelMetrics
from serve_app.schemas import ModelInfo, ModelUserConfig, SwapStatus

__all__ = ["client_errors", "ClassifierDeployment", "VAEDeployment"]

logger = logging.getLogger("ray.serve")


def client_errors(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Returns an :class:`ApiError` as ``{"error": [status, code, message]}`` instead of raising.

    A client mistake (e.g. a wrong tensor shape) is then not logged as a failed request with a
    traceback by the replica; the ingress turns it back into the 4xx.
    """
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except ApiError as exc:
            return {"error": [exc.status, exc.code, exc.message]}
    return wrapper


@dataclass(frozen=True)
class _Item:
    model: LoadedModel
    x: torch.Tensor


def _batch_images(items: list[_Item]) -> int:
    return sum(int(item.x.shape[0]) for item in items)


class _ModelServer:
    """Loading, hot swap and batched forward shared by both model deployments."""

    kind: ClassVar[str] = ""

    def __init__(self, torch_threads: int | None = None) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self._model: LoadedModel | None = None
        self._cfg: ModelUserConfig | None = None
        self._status = SwapStatus()
        self._swap_lock = asyncio.Lock()
        self._metrics = ModelMetrics(self.kind)
        try:
            self._replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside a replica (e.g. a local test)
            self._replica = "local"

    # -- hot swap ----------------------------------------------------------------------------

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Applies a new ``user_config``: batching live, checkpoint by load-then-swap."""
        async with self._swap_lock:
            try:
                cfg = ModelUserConfig.model_validate(user_config)
            except ValidationError as exc:
                self._refuse(str(user_config), f"invalid user_config: {exc}")
                return
            self._batched.set_max_batch_size(cfg.max_batch_size)
            self._batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
            self._cfg = cfg
            if self._model is not None and cfg.checkpoint == self._model.source:
                return
            self._status.requested_checkpoint = cfg.checkpoint
            try:
                loaded = await asyncio.to_thread(load_model, cfg.checkpoint, self.kind)
            except Exception as exc:  # noqa: BLE001 - any load failure refuses the swap
                self._refuse(cfg.checkpoint, f"{type(exc).__name__}: {exc}")
                return
            old, self._model = self._model, loaded
            self._status.swaps += 1
            self._status.last_error = None
            self._metrics.swapped(True, old.id if old else None, loaded.id)
            logger.info("%s: now serving %s from %s (was %s)", self.kind, loaded.id,
                        cfg.checkpoint, old.id if old else "nothing")

    def _refuse(self, source: str, why: str) -> None:
        self._status.failed_swaps += 1
        self._status.last_error = f"{source}: {why}"
        self._metrics.swapped(False)
        if self._model is None:
            logger.error("%s: cannot load the first checkpoint %s: %s", self.kind, source, why)
            raise RuntimeError(f"{self.kind}: cannot load checkpoint {source}: {why}")
        logger.error("%s: refusing checkpoint %s: %s; still serving %s from %s", self.kind,
                     source, why, self._model.id, self._model.source)

    def check_health(self) -> None:
        """Serve health check: a replica without a model is unhealthy."""
        if self._model is None:
            raise RuntimeError(f"{self.kind}: no model loaded")

    def _current(self) -> LoadedModel:
        if self._model is None:
            raise ApiError(503, "model_not_ready", f"the {self.kind} has no model loaded")
        return self._model

    @client_errors
    async def info(self) -> dict[str, Any]:
        """What this replica serves (``/v1/models``)."""
        m = self._current()
        cfg = self._cfg or ModelUserConfig(checkpoint=m.source)
        return ModelInfo(
            name=self.kind, checkpoint_id=m.id, checkpoint=m.source, model_name=m.ckpt.model_name,
            class_names=m.ckpt.class_names, preprocessing=m.preprocessing,
            metrics=m.ckpt.metrics, loaded_at=m.loaded_at, replica=self._replica,
            max_batch_size=cfg.max_batch_size, batch_wait_timeout_s=cfg.batch_wait_timeout_s,
            swap=self._status).model_dump()

    # -- batched forward ---------------------------------------------------------------------

    async def _batched(self, item: _Item) -> torch.Tensor:  # replaced by @serve.batch
        raise NotImplementedError

    def _forward(self, model: LoadedModel, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    async def _run_batch(self, items: list[_Item]) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(id(item.model), []).append(i)
        for idx in groups.values():
            model = items[idx[0]].model
            x = torch.cat([items[i].x for i in idx]) if len(idx) > 1 else items[idx[0]].x
            t0 = time.perf_counter()
            y = await asyncio.to_thread(self._forward, model, x)
            self._metrics.batch(len(x), (time.perf_counter() - t0) * 1000, "batch")
            for i, part in zip(idx, y.split([len(items[i].x) for i in idx]), strict=True):
                out[i] = part
        return out  # type: ignore[return-value]

    async def _predict(self, model: LoadedModel, x: torch.Tensor) -> torch.Tensor:
        size = self._cfg.max_batch_size if self._cfg else 32
        parts = await asyncio.gather(*(self._batched(_Item(model, x[i:i + size]))
                                       for i in range(0, len(x), size)))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    async def _prepare(self, model: LoadedModel, images: list[np.ndarray]) -> torch.Tensor:
        h, w = input_size(model.preprocessing)
        if all(a.shape[:2] == (h, w) for a in images):
            return preprocess(images, model.preprocessing)
        return await asyncio.to_thread(preprocess, images, model.preprocessing)

    def _check_tensor(self, model: LoadedModel, x: np.ndarray) -> torch.Tensor:
        h, w = input_size(model.preprocessing)
        if x.ndim != 4 or x.shape[1:] != (3, h, w):
            raise ApiError(400, "invalid_shape", f"the {self.kind} ({model.id}) takes FP32 "
                           f"[N, 3, {h}, {w}], got {list(x.shape)}")
        return torch.from_numpy(np.array(x, dtype=np.float32))  # a writable copy


@serve.deployment(
    name="Classifier", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.5},
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16},
    health_check_period_s=10, graceful_shutdown_timeout_s=20)
class ClassifierDeployment(_ModelServer):
    """Image classifier: ``classify`` (decoded images) and ``infer_tensor`` (model input)."""

    kind = "classifier"

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=_batch_images)
    async def _batched(self, items: list[_Item]) -> list[torch.Tensor]:
        return await self._run_batch(items)

    def _forward(self, model: LoadedModel, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model.ckpt.model(x).float().softmax(dim=-1)

    def _result(self, model: LoadedModel, probs: torch.Tensor) -> dict[str, Any]:
        names = model.class_names
        self._metrics.predicted([names[i] for i in probs.argmax(dim=1).tolist()])
        return {"checkpoint_id": model.id, "class_names": names,
                "probabilities": probs.numpy()}

    @client_errors
    async def classify(self, images: list[np.ndarray]) -> dict[str, Any]:
        """Probabilities ``[N, K]`` for RGB ``uint8 [H, W, 3]`` images of any size."""
        model = self._current()
        x = await self._prepare(model, images)
        return self._result(model, await self._predict(model, x))

    @client_errors
    async def infer_tensor(self, x: np.ndarray) -> dict[str, Any]:
        """Probabilities for an already preprocessed ``FP32 [N, 3, H, W]`` batch."""
        model = self._current()
        return self._result(model, await self._predict(model, self._check_tensor(model, x)))


@serve.deployment(
    name="VAE", max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.5},
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8},
    health_check_period_s=10, graceful_shutdown_timeout_s=20)
class VAEDeployment(_ModelServer):
    """Conv VAE: batched ``reconstruct``; ``sample``, ``variations`` and ``interpolate``."""

    kind = "vae"

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=_batch_images)
    async def _batched(self, items: list[_Item]) -> list[torch.Tensor]:
        return await self._run_batch(items)

    def _forward(self, model: LoadedModel, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model.ckpt.model.reconstruct(x).float()

    async def _generate(self, method: str, fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        model = self._current()
        t0 = time.perf_counter()
        y = await asyncio.to_thread(fn, model, *args, **kwargs)
        self._metrics.batch(len(y), (time.perf_counter() - t0) * 1000, method)
        return {"checkpoint_id": model.id, "images": to_uint8_hwc(y, model.preprocessing)}

    @client_errors
    async def reconstruct(self, images: list[np.ndarray], raw: bool = False) -> dict[str, Any]:
        """Reconstructions (posterior mean) as ``uint8 [N, H, W, 3]``, or model space (raw)."""
        model = self._current()
        y = await self._predict(model, await self._prepare(model, images))
        if raw:
            return {"checkpoint_id": model.id, "reconstruction": y.numpy()}
        return {"checkpoint_id": model.id, "images": to_uint8_hwc(y, model.preprocessing)}

    @client_errors
    async def infer_tensor(self, x: np.ndarray) -> dict[str, Any]:
        """Model-space reconstructions of an already preprocessed ``FP32 [N, 3, H, W]`` batch."""
        model = self._current()
        y = await self._predict(model, self._check_tensor(model, x))
        return {"checkpoint_id": model.id, "reconstruction": y.numpy()}

    @client_errors
    async def sample(self, n: int, temperature: float, seed: int | None) -> dict[str, Any]:
        """``n`` prior samples."""
        return await self._generate("sample", lambda m: m.ckpt.model.sample(
            n, temperature=temperature, seed=seed))

    @client_errors
    async def variations(self, image: np.ndarray, n: int, temperature: float,
                         seed: int | None) -> dict[str, Any]:
        """``n`` decodes around the posterior of one image."""
        def run(m: LoadedModel) -> torch.Tensor:
            x = preprocess([image], m.preprocessing)
            return m.ckpt.model.variations(x[0], n, temperature=temperature, seed=seed)
        return await self._generate("variations", run)

    @client_errors
    async def interpolate(self, a: np.ndarray, b: np.ndarray, steps: int,
                          method: str) -> dict[str, Any]:
        """``steps`` decodes between the latents of two images."""
        def run(m: LoadedModel) -> torch.Tensor:
            x = preprocess([a, b], m.preprocessing)
            return m.ckpt.model.interpolate(x[0], x[1], steps, method=method)
        return await self._generate("interpolate", run)
