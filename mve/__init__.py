"""mve: a pure-PyTorch machine-vision library (models, data, training, checkpoints).

Ray lives in the sibling packages ``cluster`` (Train/Tune) and ``serve_app`` (Serve);
nothing under ``mve`` imports ``ray``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mve")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
