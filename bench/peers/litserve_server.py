"""Peer "litserve": LitServe 0.2.19 with its batching, one CPU inference worker per route.

What a user picks for "FastAPI plus batching, done for me". Two ``LitAPI`` s on one
``LitServer`` (each ``api_path`` gets its own inference worker process, a spawned copy of
the model): ``POST /v1/classify`` (raw image/jpeg|png or JSON base64) and ``POST
/v2/models/classifier/infer`` (OIP v2 with the binary extension). Batching:
``max_batch_size=--max-batch-size`` *requests*, ``batch_timeout=--batch-wait-ms/1000``.
``GET /health`` is LitServe's (200 once every worker ran ``setup``: load and one warm-up
forward); ``GET /stats`` sums forwards/images over the workers (shared counters).

LitServe 0.2.19 parses every non-form body as JSON (``await request.json()``), so a raw
JPEG or an OIP binary body is a 500 on a stock route (LitServe issues #362, #732). This
peer uses the workaround from #732: a request handler whose ``_prepare_request`` hands the
raw bytes and headers to ``decode_request`` (a private-API override). Client errors are
``HTTPException`` s (the only error type LitServe passes back from a worker); an exception
handler renders their detail as the app's error JSON. Run::

    python bench/peers/litserve_server.py --port 8103 --checkpoint models/cifar10-classifier \
        --tta flip_translate --threads 2 --max-batch-size 32 --batch-wait-ms 5
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

import litserve as ls
import numpy as np
import torch
from fastapi import Depends, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from litserve.server import RegularRequestHandler

import common as C


class RawRequestHandler(RegularRequestHandler):
    """Passes the raw body and the headers the peers need (instead of ``request.json()``)."""

    async def _prepare_request(self, request: Request, request_type: Any) -> dict[str, Any]:
        return {"body": await request.body(),
                "content_type": request.headers.get("content-type"),
                "header_length": request.headers.get(C.HEADER_LENGTH)}


class RawBodyLitServer(ls.LitServer):
    """A ``LitServer`` whose API routes use :class:`RawRequestHandler`."""

    def _register_api_endpoints(self, lit_api: ls.LitAPI, request_type: Any,
                                response_type: Any) -> None:
        handler = RawRequestHandler(lit_api, self)

        async def endpoint_handler(request: Request) -> Response:
            return await handler.handle_request(request, Request)

        self.app.add_api_route(lit_api.api_path, endpoint_handler, methods=["POST"],
                               dependencies=[Depends(self.setup_auth(lit_api))])


class ClassifierAPI(ls.LitAPI):
    """``/v1/classify``: images in, the app's top-5 JSON out; batches requests.

    ``decode_request`` gives ``(meta, x)`` (``meta``: what ``encode_response`` needs besides
    the probabilities); ``predict`` concatenates a batch's inputs into one forward.
    """

    oip = False

    def __init__(self, args: Any, counters: Any, **kwargs: Any) -> None:
        super().__init__(max_batch_size=args.max_batch_size,
                         batch_timeout=args.batch_wait_ms / 1000.0, **kwargs)
        self.args, self.counters = args, counters

    def setup(self, device: str) -> None:
        self.served = C.load(self.args.checkpoint, self.args.tta, self.args.threads,
                             self.args.optimize)

    def decode_request(self, request: dict[str, Any]) -> tuple[Any, torch.Tensor]:
        try:
            return self._decode(request)
        except C.ApiError as exc:
            raise HTTPException(exc.status, detail=C.error_json(exc, self.oip)) from None

    def _decode(self, request: dict[str, Any]) -> tuple[Any, torch.Tensor]:
        blobs = C.classify_blobs(request["body"], request["content_type"])
        return None, C.decode(blobs, self.served.preprocessing)

    def batch(self, inputs: list[tuple[Any, torch.Tensor]]) -> list[tuple[Any, torch.Tensor]]:
        return list(inputs)

    def predict(self, batch: Any) -> Any:
        items = batch if isinstance(batch, list) else [batch]  # a tuple when unbatched
        x = torch.cat([t for _, t in items])
        probs = self.served.predict(x)
        with self.counters.get_lock():
            self.counters[0] += 1
            self.counters[1] += int(x.shape[0])
        parts = np.split(probs, np.cumsum([int(t.shape[0]) for _, t in items])[:-1])
        out = [(meta, p) for (meta, _), p in zip(items, parts, strict=True)]
        return out if isinstance(batch, list) else out[0]

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    def encode_response(self, output: tuple[Any, np.ndarray]) -> Any:
        return C.classify_response(self.served, output[1])


class InferAPI(ClassifierAPI):
    """``/v2/models/classifier/infer``: OIP v2 (binary extension); batches requests."""

    oip = True

    def _decode(self, request: dict[str, Any]) -> tuple[Any, torch.Tensor]:
        req = C.oip_parse(request["body"], request["header_length"])
        return req, C.decode(C.oip_images(req), self.served.preprocessing)

    def encode_response(self, output: tuple[Any, np.ndarray]) -> Response:
        content, headers = C.oip_encode(self.served, *output)
        return Response(content, headers=headers)


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0])
    counters = mp.get_context("spawn").Array("q", 2)  # [batches, images], shared by workers
    apis = [ClassifierAPI(args, counters, api_path="/v1/classify"),
            InferAPI(args, counters, api_path="/v2/models/classifier/infer")]
    server = RawBodyLitServer(apis, accelerator="cpu", workers_per_device=1, timeout=60)

    @server.app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, dict) else {"detail": exc.detail}
        return JSONResponse(detail, status_code=exc.status_code, headers=exc.headers)

    @server.app.get("/stats")
    async def stats() -> dict[str, int]:
        return {"batches": int(counters[0]), "images": int(counters[1])}

    server.run(host="127.0.0.1", port=args.port, log_level="warning",
               generate_client_file=False, num_api_servers=1)


if __name__ == "__main__":
    main()
