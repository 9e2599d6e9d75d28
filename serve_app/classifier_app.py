"""The classifier's Serve deployment: it receives the HTTP request and runs the model.

Routes (full paths; the app is deployed twice, see :mod:`serve_app.app`): ``POST /v1/classify``
(raw, multipart or base64 JSON images) and the Open Inference Protocol under
``/v2/models/classifier`` (:mod:`serve_app.oip_routes`).
"""

# No `from __future__ import annotations`: FastAPI must see real classes (e.g. `Request`).
from typing import Any

import numpy as np
import torch
from fastapi import Request
from starlette.responses import Response

from serve_app import parsing as P
from serve_app.api import ERRORS, current_server, image_body, new_app
from serve_app.loading import LoadedModel
from serve_app.model_server import ModelServer, model_ingress
from serve_app.schemas import ClassifyJSON, ClassifyParams, ClassifyResponse

__all__ = ["app", "ClassifierServer"]

app = new_app("mve classifier")


@app.post("/v1/classify", response_model=ClassifyResponse, responses=ERRORS,
          openapi_extra=image_body(ClassifyJSON))
async def classify(request: Request) -> Response:
    """Top-k classes for one or many images (raw, multipart or base64 JSON)."""
    server: ClassifierServer = current_server()
    blobs, fields = await P.parse_images(request, server.limits)
    params = P.validate(ClassifyParams, fields)
    model = server.current()
    probs = await server.probabilities(model, await server.decode(blobs))
    return Response(P.classify_body(probs, model.class_names, params.top_k, model.id),
                    media_type="application/json")


@model_ingress(app, "classifier", max_ongoing=64, target_ongoing=16)
class ClassifierServer(ModelServer):
    """The image classifier behind its own routes; batched, hot-swappable."""

    def _forward(self, model: LoadedModel, x: torch.Tensor) -> torch.Tensor:
        return model.runner(x).float().softmax(dim=-1)

    async def probabilities(self, model: LoadedModel, images: list[np.ndarray]) -> np.ndarray:
        """``[N, K]`` class probabilities of decoded RGB images of any size."""
        return await self._classify(model, await self.prepare(model, images))

    async def _classify(self, model: LoadedModel, x: torch.Tensor) -> np.ndarray:
        probs = await self.predict(model, x)
        self._metrics.predicted([model.class_names[i] for i in probs.argmax(dim=1).tolist()])
        return probs.numpy()

    answer_images = probabilities
    answer_tensor = _classify

    def oip_outputs(self, model: LoadedModel, answer: np.ndarray) -> dict[str, Any]:
        return {"class_names": model.class_names, "probabilities": answer}
