"""The checkpoint format: a directory with ``model.safetensors`` and ``mve.json``.

``mve.json`` records the format version, model name and config, class names, the
preprocessing the model expects (input size, mean, std), metrics, data provenance, the
mve version and the sha256 of every weight file. An optional
``training_state.safetensors`` (+ its JSON skeleton inside ``mve.json``) holds the
optimiser/scheduler/epoch state needed to resume.

Nothing here unpickles: tensors go through safetensors, everything else through JSON.
Loading verifies the recorded hashes and refuses anything else with a clear error.

Writes are atomic: a new checkpoint is staged in a sibling temporary directory and
renamed into place. Overwriting an existing checkpoint replaces the weight files first
and ``mve.json`` last, each with ``os.replace``; a crash in between leaves a hash
mismatch that loading reports, never silently mixed weights.

``mve.json`` is the commit record: a copy or upload of a checkpoint (object stores have no
rename) writes it after every file it lists, and :func:`verify_checkpoint` accepts a directory
only when the manifest is there and every listed file is present with its recorded sha256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mve import __version__
from mve.errors import UserError
from mve.models import build_model, config_to_dict, get_spec, make_config
from mve.models.latent_prior import check_prior_fits

__all__ = [
    "FORMAT_VERSION", "CheckpointError", "Checkpoint", "save_checkpoint", "load_checkpoint",
    "read_meta", "verify_checkpoint", "load_training_state", "load_resume_state",
    "unwrap_model",
]

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
STATE = "training_state.safetensors"
META = "mve.json"
PRIOR_DIR = "prior"  # a VAE's diffusion prior, a checkpoint of its own inside the VAE's folder

logger = logging.getLogger(__name__)
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin")


class CheckpointError(UserError):
    """A checkpoint that is missing, malformed, tampered with or not in mve's format."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strips DDP/FSDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, allow_nan=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


# -- nested state (optimizer, scheduler, RNG) <-> tensors + JSON skeleton --------------

