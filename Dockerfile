# twist-cluster: CPU image by default; GPU image with a CUDA base chosen by build argument.
#   docker build -t twist .
#   docker build -t twist:gpu --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    OMP_WAIT_POLICY=PASSIVE \
    TWIST_DEMO_DIR=/opt/twist/models/demo

# CUDA bases come without Python; python:3.11-slim only needs curl for the health check.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl libgomp1 \
    && if ! command -v python3 >/dev/null; then apt-get install -y --no-install-recommends python3 python3-venv; fi \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /opt/twist
COPY pyproject.toml README.md ./
COPY twist_core ./twist_core
COPY app ./app
COPY models ./models
RUN pip install "torch==2.14.1" "torchvision==0.29.1" --index-url "${TORCH_INDEX}" \
    && pip install . \
    && useradd --create-home --uid 1000 twist \
    && mkdir -p /data /runs \
    && chown twist:twist /data /runs

USER 1000:1000
WORKDIR /runs
VOLUME ["/data", "/runs"]
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s CMD ["curl", "-fsS", "http://127.0.0.1:7860/"]
CMD ["twist", "app", "--host", "0.0.0.0", "--port", "7860"]
