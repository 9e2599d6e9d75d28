"""Peer "bare_batched": the bare FastAPI server plus greedy in-process dynamic batching.

The one-process ceiling: ``async`` endpoints decode the images on the event loop and put
``(tensor, future)`` on an ``asyncio.Queue``; one worker task takes the first item, then
everything already queued (up to ``--max-batch-size`` images; a request that would overflow
waits for the next batch), runs one forward in ``asyncio.to_thread`` and sets each future.
It never waits for a batch to fill (``--batch-wait-ms`` is accepted and ignored): while one
forward runs, the next batch queues up. Routes and command line as ``bare.py``; ``GET /stats``
counts forwards and images. Run::

    python bench/peers/bare_batched.py --port 8102 --checkpoint models/cifar10-classifier \
        --tta flip_translate --threads 2 --max-batch-size 32
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

import common as C

log = logging.getLogger("bare_batched")
Item = tuple[torch.Tensor, asyncio.Future]


class GreedyBatcher:
    """Greedy batching of model inputs in one worker task (``start`` inside the event loop)."""

    def __init__(self, served: C.Served, max_batch_size: int) -> None:
        self.served = served
        self.max_batch_size = max(1, max_batch_size)
        self._queue: asyncio.Queue[Item] | None = None
        self._carry: Item | None = None  # taken from the queue but did not fit the last batch
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name="greedy-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def submit(self, x: torch.Tensor) -> np.ndarray:
        """Probabilities for ``x`` ``[n, 3, H, W]``, computed in some batch."""
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put((x, fut))
        return await fut

    async def _take(self) -> list[Item]:
        first = self._carry if self._carry is not None else await self._queue.get()
        self._carry = None
        batch, n = [first], int(first[0].shape[0])
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if n + item[0].shape[0] > self.max_batch_size:
                self._carry = item
                break
            batch.append(item)
            n += int(item[0].shape[0])
        return [it for it in batch if not it[1].done()]  # skip requests already gone

    def _forward(self, batch: list[Item]) -> np.ndarray:
        return self.served.predict(torch.cat([x for x, _ in batch]))

    async def _run(self) -> None:
        while True:
            batch = await self._take()
            if not batch:
                continue
            try:
                probs = await asyncio.to_thread(self._forward, batch)
            except Exception as exc:  # one bad batch fails its requests, not the worker
                log.exception("batch of %d requests failed", len(batch))
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            start = 0
            for x, fut in batch:
                stop = start + int(x.shape[0])
                if not fut.done():
                    fut.set_result(probs[start:stop])
                start = stop


def build_app(served: C.Served, max_batch_size: int) -> FastAPI:
    """The FastAPI app with a greedy batcher started in its lifespan."""
    batcher = GreedyBatcher(served, max_batch_size)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="bare_batched peer", lifespan=lifespan)

    @app.exception_handler(C.ApiError)
    async def _api_error(request: Request, exc: C.ApiError) -> JSONResponse:
        oip = request.url.path.startswith("/v2")
        return JSONResponse(C.error_json(exc, oip), status_code=exc.status)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "checkpoint_id": served.checkpoint_id}

    @app.get("/stats")
    async def stats() -> dict:
        return served.stats.as_dict()

    @app.post("/v1/classify")
    async def classify(request: Request) -> dict:
        blobs = C.classify_blobs(await request.body(), request.headers.get("content-type"))
        probs = await batcher.submit(C.decode(blobs, served.preprocessing))
        return C.classify_response(served, probs)

    @app.post("/v2/models/classifier/infer")
    async def infer(request: Request) -> Response:
        req = C.oip_parse(await request.body(), request.headers.get(C.HEADER_LENGTH))
        probs = await batcher.submit(C.decode(C.oip_images(req), served.preprocessing))
        content, headers = C.oip_encode(served, req, probs)
        return Response(content, headers=headers)

    return app


def main() -> None:
    C.serve_peer(__doc__, lambda served, args: build_app(served, args.max_batch_size))


if __name__ == "__main__":
    main()
