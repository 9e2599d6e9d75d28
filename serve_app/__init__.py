"""Ray Serve applications for mve checkpoints: each model is its own HTTP ingress.

    mve serve --classifier runs/clf --vae runs/vae          # embedded Ray, http://127.0.0.1:8000/
    serve deploy serve_app/config.yaml                       # a running cluster (also KubeRay)
    serve run serve_app.app:build_model model=classifier checkpoint=runs/clf   # one model alone
    mve predict cat.png --url http://127.0.0.1:8000
    mve generate --n 16 --out grid.png

Modules: :mod:`~serve_app.app` (the builders, and why there are several applications),
:mod:`~serve_app.classifier_app`, :mod:`~serve_app.vae_app` and :mod:`~serve_app.oip_routes`
(the model applications: routes and deployments), :mod:`~serve_app.model_server` (load, hot
swap, batching), :mod:`~serve_app.batching` (the greedy batcher), :mod:`~serve_app.front` (page,
docs, ``/v1/models``, health), :mod:`~serve_app.api` (errors, auth, metrics middleware),
:mod:`~serve_app.oip` (Open Inference Protocol v2), :mod:`~serve_app.images` and
:mod:`~serve_app.parsing` (safe decoding, limits, request forms), :mod:`~serve_app.metrics`,
:mod:`~serve_app.dataplane` (the HAProxy data plane's environment), :mod:`~serve_app.deploy`
(config file deploys), :mod:`~serve_app.embedded`, :mod:`~serve_app.cli` and
:mod:`~serve_app.client` (commands; the client never imports Ray).

Importing this package does not import Ray; the application modules and ``metrics`` do.
"""

__all__: list[str] = []
