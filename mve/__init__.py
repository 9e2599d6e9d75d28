"""mve: a pure-PyTorch machine-vision library (models, data, training, checkpoints).

The public Python API (see the README, "Using mve from Python")::

    import mve
    clf = mve.load("cifar10-classifier")      # or a checkpoint directory, or an s3:// URI
    clf.predict("cat.jpg")[0].label
    mve.list_models()                          # the shipped models, their metrics and cards

Ray lives in the sibling packages ``cluster`` (Train/Tune) and ``serve_app`` (Serve);
nothing under ``mve`` imports ``ray``. The API is imported on first use, so ``import mve``
stays cheap for the submodules that do not need it.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("mve")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

# public name -> the module that defines it (imported on first use: a static import here
# would make every `from mve import __version__` in a submodule a cycle)
_API = {"load": "mve.api", "Classifier": "mve.api", "Generator": "mve.api", "Model": "mve.api",
        "Prediction": "mve.api", "Score": "mve.api", "Provenance": "mve.api",
        "Transforms": "mve.api", "list_models": "mve.pretrained", "ModelInfo": "mve.pretrained",
        "save_grid": "mve.images", "to_pil": "mve.images"}

__all__ = ["__version__", "load", "list_models", "Classifier", "Generator", "Model",
           "Prediction", "Score", "Provenance", "Transforms", "ModelInfo", "save_grid",
           "to_pil"]

def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'mve' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
