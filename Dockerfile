# flowserve: the inference service on the bundled models, GPU-capable.
#
#   docker build -t flowserve .
#   docker run --gpus all -p 8000:8000 flowserve
#
# Layers run from least to most often changed: system user, dependencies (from pyproject.toml
# only), then the code and the models, so editing code never reinstalls torch.
FROM python:3.11-slim

# The root filesystem may be mounted read-only (compose does): caches go to the /tmp tmpfs.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/cache \
    FLOW_MODELS_DIR=/models \
    FLOW_DEFAULT_MODEL=four-gaussians

RUN groupadd --system --gid 10001 flow \
    && useradd --system --uid 10001 --gid flow --home-dir /home/flow --create-home flow

WORKDIR /app

# The default torch wheel on PyPI for Linux x86_64 is the CUDA build (its CUDA runtime comes as
# nvidia-* wheels), so the image runs on a GPU host and falls back to the CPU elsewhere.
COPY pyproject.toml ./
RUN pip install torch==2.13.0 \
    && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY service/ ./service/
COPY training/ ./training/
COPY --chown=flow:flow models/ /models/

USER 10001:10001

EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"]

CMD ["python", "-m", "service", "--models-dir", "/models", "--host", "0.0.0.0", "--port", "8000"]
