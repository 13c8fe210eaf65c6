# The API image: FastAPI + uvicorn, no torch. The API validates jobs with fusion_core's
# torch-free contract (fusion_core.contract, spec, errors, files); the package is installed
# without its dependencies, then only what the API imports (pyproject's `api` extra).
FROM python:3.11.10-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 otfuse
WORKDIR /app
COPY pyproject.toml README.md ./
COPY fusion_core fusion_core
COPY adapters adapters
COPY service service
COPY worker worker
COPY otfuse otfuse
RUN pip install --no-deps . \
    && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['api']))" > /tmp/api.txt \
    && pip install -r /tmp/api.txt \
    && python -c "import sys, otfuse.cli, otfuse.server; assert 'torch' not in sys.modules"

USER otfuse
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
# Needs OTFUSE_API_KEYS: without keys `otfuse serve` refuses to listen beyond loopback.
CMD ["otfuse", "serve", "--host", "0.0.0.0", "--port", "8000"]