def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "s") -> Any:
    """Replaces every tensor in a nested structure by a reference; returns the JSON skeleton."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: flatten_state(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}}
        return {"__items__": [[k, flatten_state(v, tensors, f"{prefix}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, list | tuple):
        items = [flatten_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint's training state")


def unflatten_state(skel: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(skel, dict):
        if "__tensor__" in skel:
            return tensors[skel["__tensor__"]]
        if "__dict__" in skel:
            return {k: unflatten_state(v, tensors) for k, v in skel["__dict__"].items()}
        if "__items__" in skel:
            return {k: unflatten_state(v, tensors) for k, v in skel["__items__"]}
        if "__tuple__" in skel:
            return tuple(unflatten_state(v, tensors) for v in skel["__tuple__"])
        raise CheckpointError(f"malformed training-state skeleton: keys {sorted(skel)}")
    if isinstance(skel, list):
        return [unflatten_state(v, tensors) for v in skel]
    return skel


# -- save ------------------------------------------------------------------------------

def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, model_name: str,
                    model_config: Any, preprocessing: Mapping[str, Any],
                    class_names: list[str] | tuple[str, ...] | None = None,
                    metrics: Mapping[str, Any] | None = None,
                    provenance: Mapping[str, Any] | None = None,
                    train_config: Mapping[str, Any] | None = None,
                    training_state: Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Writes a checkpoint directory atomically and returns its path.

    Args:
        preprocessing: ``{"input_size": [H, W], "mean": [...], "std": [...]}``; pixels are
            scaled to [0, 1] and then normalised with mean/std.
        training_state: nested dict of tensors and plain values for resuming (optional).
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    get_spec(model_name)
    _check_preprocessing(preprocessing)
    state = {k.removeprefix("module.").replace("_orig_mod.", ""): v
             for k, v in unwrap_model(model).state_dict().items()}
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        _save_tensors(state, stage / WEIGHTS)
        meta = _manifest(model_name, model_config, preprocessing, class_names, metrics,
                         provenance, train_config, extra)
        meta["files"] = {WEIGHTS: {"sha256": _sha256(stage / WEIGHTS)}}
        if training_state is not None:
            tensors: dict[str, torch.Tensor] = {}
            meta["training_state"] = flatten_state(dict(training_state), tensors)
            _save_tensors(tensors, stage / STATE)
            meta["files"][STATE] = {"sha256": _sha256(stage / STATE)}
        _write_json(stage / META, meta)
        _fsync_dir(stage)
        _commit_stage(stage, dest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return dest


def _manifest(model_name: str, model_config: Any, preprocessing: Mapping[str, Any],
              class_names: list[str] | tuple[str, ...] | None, metrics: Mapping[str, Any] | None,
              provenance: Mapping[str, Any] | None, train_config: Mapping[str, Any] | None,
              extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """The JSON manifest of a checkpoint, without its file hashes."""
    return {
        "format": "mve-checkpoint",
        "format_version": FORMAT_VERSION,
        "model_name": model_name,
        "model_config": config_to_dict(model_config),
        "class_names": list(class_names) if class_names is not None else None,
        "preprocessing": {k: (list(v) if isinstance(v, tuple) else v)
                          for k, v in preprocessing.items()},
        "metrics": dict(metrics or {}),
        "provenance": dict(provenance or {}),
        "train_config": dict(train_config) if train_config is not None else None,
        "mve_version": __version__,
        "torch_version": torch.__version__,
        **dict(extra or {}),
    }


def _commit_stage(stage: Path, dest: Path) -> None:
    """Moves a fully written staging folder into place: a rename when ``dest`` is new, else
    file by file with ``mve.json`` last (it names the others' hashes, so a reader never pairs
    new metadata with old weights)."""
    if not dest.exists():
        os.rename(stage, dest)
    else:
        if not dest.is_dir():
            raise CheckpointError(f"{dest} exists and is not a directory")
        for name in (WEIGHTS, STATE, META):
            if (stage / name).exists():
                os.replace(stage / name, dest / name)
            elif name == STATE and (dest / STATE).exists():
                (dest / STATE).unlink()
        shutil.rmtree(stage, ignore_errors=True)
    _fsync_dir(dest.parent)


def _check_preprocessing(p: Mapping[str, Any]) -> None:
    missing = {"input_size", "mean", "std"} - set(p)
    if missing:
        raise CheckpointError(f"preprocessing lacks {sorted(missing)}")
    if any(float(s) <= 0 for s in p["std"]):
        raise CheckpointError(f"preprocessing std must be positive, got {p['std']}")


# -- load ------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (in eval mode) and its metadata."""

    path: Path
    model: nn.Module
    model_name: str
    model_config: Any
    meta: dict[str, Any]

    @property
    def class_names(self) -> list[str] | None:
        return self.meta.get("class_names")

    @property
    def preprocessing(self) -> dict[str, Any]:
        return self.meta["preprocessing"]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.meta.get("metrics", {})

    @property
    def checkpoint_id(self) -> str:
        """A short, content-derived id: the model name and the weights' sha256 prefix."""
        return f"{self.model_name}-{self.meta['files'][WEIGHTS]['sha256'][:12]}"


