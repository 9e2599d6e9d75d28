"""Open Inference Protocol v2 routes of one model application (``/v2/models/{model}/...``).

Each model app answers its own metadata, readiness and ``infer`` routes, so an OIP request
reaches the replica that runs the model directly; the server-wide routes (``/v2``,
``/v2/health/*``) and unknown model names are answered by the front (:mod:`serve_app.front`).
The model's replica provides ``info()`` and ``oip_result(req)``.
"""

# No `from __future__ import annotations`: FastAPI must see real classes (e.g. `Request`).
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import Response

from serve_app import parsing as P
from serve_app.api import current_server
from serve_app.errors import ApiError
from serve_app.oip import (
    HEADER_LENGTH,
    decompress_body,
    encode_infer_response,
    model_metadata,
    outputs_for,
    parse_infer_request,
)

__all__ = ["add_oip_routes"]


def _info(version: str | None) -> dict[str, Any]:
    server = current_server()
    info = server.info()
    if version not in (None, "", info["checkpoint_id"]):
        raise ApiError(404, "version_not_found", f"{server.kind} serves version "
                       f"{info['checkpoint_id']}, not {version!r}")
    return info


def add_oip_routes(app: FastAPI, model: str) -> None:
    """Registers ``model``'s OIP routes on ``app``."""
    base = f"/v2/models/{model}"

    async def meta(model_version: str | None = None) -> dict:
        """OIP model metadata (inputs/outputs; the version is the checkpoint id)."""
        return model_metadata(model, _info(model_version))

    async def ready(model_version: str | None = None) -> dict:
        """OIP model readiness."""
        _info(model_version)
        return {"name": model, "ready": True}

    async def infer(request: Request, model_version: str | None = None) -> Response:
        """OIP inference: FP32 ``input`` [N,3,H,W] (normalised) or BYTES ``image`` [N]."""
        server = current_server()
        if model_version:
            _info(model_version)
        limits = server.limits
        body = await P.read_body(request, limits.max_body_bytes)
        body = decompress_body(body, request.headers.get("content-encoding"),
                               limits.max_body_bytes)
        req = parse_infer_request(body, request.headers.get(HEADER_LENGTH), limits, model)
        result = await server.oip_result(req)
        out, headers = encode_infer_response(model, result["checkpoint_id"], req,
                                             outputs_for(model, result))
        return Response(out, headers=headers)

    for suffix in ("", "/versions/{model_version}"):
        app.add_api_route(base + suffix, meta, methods=["GET"], name=f"{model}_metadata")
        app.add_api_route(base + suffix + "/ready", ready, methods=["GET"],
                          name=f"{model}_ready")
        app.add_api_route(base + suffix + "/infer", infer, methods=["POST"],
                          name=f"{model}_infer")
