"""Peer "bare": the 30-line FastAPI server a new user writes.

One uvicorn process, plain ``def`` (sync) endpoints that FastAPI runs in its thread pool, the
model called once per request, no batching. Routes: ``GET /health``, ``GET /stats``,
``POST /v1/classify`` (raw image/jpeg|png or JSON base64) and ``POST
/v2/models/classifier/infer`` (OIP v2, binary extension). Run::

    python bench/peers/bare.py --port 8101 --checkpoint models/cifar10-classifier \
        --tta flip_translate --threads 2
"""

from __future__ import annotations

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

import common as C


async def _body(request: Request) -> bytes:
    return await request.body()


def build_app(served: C.Served) -> FastAPI:
    """The FastAPI app around a loaded checkpoint."""
    app = FastAPI(title="bare peer")

    @app.exception_handler(C.ApiError)
    def _api_error(request: Request, exc: C.ApiError) -> JSONResponse:
        oip = request.url.path.startswith("/v2")
        return JSONResponse(C.error_json(exc, oip), status_code=exc.status)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "checkpoint_id": served.checkpoint_id}

    @app.get("/stats")
    def stats() -> dict:
        return served.stats.as_dict()

    @app.post("/v1/classify")
    def classify(request: Request, body: bytes = Depends(_body)) -> dict:
        blobs = C.classify_blobs(body, request.headers.get("content-type"))
        probs = served.predict(C.decode(blobs, served.preprocessing))
        return C.classify_response(served, probs)

    @app.post("/v2/models/classifier/infer")
    def infer(request: Request, body: bytes = Depends(_body)) -> Response:
        req = C.oip_parse(body, request.headers.get(C.HEADER_LENGTH))
        probs = served.predict(C.decode(C.oip_images(req), served.preprocessing))
        content, headers = C.oip_encode(served, req, probs)
        return Response(content, headers=headers)

    return app


def main() -> None:
    C.serve_peer(__doc__, lambda served, args: build_app(served))


if __name__ == "__main__":
    main()