def _resolve_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.suffix.lower() in _PICKLE_SUFFIXES and not (p.is_dir() and (p / META).exists()):
        raise CheckpointError(
            f"{p}: mve never loads pickled checkpoints ({p.suffix}); a checkpoint is a directory "
            f"with {WEIGHTS} and {META}")
    if p.is_file() and p.name in (WEIGHTS, META, STATE):
        p = p.parent
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {p} is not a directory with {WEIGHTS} and {META}")
    return p


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks ``mve.json`` (format, version, required keys)."""
    d = _resolve_dir(path)
    meta_path = d / META
    if not meta_path.exists():
        raise CheckpointError(f"{d} is not an mve checkpoint: {META} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{meta_path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != "mve-checkpoint":
        raise CheckpointError(f"{meta_path} is not an mve checkpoint manifest")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: format_version {version!r} is not supported by mve {__version__} "
            f"(reads up to {FORMAT_VERSION})")
    for key in ("model_name", "model_config", "preprocessing", "files"):
        if key not in meta:
            raise CheckpointError(f"{meta_path} lacks {key!r}")
    if WEIGHTS not in meta["files"]:
        raise CheckpointError(f"{meta_path} records no hash for {WEIGHTS}")
    return meta


def _verified_tensors(d: Path, name: str, meta: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    f = d / name
    if not f.exists():
        raise CheckpointError(f"{d}: {name} is missing")
    expected = meta["files"].get(name, {}).get("sha256")
    actual = _sha256(f)
    if actual != expected:
        raise CheckpointError(
            f"{f}: sha256 {actual[:16]}... does not match {expected and expected[:16]}... recorded "
            f"in {META}; the checkpoint was modified or only partly written. Refusing to load it.")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{f} is not a valid safetensors file: {exc}") from None


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Checks that a checkpoint is complete without loading it; returns its manifest.

    Complete means: a valid ``mve.json`` and every file it records present with the recorded
    sha256 (and, for ``.safetensors`` files, a valid safetensors header). A checkpoint whose
    copy or upload was cut short fails: its manifest is missing, or a file it lists is missing
    or differs.

    Raises:
        CheckpointError: the checkpoint is incomplete, tampered with or not in mve's format.
    """
    d = _resolve_dir(path)
    meta = read_meta(d)
    files = meta["files"]
    if not isinstance(files, Mapping):
        raise CheckpointError(f"{d / META}: 'files' must map file names to hashes")
    for name, entry in files.items():
        if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
            raise CheckpointError(f"{d / META}: bad file name {name!r}")
        f = d / name
        if not f.is_file():
            raise CheckpointError(f"{d}: {name} is missing; the checkpoint is incomplete")
        expected = entry.get("sha256") if isinstance(entry, Mapping) else None
        actual = _sha256(f)
        if actual != expected:
            raise CheckpointError(
                f"{f}: sha256 {actual[:16]}... does not match the one recorded in {META}; the "
                f"checkpoint was modified or only partly written")
        if name.endswith(".safetensors"):
            try:  # the header only: tensors stay on disk
                with safe_open(str(f), framework="pt") as st:
                    st.keys()
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"{f} is not a valid safetensors file: {exc}") from None
    if "training_state" in meta and STATE not in files:
        raise CheckpointError(f"{d / META} has a training state but records no hash for {STATE}")
    return meta


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> Checkpoint:
    """Loads a checkpoint directory, verifying hashes, and rebuilds the model via the registry."""
    d = _resolve_dir(path)
    meta = read_meta(d)
    try:
        config = make_config(meta["model_name"], meta["model_config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{d}: model config in {META} is invalid: {exc}") from None
    state = _verified_tensors(d, WEIGHTS, meta)
    model = build_model(meta["model_name"], config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{d}: weights do not fit the recorded model config: {exc}") from None
    model.to(device).eval()
    ckpt = Checkpoint(d, model, meta["model_name"], config, meta)
    if meta["model_name"] == "vae" and (d / PRIOR_DIR / META).is_file():
        _attach_prior(ckpt, device)
    return ckpt


def _attach_prior(vae: Checkpoint, device: str | torch.device) -> None:
    """Hands a VAE the diffusion prior saved beside it (``<vae>/prior``); a prior fitted to
    another encoder is left out with a warning, and the VAE keeps its own prior."""
    prior = load_checkpoint(vae.path / PRIOR_DIR, device=device)
    try:
        if prior.model_name != "prior":
            raise ValueError(f"{prior.path} is a {prior.model_name} checkpoint, not a prior")
        check_prior_fits(prior.meta, vae.model, prior_path=prior.path, where=str(vae.path))
    except ValueError as exc:
        logger.warning("not using %s: %s", prior.path, exc)
        return
    vae.model.set_diffusion_prior(prior.model)


def load_training_state(path: str | os.PathLike) -> dict[str, Any] | None:
    """The nested training state saved with the checkpoint, or None if it has none."""
    d = _resolve_dir(path)
    return _training_state(d, read_meta(d))


def load_resume_state(path: str | os.PathLike
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """What resuming needs, from one read of the manifest: the verified weights (to load into
    the run's own model, which checks that they fit) and the training state (None if none)."""
    d = _resolve_dir(path)
    meta = read_meta(d)
    return _verified_tensors(d, WEIGHTS, meta), _training_state(d, meta)


def _training_state(d: Path, meta: Mapping[str, Any]) -> dict[str, Any] | None:
    if "training_state" not in meta:
        return None
    return unflatten_state(meta["training_state"], _verified_tensors(d, STATE, meta))
