"""What every model replica does, whatever its HTTP routes: load, hot swap, batch, describe.

A replica is the HTTP ingress of its own Serve application *and* holds the model, so a request
crosses one Python process (see :mod:`serve_app.app`). It loads the checkpoint named by its
``user_config`` (:class:`~serve_app.schemas.ModelUserConfig`) in ``reconfigure``. Changing
``user_config`` (``serve deploy``, a RayService's ``serveConfigV2``) calls ``reconfigure`` in
place: the new checkpoint loads on a worker thread while the old one keeps answering, then the
reference is swapped atomically. A missing or invalid checkpoint is refused with an error log
line, a ``ray_mve_model_swaps_total{outcome="failure"}`` increment and ``swap.last_error`` in
``/v1/models``; the old model keeps serving. With no old model (first load) the replica fails.

Requests are split into chunks of at most ``max_batch_size`` images and go through a
:class:`~serve_app.batching.GreedyBatcher`; a batch never mixes two checkpoints, so a swap in
the middle of traffic is safe. Batching, test-time augmentation and torch threads are applied
live from ``user_config``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import ValidationError
from ray import serve

from mve.images import input_size, preprocess
from serve_app.api import setup_replica
from serve_app.batching import GreedyBatcher
from serve_app.errors import ApiError
from serve_app.families import served
from serve_app.images import decode_images
from serve_app.loading import LoadedModel, load_model, with_precision
from serve_app.metrics import ModelMetrics
from serve_app.oip import InferRequest
from serve_app.oip_routes import add_oip_routes
from serve_app.schemas import ModelArgs, ModelInfo, ModelUserConfig, SwapStatus

__all__ = ["ModelServer"]

logger = logging.getLogger("ray.serve")


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica (e.g. a local test)
        return "local"


def model_ingress(app: Any, kind: str, *, max_ongoing: int, target_ongoing: int) -> Any:
    """Makes a :class:`ModelServer` subclass the one deployment of model ``kind``'s
    application and its HTTP ingress: the OIP routes join the app's own (before
    ``@serve.ingress``, which takes the routes as they are when it runs), then a quarter CPU
    per replica, 1-2 replicas scaled on ongoing requests, health checks and a graceful drain."""
    add_oip_routes(app, kind)

    def wrap(cls: type) -> Any:
        cls.kind = kind
        return serve.deployment(
            name=served(kind).deployment, max_ongoing_requests=max_ongoing, ray_actor_options={"num_cpus": 0.25},
            autoscaling_config={"min_replicas": 1, "max_replicas": 2,
                                "target_ongoing_requests": target_ongoing},
            health_check_period_s=10, graceful_shutdown_timeout_s=20)(serve.ingress(app)(cls))
    return wrap


class ModelServer:
    """Loading, hot swap, batched forward and ``info`` of one model family (``kind``)."""

    kind: ClassVar[str] = ""

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = ModelArgs.model_validate(args)
        if self.args.model != self.kind:
            raise ValueError(f"a {self.kind} deployment was given model={self.args.model!r}")
        self.limits = self.args.limits()
        self._model: LoadedModel | None = None
        self._cfg: ModelUserConfig | None = None
        self._status = SwapStatus()
        self._swap_lock = asyncio.Lock()
        self._metrics = ModelMetrics(self.kind)
        self._replica = _replica_id()
        self._batcher = GreedyBatcher(self._forward_batch, on_batch=self._observe)
        setup_replica(self.args, server=self)

    # -- hot swap ----------------------------------------------------------------------------

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Applies a new ``user_config``: batching, TTA and threads live; the checkpoint and
        the precision by load-then-swap."""
        async with self._swap_lock:
            try:
                cfg = ModelUserConfig.model_validate(user_config)
            except ValidationError as exc:
                self._refuse(str(user_config), f"invalid user_config: {exc}")
                return
            self._batcher.max_batch_size = cfg.max_batch_size
            self._batcher.wait_s = cfg.batch_wait_timeout_s
            self._cfg = cfg
            old = self._model
            try:
                if old is not None and cfg.checkpoint == old.source:
                    loaded = await asyncio.to_thread(with_precision, old, cfg.precision)
                else:
                    self._status.requested_checkpoint = cfg.checkpoint
                    loaded = await asyncio.to_thread(load_model, cfg.checkpoint, self.kind,
                                                     cfg.precision)
            except Exception as exc:  # noqa: BLE001 - any load failure refuses the swap
                self._refuse(cfg.checkpoint, f"{type(exc).__name__}: {exc}")
                return
            # On the model thread: TTA changes the model in place, never during a forward pass.
            await self._batcher.call(self._apply_tta, loaded)
            if loaded is not old:
                self._swap(old, loaded)

    def _swap(self, old: LoadedModel | None, loaded: LoadedModel) -> None:
        self._model = loaded
        if old is not None and old.ckpt is loaded.ckpt:
            logger.info("%s: %s now answers in %s (was %s)", self.kind, loaded.id,
                        loaded.precision, old.precision)
            return
        self._status.swaps += 1
        self._status.last_error = None
        self._metrics.swapped(True, old.id if old else None, loaded.id)
        logger.info("%s: now serving %s from %s in %s (was %s)", self.kind, loaded.id,
                    loaded.source, loaded.precision, old.id if old else "nothing")

    def _apply_tta(self, model: LoadedModel) -> None:
        """Sets the serving TTA mode (``user_config.tta``; None keeps the checkpoint's)."""
        mode = self._cfg.tta if self._cfg else None
        if mode is not None and hasattr(model.runner, "set_tta"):
            model.runner.set_tta(mode)

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
        """Serve health check: a replica without a model is unhealthy. Also keeps the
        model-info gauge alive between batches (``ModelMetrics.serving``)."""
        if self._model is None:
            raise RuntimeError(f"{self.kind}: no model loaded")
        self._metrics.serving(self._model.id)

    def current(self) -> LoadedModel:
        """The model now being served (503 before the first load)."""
        if self._model is None:
            raise ApiError(503, "model_not_ready", f"the {self.kind} has no model loaded")
        return self._model

    def info(self) -> dict[str, Any]:
        """What this replica serves (``/v1/models``, OIP metadata); plain data for handles."""
        m = self.current()
        cfg = self._cfg or ModelUserConfig(checkpoint=m.source)
        tta = getattr(getattr(m.ckpt.model, "config", None), "tta", None)
        return ModelInfo(
            name=self.kind, checkpoint_id=m.id, checkpoint=m.source, model_name=m.ckpt.model_name,
            class_names=m.ckpt.class_names, preprocessing=m.preprocessing,
            metrics=m.ckpt.metrics, loaded_at=m.loaded_at, replica=self._replica,
            max_batch_size=cfg.max_batch_size, batch_wait_timeout_s=cfg.batch_wait_timeout_s,
            tta=tta, torch_threads=cfg.torch_threads, precision=m.precision,
            batches=self._batcher.stats.batches,
            batched_images=self._batcher.stats.images, swap=self._status).model_dump()

    # -- compute -----------------------------------------------------------------------------

    def _threads(self) -> None:
        """Applies ``torch_threads`` on the model thread (OpenMP settings are per thread)."""
        want = self._cfg.torch_threads if self._cfg else None
        if want and torch.get_num_threads() != want:
            torch.set_num_threads(want)

    def _forward(self, model: LoadedModel, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _forward_batch(self, model: LoadedModel, x: torch.Tensor) -> torch.Tensor:
        self._threads()
        with torch.inference_mode():
            return self._forward(model, x)

    def _observe(self, size: int, seconds: float) -> None:
        self._metrics.batch(size, seconds * 1000, "batch")

    async def predict(self, model: LoadedModel, x: torch.Tensor) -> torch.Tensor:
        """``_forward`` of ``x`` through the batcher, in chunks of ``max_batch_size``."""
        size = self._batcher.max_batch_size
        if len(x) <= size:
            return await self._batcher.submit(model, x)
        parts = await asyncio.gather(*(self._batcher.submit(model, x[i:i + size])
                                       for i in range(0, len(x), size)))
        return torch.cat(parts)

    async def compute(self, method: str, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the model thread (unbatched calls such as VAE sampling)."""
        def run() -> Any:
            self._threads()
            with torch.inference_mode():
                return fn(*args)
        t0 = time.perf_counter()
        out = await self._batcher.call(run)
        self._metrics.batch(len(out), (time.perf_counter() - t0) * 1000, method)
        return out

    # -- the Open Inference Protocol ------------------------------------------------------------

    async def oip_result(self, req: InferRequest) -> dict[str, Any]:
        """This model's answer to a parsed OIP request (``serve_app.oip.outputs_for``)."""
        model = self.current()
        if req.images is not None:
            y = await self.answer_images(model, await self.decode(req.images))
        else:
            y = await self.answer_tensor(model, self.check_tensor(model, req.tensor))
        return {"checkpoint_id": model.id, **self.oip_outputs(model, y)}

    async def answer_images(self, model: LoadedModel, images: list[np.ndarray]) -> Any:
        """The model's answer to decoded images (an OIP ``image`` input)."""
        raise NotImplementedError

    async def answer_tensor(self, model: LoadedModel, x: torch.Tensor) -> Any:
        """The model's answer to a checked model-space tensor (an OIP ``input`` tensor)."""
        raise NotImplementedError

    def oip_outputs(self, model: LoadedModel, answer: Any) -> dict[str, Any]:
        """The named OIP outputs of an answer."""
        raise NotImplementedError

    # -- inputs ------------------------------------------------------------------------------

    async def decode(self, blobs: list[bytes]) -> list[np.ndarray]:
        """Decoded images within the limits (large bodies off the event loop)."""
        if sum(map(len, blobs)) <= 64 * 1024:
            return decode_images(blobs, self.limits)
        return await asyncio.to_thread(decode_images, blobs, self.limits)

    async def prepare(self, model: LoadedModel, images: list[np.ndarray]) -> torch.Tensor:
        """The model input for decoded images (resizing off the event loop)."""
        h, w = input_size(model.preprocessing)
        if all(a.shape[:2] == (h, w) for a in images):
            return preprocess(images, model.preprocessing)
        return await asyncio.to_thread(preprocess, images, model.preprocessing)

    def check_tensor(self, model: LoadedModel, x: np.ndarray) -> torch.Tensor:
        """An OIP ``FP32 [N, 3, H, W]`` input checked against the checkpoint (400 if not)."""
        h, w = input_size(model.preprocessing)
        if x.ndim != 4 or x.shape[1:] != (3, h, w):
            raise ApiError(400, "invalid_shape", f"the {self.kind} ({model.id}) takes FP32 "
                           f"[N, 3, {h}, {w}], got {list(x.shape)}")
        return torch.from_numpy(np.array(x, dtype=np.float32))  # a writable copy
