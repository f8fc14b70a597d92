# FIRM reward server on one GPU box: both critics on vLLM.
#
#   docker build -t firm-reward-server .
#   docker run --gpus all --shm-size 16g -p 8000:8000 -v firm-models:/models \
#       -e FIRM_API_KEYS="trainer:$(openssl rand -hex 24)" firm-reward-server
#
# Flags after the image name go to firm-serve, e.g. `... firm-reward-server --max-batch-size 32`.

# The official vLLM image already holds CUDA, torch and vllm. Its tag must satisfy the `vllm`
# extra in pyproject.toml, so that the install below keeps the image's vllm instead of replacing it.
FROM vllm/vllm-openai:v0.33.0

# Run as an unprivileged user; a fixed high uid avoids clashing with a user of the base image.
ARG FIRM_UID=10001
RUN useradd --create-home --uid "${FIRM_UID}" --user-group --shell /usr/sbin/nologin firm \
    && mkdir -p /models \
    && chown firm:firm /models

# Only what the install needs, so edits to tests/ or bench/ do not invalidate this layer.
WORKDIR /opt/firm
COPY pyproject.toml README.md ./
COPY server/ server/
COPY clients/ clients/
# The vLLM images install with uv into the system Python; fall back to pip where uv is absent.
RUN if command -v uv >/dev/null 2>&1; then uv pip install --system --no-cache ".[vllm]"; \
    else python3 -m pip install --no-cache-dir ".[vllm]"; fi

# Every download and compile cache lives on the /models volume, so a restarted container
# neither downloads the weights again nor recompiles vLLM's graphs. A named volume starts
# out with the ownership set above.
ENV HF_HOME=/models/huggingface \
    VLLM_CACHE_ROOT=/models/vllm \
    FIRM_CACHE_DIR=/models/firm-reward-server
# The critics' own prompts, fetched from the public FIRM release and checked against their pinned
# digests at build time, and kept in the image outside the volume: the container reads them from
# there (and checks them again) without reaching the release, whatever is mounted on /models.
RUN firm-serve prompts pull --cache-dir /tmp/firm-prompt-cache --to /opt/firm/release-prompts \
    && rm -rf /tmp/firm-prompt-cache
ENV FIRM_PROMPT_SOURCE=/opt/firm/release-prompts
VOLUME ["/models"]

# The server binds loopback by default; inside a container that is unreachable from outside.
# vLLM gives its engine 10 minutes to become ready by default; a first start that downloads two
# 8B critics over a slow link can take longer, so it gets an hour.
ENV FIRM_HOST=0.0.0.0 \
    FIRM_PORT=8000 \
    VLLM_ENGINE_READY_TIMEOUT_S=3600 \
    PYTHONUNBUFFERED=1
EXPOSE 8000

USER firm
WORKDIR /home/firm

# Healthy once every enabled critic is loaded (/readyz answers 503 until then). The image may
# lack curl, so Python's urllib does the request: a 503 raises and exits non-zero. Loading two
# 8B critics, and the first download of their weights, takes minutes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20m --retries=3 \
    CMD python3 -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('FIRM_PORT', '8000') + '/readyz', timeout=4)"

# The base image's entrypoint starts `vllm serve`; replace it. CMD stays empty, so arguments
# given to `docker run` (or compose's `command:`) pass straight to firm-serve.
ENTRYPOINT ["firm-serve"]
CMD []
