"""Ray Serve application for mve checkpoints: a classifier and a VAE behind a FastAPI ingress.

    mve serve --classifier runs/clf --vae runs/vae          # embedded Ray, http://127.0.0.1:8000/
    serve run serve_app.app:build_app classifier=runs/clf    # Ray Serve's own CLI
    serve deploy serve_app/config.yaml                       # a running cluster (also KubeRay)
    mve predict cat.png --url http://127.0.0.1:8000
    mve generate --n 16 --out grid.png

Modules: :mod:`~serve_app.app` (the typed builder ``build_app``), :mod:`~serve_app.deployments`
(model deployments: hot swap via ``user_config``, ``@serve.batch``), :mod:`~serve_app.ingress`
and :mod:`~serve_app.api` (HTTP routes, errors, auth, metrics middleware), :mod:`~serve_app.oip`
(Open Inference Protocol v2), :mod:`~serve_app.images` and :mod:`~serve_app.parsing` (safe
decoding, limits, request forms), :mod:`~serve_app.metrics`, :mod:`~serve_app.deploy` (config
file deploys), :mod:`~serve_app.cli` and :mod:`~serve_app.client` (commands; the client never
imports Ray).

Importing this package does not import Ray; only ``app``, ``deployments``, ``ingress`` and
``metrics`` do.
"""

__all__: list[str] = []
