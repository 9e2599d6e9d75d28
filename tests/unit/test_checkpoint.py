"""Checkpoints: safetensors + JSON, atomic, hash-verified, never unpickled."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from mve.checkpoint import (
    CheckpointError,
    flatten_state,
    load_checkpoint,
    load_resume_state,
    load_training_state,
    read_meta,
    save_checkpoint,
    unflatten_state,
)
from mve.models import build_model, make_config

PREP = {"input_size": [32, 32], "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}
CLASSES = [f"c{i}" for i in range(10)]


def _save(path: Path, model=None, **kw) -> tuple[Path, torch.nn.Module]:
    cfg = make_config("classifier", {"final_channels": 64, "cnn_layers": 4, "fcn_layers": 2})
    model = model or build_model("classifier", cfg)
    out = save_checkpoint(path, model, model_name="classifier", model_config=cfg,
                          preprocessing=PREP, class_names=CLASSES, metrics={"val_accuracy": 0.5},
                          provenance={"source": "x"}, **kw)
    return out, model


def test_round_trip_gives_identical_outputs(tmp_path):
    path, model = _save(tmp_path / "ck")
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "mve.json"]
    ck = load_checkpoint(path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), ck.model(x))
    assert not ck.model.training
    assert ck.class_names == CLASSES and ck.preprocessing["mean"] == PREP["mean"]
    assert ck.metrics["val_accuracy"] == 0.5
    meta = read_meta(path)
    for key in ("format_version", "model_name", "model_config", "class_names", "preprocessing",
                "metrics", "provenance", "mve_version", "files"):
        assert key in meta
    assert len(meta["files"]["model.safetensors"]["sha256"]) == 64
    assert ck.checkpoint_id.startswith("classifier-")


def test_vae_round_trip(tmp_path):
    cfg = make_config("vae", preset="tiny")
    model = build_model("vae", cfg).eval()
    save_checkpoint(tmp_path / "v", model, model_name="vae", model_config=cfg,
                    preprocessing={"input_size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3})
    ck = load_checkpoint(tmp_path / "v")
    z = torch.randn(1, *cfg.latent_shape)
    assert torch.equal(model.decode(z), ck.model.decode(z))


def test_wrapped_model_prefixes_are_stripped(tmp_path):
    cfg = make_config("classifier", {"final_channels": 64, "cnn_layers": 4, "fcn_layers": 2})
    inner = build_model("classifier", cfg)

    class Wrapper(torch.nn.Module):  # the shape of DDP: the real model under .module
        def __init__(self, m):
            super().__init__()
            self.module = m

    _save(tmp_path / "w", model=Wrapper(inner))
    load_checkpoint(tmp_path / "w")  # strict load succeeds only without "module." prefixes


def test_overwrite_in_place_and_no_leftover_temp_dirs(tmp_path):
    path, _ = _save(tmp_path / "ck")
    sha1 = read_meta(path)["files"]["model.safetensors"]["sha256"]
    _save(tmp_path / "ck")
    sha2 = read_meta(path)["files"]["model.safetensors"]["sha256"]
    assert sha1 != sha2
    load_checkpoint(path)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_tampered_weights_are_refused(tmp_path):
    path, _ = _save(tmp_path / "ck")
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)


def test_tampered_manifest_is_refused(tmp_path):
    path, _ = _save(tmp_path / "ck")
    meta = json.loads((path / "mve.json").read_text())
    meta["model_config"]["final_channels"] = 65
    (path / "mve.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(path)
    (path / "mve.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)


def test_future_format_version_is_refused(tmp_path):
    path, _ = _save(tmp_path / "ck")
    meta = json.loads((path / "mve.json").read_text())
    meta["format_version"] = 99
    (path / "mve.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format_version"):
        load_checkpoint(path)


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_in_place_of_weights_is_refused_and_not_executed(tmp_path):
    path, _ = _save(tmp_path / "ck")
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"weights": _Exploit(marker)})
    (path / "model.safetensors").write_bytes(payload)
    meta = json.loads((path / "mve.json").read_text())
    import hashlib

    meta["files"]["model.safetensors"]["sha256"] = hashlib.sha256(payload).hexdigest()
    (path / "mve.json").write_text(json.dumps(meta))  # the attacker also fixed the hash
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_checkpoint(path)
    assert not marker.exists()
    torch.save({"x": 1}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="never loads pickled"):
        load_checkpoint(tmp_path / "model.pt")


def test_missing_pieces_get_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="mve.json is missing"):
        load_checkpoint(tmp_path / "empty")
    path, _ = _save(tmp_path / "ck")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(path)


def test_training_state_round_trip(tmp_path):
    cfg = make_config("classifier", {"final_channels": 64, "cnn_layers": 4, "fcn_layers": 2})
    model = build_model("classifier", cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    opt.step()
    state = {"epoch": 3, "history": [{"epoch": 1, "loss": 2.0}], "optimizer": opt.state_dict()}
    _save(tmp_path / "ck", model=model, training_state=state)
    back = load_training_state(tmp_path / "ck")
    assert back["epoch"] == 3 and back["history"] == state["history"]
    opt2 = torch.optim.SGD(model.parameters(), lr=0.5)
    opt2.load_state_dict(back["optimizer"])
    assert opt2.param_groups[0]["lr"] == 0.1 and opt2.param_groups[0]["nesterov"] is True
    for k, v in opt.state_dict()["state"].items():
        assert torch.equal(v["momentum_buffer"], opt2.state_dict()["state"][k]["momentum_buffer"])



def test_resume_state_reads_the_manifest_once(tmp_path, monkeypatch):
    import mve.checkpoint as ck

    cfg = make_config("classifier", {"final_channels": 64, "cnn_layers": 4, "fcn_layers": 2})
    model = build_model("classifier", cfg)
    _save(tmp_path / "ck", model=model, training_state={"epoch": 2, "history": []})
    reads = []
    real = ck.read_meta
    monkeypatch.setattr(ck, "read_meta", lambda p: reads.append(p) or real(p))
    weights, state = load_resume_state(tmp_path / "ck")
    assert len(reads) == 1 and state["epoch"] == 2
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    _save(tmp_path / "plain", model=model)
    assert load_resume_state(tmp_path / "plain")[1] is None

def test_flatten_state_preserves_types():
    obj = {"a": (1, 2.5, "s", None, True), 3: [torch.ones(2)], "nested": {"t": torch.zeros(1)}}
    tensors: dict[str, torch.Tensor] = {}
    skel = flatten_state(obj, tensors)
    json.dumps(skel)  # skeleton is pure JSON
    back = unflatten_state(json.loads(json.dumps(skel)), tensors)
    assert back["a"] == (1, 2.5, "s", None, True)
    assert torch.equal(back[3][0], torch.ones(2))
    with pytest.raises(TypeError):
        flatten_state({"x": object()}, {})
