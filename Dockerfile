# syntax=docker/dockerfile:1
#
# Tandem inference server image: CUDA 12.8 PyTorch runtime, non-root.
#
#   docker build -t tandem:0.1.0 .
#   docker build -t tandem:0.1.0-models --build-arg FETCH_DEFAULT_MODELS=true .
#   docker run --gpus all -p 50051:50051 -p 9464:9464 tandem:0.1.0
#
# The base image brings Python, CUDA, cuDNN and torch; pip installs only the project and its
# other dependencies and is not allowed to replace torch. Pin the base by digest in your own
# builds (pytorch/pytorch:<tag>@sha256:...) for reproducible images.
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime

# --- build: a wheel of the project, so no source tree ends up in the image -------------------
FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY decoding ./decoding
COPY service ./service
COPY bench ./bench
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- runtime ----------------------------------------------------------------------------------
FROM ${BASE_IMAGE}

ARG FETCH_DEFAULT_MODELS=false

LABEL org.opencontainers.image.title="tandem" \
      org.opencontainers.image.description="Lossless speculative-decoding LLM inference server (gRPC)" \
      org.opencontainers.image.licenses="Apache-2.0"

# TorchInductor and Triton compile small C helpers at run time, so keep a C compiler.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 10001 tandem \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/tandem \
        --shell /usr/sbin/nologin tandem \
    && mkdir -p /var/cache/tandem \
    && chown 10001:10001 /var/cache/tandem

# Install the wheel; the constraint keeps the base image's torch exactly as it is.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -c "import torch; print('torch==' + torch.__version__)" > /tmp/torch-constraint.txt \
    && pip install --no-cache-dir --constraint /tmp/torch-constraint.txt /wheels/*.whl \
    && rm /tmp/torch-constraint.txt

ENV TANDEM_HOST=0.0.0.0 \
    TANDEM_PORT=50051 \
    TANDEM_METRICS_PORT=9464 \
    TANDEM_CACHE=/var/cache/tandem \
    HF_HOME=/var/cache/tandem/huggingface \
    XDG_CACHE_HOME=/tmp/.cache \
    TRITON_CACHE_DIR=/tmp/.triton \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER 10001:10001
WORKDIR /home/tandem

# Optionally bake the default model pair into the image (then deploy the chart with
# modelCache.enabled=false and modelFetch.enabled=false). `tandem models fetch` downloads it
# with pip; a pip.conf for a private index can come in as a build secret, so no credential
# stays in a layer:
#   docker build --build-arg FETCH_DEFAULT_MODELS=true --secret id=pip_conf,src=pip.conf .
RUN --mount=type=secret,id=pip_conf,uid=10001,required=false \
    if [ "${FETCH_DEFAULT_MODELS}" = "true" ]; then \
        PIP_CONFIG_FILE=/run/secrets/pip_conf tandem models fetch \
        && rm -rf /tmp/.cache /tmp/.triton; \
    fi

EXPOSE 50051 9464

ENTRYPOINT ["tandem", "serve"]
