# vtp: one image for every process (web, CPU worker, GPU worker, controller); the command picks.
#
#   docker build -t vtp .                                    slim CPU image (CTranslate2 int8)
#   docker build -t vtp:cuda --build-arg BASE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#                --build-arg EXTRAS=kubernetes,gpu .         CUDA 12 + cuDNN 9 for GPU workers; the
#                                                            gpu extra adds torch + transformers (the
#                                                            transformers engine, VTP_ENGINE=auto's pick)
#
# The bundled tiny.en model and ffmpeg come from wheels: nothing is downloaded at run time.
ARG BASE=python:3.12-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/vtp PATH=/opt/vtp/bin:$PATH

# The CUDA base images have no Python; the slim one has no need for apt.
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/vtp \
    && useradd --create-home --uid 1000 vtp

WORKDIR /app
COPY pyproject.toml README.md ./
COPY app ./app
COPY workers ./workers
# kubernetes: the controller's Kubernetes backend (the Fly backend needs nothing extra);
# gpu: torch + transformers for the GPU workers' transformers engine (CUDA images only).
ARG EXTRAS=kubernetes
RUN pip install ".[${EXTRAS}]"

USER vtp
ENV VTP_DATA_DIR=/home/vtp/data
EXPOSE 8080
CMD ["vtp", "web", "--host", "0.0.0.0", "--port", "8080"]
