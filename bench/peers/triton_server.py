"""Peer "triton": NVIDIA Triton Inference Server via PyTriton 0.7.0, with its dynamic batcher.

What a user picks for "the standard inference server". PyTriton starts the ``tritonserver``
binary it bundles (HTTP on ``--port``; gRPC and metrics off) with a Python-backend model
``classifier`` whose requests it proxies to ``infer`` in this process. Dynamic batcher:
``max_batch_size=--max-batch-size`` *images*, ``max_queue_delay_microseconds`` from
``--batch-wait-ms``, one model instance. Only Triton's own routes exist:

- ``POST /v2/models/classifier/infer`` (OIP v2, binary extension): input ``image`` BYTES
  ``[N, 1]``, outputs ``probabilities`` FP32 ``[N, 10]`` and ``label`` BYTES ``[N, 1]``.
  Triton refuses shape ``[N]`` for a batching model ("Expected [-1,1], got [1]": the config
  ``dims`` may not be empty), so clients send ``[N, 1]`` (``make_bodies.py``: ``infer_2d.bin``);
- ``GET /v2/models/classifier/ready`` instead of ``/health`` (200 once the model is loaded,
  after the checkpoint load and one warm-up forward; ``/v2/health/ready`` turns 200 earlier,
  before PyTriton has loaded the model);
- ``GET /v2/models/classifier/stats`` instead of ``/stats`` (``inference_count`` /
  ``execution_count`` is the mean batch size; PyTriton token-protects it by default, this
  peer opens it). There is no ``/v1/classify``.

PyTriton lives in its own venv (it pins ``numpy<2``): ``bench/peers/setup_pytriton.sh``
makes ``/tmp/pytriton-venv`` (torch, mve etc. come from ``.venv`` through a ``.pth``), and
this script re-executes itself there (``$PYTRITON_PYTHON``). Its Python-backend stub links
the system ``libpython3.11.so`` (Debian 3.11.2) while running this interpreter's stdlib
(pyenv 3.11.7), and dies in ``multiprocessing.resource_tracker`` with
``'_thread.RLock' object has no attribute '_recursion_count'``; :func:`fix_libpython` puts
this interpreter's own ``libpython`` first on ``LD_LIBRARY_PATH`` (``PEER_TRITON_NO_LIBFIX=1``
skips it, to reproduce the failure). A bad image fails the whole batch it is in. Run::

    python bench/peers/triton_server.py --port 8104 --checkpoint models/cifar10-classifier \
        --tta flip_translate --threads 2 --max-batch-size 32 --batch-wait-ms 5
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
from collections.abc import Callable
from typing import Any

PYTRITON_PYTHON = os.environ.get("PYTRITON_PYTHON", "/tmp/pytriton-venv/bin/python")


def reexec_in_pytriton_venv() -> None:
    """Re-runs this script under the PyTriton venv's python when ``pytriton`` is missing."""
    try:
        import pytriton  # noqa: F401
    except ImportError:
        venv = os.path.dirname(os.path.dirname(os.path.abspath(PYTRITON_PYTHON)))
        if os.path.abspath(sys.prefix) == venv or not os.path.exists(PYTRITON_PYTHON):
            sys.exit(f"pytriton is not importable and {PYTRITON_PYTHON} is not a PyTriton "
                     "venv: run bench/peers/setup_pytriton.sh (or set PYTRITON_PYTHON)")
        os.execv(PYTRITON_PYTHON, [PYTRITON_PYTHON, *sys.argv])


def fix_libpython() -> None:
    """Makes the Python-backend stub load this interpreter's ``libpython``, not the system's."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if os.environ.get("PEER_TRITON_NO_LIBFIX") == "1" or not sysconfig.get_config_var(
            "Py_ENABLE_SHARED") or not libdir:
        return
    old = os.environ.get("LD_LIBRARY_PATH")
    os.environ["LD_LIBRARY_PATH"] = libdir + (":" + old if old else "")


def make_infer(served: Any) -> Callable[..., Any]:
    """The batched inference callable: ``image`` ``[B, 1]`` bytes -> outputs."""
    import numpy as np
    from pytriton.decorators import batch

    import common as C

    @batch
    def infer(image: np.ndarray) -> dict[str, np.ndarray]:
        blobs = [bytes(b) for b in image.reshape(-1)]
        probs = served.predict(C.decode(blobs, served.preprocessing))
        labels = [served.class_names[i].encode() for i in probs.argmax(axis=1).tolist()]
        return {"probabilities": probs,
                "label": np.array(labels, dtype=object).reshape(-1, 1)}

    return infer


def serve(args: argparse.Namespace) -> None:
    """Loads the checkpoint, binds ``classifier`` and serves until interrupted."""
    import numpy as np
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import (
        DEFAULT_PROTECTED_ENDPOINTS,
        Triton,
        TritonConfig,
        TritonSecurityConfig,
    )

    import common as C

    served = C.load(args.checkpoint, args.tta, args.threads, args.optimize)
    config = TritonConfig(http_address="127.0.0.1", http_port=args.port, allow_grpc=False,
                          allow_metrics=False, log_verbose=0)
    batcher = DynamicBatcher(max_queue_delay_microseconds=int(args.batch_wait_ms * 1000))
    # PyTriton token-protects the statistics API by default; open it for the benchmark.
    security = TritonSecurityConfig(restricted_endpoints=[
        e for e in DEFAULT_PROTECTED_ENDPOINTS if e != "statistics"])
    with Triton(config=config, security_config=security) as triton:
        triton.bind(model_name=C.MODEL, infer_func=make_infer(served),
                    inputs=[Tensor(name="image", dtype=bytes, shape=(1,))],
                    outputs=[Tensor(name="probabilities", dtype=np.float32,
                                    shape=(len(served.class_names),)),
                             Tensor(name="label", dtype=bytes, shape=(1,))],
                    config=ModelConfig(max_batch_size=args.max_batch_size, batcher=batcher),
                    strict=True)
        triton.serve()


def main() -> None:
    reexec_in_pytriton_venv()
    fix_libpython()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import common as C

    serve(C.parse_args(__doc__.splitlines()[0]))


if __name__ == "__main__":
    main()
