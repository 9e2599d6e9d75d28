# syntax=docker/dockerfile:1
# mve on the official Ray image: Ray (the version of k8s/base/versions.env) + torch + the mve,
# cluster and serve_app packages + optional default checkpoints, running as the image's non-root
# user `ray` (uid 1000, gid 100). Used by every pod of k8s/overlays/* (KubeRay runs `ray start`).
#
#   make image                          # CPU: mve:2.60.0-py311
#   make image RAY_VARIANT=gpu          # GPU: mve:2.60.0-py311-gpu (CUDA torch wheels)
#   docker build --build-arg RAY_VERSION=2.60.0 --build-arg PYTHON_TAG=py311 \
#       --build-arg RAY_IMAGE_SUFFIX=-gpu --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
#       -t mve:2.60.0-py311-gpu .
#
# Base tags follow rayproject/ray's scheme {version}-{python}[-{platform}]: no platform suffix is
# the CPU image (alias of -cpu), -gpu aliases the default CUDA (-cuXXX) build. RAY_VERSION and
# PYTHON_TAG must match k8s/base/versions.env (tests/k8s/test_k8s_versions.py checks the
# defaults below); the Makefile passes them from there.
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG RAY_IMAGE_SUFFIX=

# -- optional default checkpoints -------------------------------------------------------------
# models/<name>/ (model.safetensors + mve.json) -> /opt/mve/models/<name>/. COPY fails on a
# missing source, so this stage copies the (allow-listed, see .dockerignore) context and keeps
# models/ only when it exists; without it /opt/mve/models is empty and the RayService serves
# what `mve k8s promote` points it at.
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}${RAY_IMAGE_SUFFIX} AS models
COPY --chown=1000:100 . /tmp/context
RUN mkdir -p /tmp/models \
    && if [ -d /tmp/context/models ]; then cp -a /tmp/context/models/. /tmp/models/; fi

# -- the image ----------------------------------------------------------------------------------
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}${RAY_IMAGE_SUFFIX}
ARG RAY_VERSION
# Keep in step with the Makefile's TORCH_SPEC (make image passes it). CPU images take the
# CPU-only wheels (much smaller); GPU images pass TORCH_INDEX_URL=https://pypi.org/simple.
ARG TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

LABEL org.opencontainers.image.title="mve" \
      org.opencontainers.image.description="Ray-native machine-vision platform (train, tune, serve)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.ray.version="${RAY_VERSION}"

USER 1000:100
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MVE_MODELS_DIR=/opt/mve/models
WORKDIR /home/ray/mve

# torch first: the largest layer, and the one that changes least.
# hadolint ignore=DL3013
RUN python -m pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple \
        ${TORCH_SPEC} \
    && python -c "import torch; print('torch', torch.__version__)"

COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 mve ./mve
COPY --chown=1000:100 cluster ./cluster
COPY --chown=1000:100 serve_app ./serve_app
# Editable install: the packages stay in /home/ray/mve with their data files (search spaces,
# serve config, static pages). The constraint keeps the base image's Ray; the source is then
# compiled and made read-only.
RUN echo "ray==${RAY_VERSION}" > /tmp/ray-constraint.txt \
    && python -m pip install --constraint /tmp/ray-constraint.txt --editable . \
    && rm /tmp/ray-constraint.txt \
    && python -m compileall -q mve cluster serve_app \
    && chmod -R a-w /home/ray/mve \
    && python -c "import ray, mve, cluster.tune, serve_app.app; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"

COPY --from=models /tmp/models /opt/mve/models
# A writable working directory for jobs and drivers (relative paths, caches).
WORKDIR /home/ray
