# flowserve: the inference service on the bundled models, GPU-capable.
#
#   docker build -t flowserve .
#   docker run --gpus all -p 127.0.0.1:8000:8000 flowserve
#   docker build --build-arg TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" -t flowserve:cpu .
#   docker build --build-arg EXTRAS=ray -t flowserve:ray .      # for Ray Serve / KubeRay
#
# Layers run from least to most often changed: system user, dependencies (from the lock file
# only), then the code and the models, so editing code never reinstalls torch.
FROM python:3.11-slim

# The root filesystem may be mounted read-only (compose does): caches go to the /tmp tmpfs.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/cache \
    FLOW_MODELS_DIR=/models \
    FLOW_DEFAULT_MODEL=four-gaussians

RUN groupadd --system --gid 10001 flow \
    && useradd --system --uid 10001 --gid flow --home-dir /home/flow --create-home flow

WORKDIR /app

# The default torch wheel on PyPI for Linux x86_64 is the CUDA build (its CUDA runtime comes as
# nvidia-* wheels), so the image runs on a GPU host and falls back to the CPU elsewhere; a CPU
# index in TORCH_PIP_ARGS makes a small CPU-only image. Everything else comes pinned from the
# lock file (make lock refreshes it).
ARG TORCH_PIP_ARGS=""
# EXTRAS=ray: the image for Ray Serve and KubeRay (deploy/ray), with ray[serve] from its lock
# file, and wget, which KubeRay's probes of Ray's pods call.
ARG EXTRAS=""
COPY requirements.lock requirements-ray.lock ./
RUN pip install ${TORCH_PIP_ARGS} torch==2.13.0 \
    && pip install -r requirements.lock \
    && if [ "$EXTRAS" = "ray" ]; then pip install -r requirements-ray.lock \
        && apt-get update && apt-get install -y --no-install-recommends wget \
        && rm -rf /var/lib/apt/lists/*; fi

# The package itself, so the image has the flowserve command too.
COPY pyproject.toml README.md ./
COPY service/ ./service/
COPY training/ ./training/
RUN pip install --no-deps . && rm -rf build *.egg-info

# The bundled models: served from /models, and kept pristine in /opt/flowserve/models, from which
# compose's seed-models adds the models of a newer image to an existing volume.
COPY --chown=flow:flow models/ /models/
COPY --chown=flow:flow models/ /opt/flowserve/models/

USER 10001:10001

EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"]

CMD ["python", "-m", "service", "--models-dir", "/models", "--host", "0.0.0.0", "--port", "8000"]
