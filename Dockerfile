# syntax=docker/dockerfile:1
# SpecTTS speech server (OpenAI-compatible /v1/audio/speech, WebSocket streaming, /metrics).
#
#   docker build -t spectts .                                   # CPU torch (default)
#   docker build --build-arg TORCH_VARIANT=cu130 -t spectts:cuda .
#   docker run --rm -p 8000:8000 spectts                        # add --gpus all for the CUDA build
#
# Settings come from SPECTTS_* variables (see server/settings.py): SPECTTS_API_KEY, SPECTTS_THREADS,
# SPECTTS_DEVICE (auto: CUDA when the CUDA build sees a GPU), SPECTTS_BUNDLE, ...

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: the project and its wheels in /app/.venv ---------------------------------------------
FROM ${PYTHON_IMAGE} AS build
# cpu, or a CUDA variant of the PyTorch wheel index (cu126, cu128, cu130, ...)
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/${TORCH_VARIANT}
ARG TORCH_VERSION=2.14.1
ARG TORCHAUDIO_VERSION=2.11.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/app/.venv/bin:$PATH
# torch first, from the variant's index; the project's own pins are then already satisfied
RUN python -m venv /app/.venv \
    && pip install --index-url "${TORCH_INDEX}" \
        "torch==${TORCH_VERSION}" "torchaudio==${TORCHAUDIO_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY models ./models
COPY server ./server
RUN pip install .

# --- runtime: the venv, Festival (SLT HTS voice), espeak-ng and libsndfile, a non-root user ---------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# Debian's stable versions of the base image's release; pinning them would break on every point release
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends festival festvox-us-slt-hts espeak-ng libsndfile1 \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 10001 spectts \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin spectts
COPY --from=build /app/.venv /app/.venv
# the voice bundle (models/default_voice) travels with the source; the venv holds the code
COPY --chown=10001:10001 models/default_voice /app/models/default_voice
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SPECTTS_HOST=0.0.0.0 \
    SPECTTS_PORT=8000 \
    SPECTTS_BUNDLE=/app/models/default_voice \
    NUMBA_CACHE_DIR=/tmp/numba-cache
# the compiled decoder (numba, models/kernels.py) compiles at the server's warm-up, before /ready
# (~10 s on 2 cores), into NUMBA_CACHE_DIR: the installed package's directory is not writable here
WORKDIR /app
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "server.healthcheck"]
CMD ["python", "-m", "server"]
