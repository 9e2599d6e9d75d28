"""Pydantic models: the application's arguments, each model's ``user_config``, and the
JSON request/response bodies of the HTTP API (they also drive the OpenAPI page at ``/docs``).

Pure pydantic: importing this module never imports Ray, so the CLI can build ``AppArgs``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve_app.families import MODELS

__all__ = [
    "ModelKind", "TTAMode", "AppArgs", "ModelArgs", "FrontArgs", "Limits",
    "ModelUserConfig", "ClassifyParams", "ClassifyJSON", "ClassScore",
    "Prediction", "ClassifyResponse", "SampleParams", "VariationParams", "InterpolateParams",
    "NoParams", "ImagesJSON", "ImagesResponse", "SwapStatus", "ModelInfo", "ModelsResponse",
    "ErrorBody", "ErrorResponse", "MiB",
]

MiB = 1024 * 1024


class Limits(BaseModel):
    """Request limits enforced by the ingress before any model runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(4 * MiB, ge=1024, description="largest request body (413)")
    max_images: int = Field(64, ge=1, le=4096, description="images (or tensor rows) per request")
    max_image_pixels: int = Field(1024 * 1024, ge=64,
                                  description="width*height of one image, checked before decoding")
    max_total_pixels: int = Field(16 * MiB, ge=64, description="decoded pixels per request")
    max_samples: int = Field(64, ge=1, le=1024, description="VAE n (sample/variations)")
    max_steps: int = Field(32, ge=2, le=1024, description="VAE interpolation steps")


ModelKind = Literal[MODELS]  # type: ignore[valid-type]  # the served families
TTAMode = Literal["none", "flip", "flip_translate"]


class AppArgs(Limits):
    """Arguments every mve Serve application takes (its ``args`` in ``serve_app/config.yaml``).

    The request limits, the API key and where the app is mounted. A model application (see
    :class:`ModelArgs`) also names its model; the front (:class:`FrontArgs`) the model apps.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    api_key_file: str | None = Field(None, description="file holding the API key (else env)")
    api_key_env: str = Field("MVE_API_KEY", description="environment variable with the API key")
    model_timeout_s: float = Field(30.0, gt=0, description="front: wait for a model (503)")
    mount: str = Field("", pattern=r"^(/[\w.~-]+)*$",
                       description="public path the routes live under (all apps alike)")

    @field_validator("api_key_file")
    @classmethod
    def _blank_is_none(cls, v: str | None) -> str | None:
        return v if v is None or v.strip() else None

    def limits(self) -> Limits:
        """The request limits part of the arguments."""
        return Limits(**{k: getattr(self, k) for k in Limits.model_fields})


class ModelArgs(AppArgs):
    """Arguments of a model application (``serve_app.app:build_model``).

    ``checkpoint`` is only the initial ``user_config.checkpoint`` (``serve run`` without a
    config file); swap models later by changing the deployment's ``user_config`` (in place).
    """

    model: ModelKind = Field(..., description="the model family this app serves")
    checkpoint: str | None = Field(None, description="initial checkpoint directory or URI")


class FrontArgs(AppArgs):
    """Arguments of the front application (``serve_app.app:build_front``): for each deployed
    model, the names of the Serve applications that serve it (its ``/v1`` app first)."""

    models: dict[ModelKind, list[str]] = Field(default_factory=dict)


class ModelUserConfig(BaseModel):
    """A model deployment's ``user_config``; changing it calls ``reconfigure`` in place."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(..., min_length=1, description="checkpoint directory or URI")
    max_batch_size: int = Field(32, ge=1, le=1024, description="images per forward pass")
    batch_wait_timeout_s: float = Field(0.0, ge=0.0, le=1.0, description=(
        "how long a batch that is not full may wait for more requests while none is queued "
        "(0: greedy, take what queued during the previous forward pass)"))
    tta: TTAMode | None = Field(None, description="classifier test-time augmentation "
                                "(None: the checkpoint's own setting)")
    torch_threads: int | None = Field(None, ge=1, le=256, description="torch intra-op threads")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description=(
        "classifier arithmetic: bf16 is ~1.7x faster on CPUs with native bfloat16 and moves "
        "validation accuracy by hundredths of a point; auto is bf16 where the replica's CPU has "
        "it, else fp32 (the VAE answers in fp32)"))


# -- /v1/classify --------------------------------------------------------------------------

class ClassifyParams(BaseModel):
    """Options of ``/v1/classify`` (query string, form fields or JSON keys)."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(5, ge=1, le=1000)


class ClassifyJSON(ClassifyParams):
    """JSON body of ``/v1/classify``: base64 images (data: URLs accepted)."""

    images: list[str] = Field(..., min_length=1)


class ClassScore(BaseModel):
    label: str
    index: int
    probability: float


class Prediction(BaseModel):
    label: str = Field(..., description="top-1 class")
    probability: float
    top_k: list[ClassScore]


class ClassifyResponse(BaseModel):
    model: Literal["classifier"] = "classifier"
    checkpoint_id: str
    predictions: list[Prediction]


# -- /v1/vae/* -------------------------------------------------------------------------------

class DrawParams(BaseModel):
    """``n`` draws at ``temperature`` (seeded when ``seed`` is set)."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)


class SampleParams(DrawParams):
    """``/v1/vae/sample``: ``n`` prior draws; ``steps`` for a diffusion prior (sampler steps,
    default 16; fewer are faster and coarser)."""

    steps: int | None = Field(None, ge=1, le=100)


class VariationParams(DrawParams):
    """``/v1/vae/variations``: ``n`` decodes around one image's posterior."""

    n: int = Field(8, ge=1)


class InterpolateParams(BaseModel):
    """``/v1/vae/interpolate``: ``steps`` decodes between two images' latents."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(8, ge=2)
    method: Literal["slerp", "lerp"] = "slerp"


class NoParams(BaseModel):
    """Routes without options (``/v1/vae/reconstruct``): unknown options are errors."""

    model_config = ConfigDict(extra="forbid")


class ImagesJSON(BaseModel):
    """Base64 images in a JSON body (``image`` is shorthand for one)."""

    images: list[str] | None = None
    image: str | None = None


class ImagesResponse(BaseModel):
    """Generated images as base64 PNGs (``?format=json`` or ``Accept: application/json``)."""

    model: Literal["vae"] = "vae"
    checkpoint_id: str
    width: int
    height: int
    images: list[str]


# -- /v1/models -----------------------------------------------------------------------------

class SwapStatus(BaseModel):
    swaps: int = 0
    failed_swaps: int = 0
    last_error: str | None = None
    requested_checkpoint: str | None = None


class ModelInfo(BaseModel):
    name: ModelKind
    checkpoint_id: str
    checkpoint: str
    model_name: str
    class_names: list[str] | None = None
    preprocessing: dict[str, Any]
    metrics: dict[str, Any] = Field(default_factory=dict)
    loaded_at: float
    replica: str
    max_batch_size: int
    batch_wait_timeout_s: float
    tta: TTAMode | None = None
    torch_threads: int | None = None
    precision: Literal["fp32", "bf16"] = Field("fp32", description="what auto resolved to")
    batches: int = Field(0, description="forward passes this replica ran")
    batched_images: int = Field(0, description="images in those forward passes")
    swap: SwapStatus


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    unavailable: dict[str, str] = Field(default_factory=dict,
                                        description="configured models that did not answer")


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
