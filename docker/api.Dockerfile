# The API image: FastAPI + uvicorn on CPU. torch (CPU build) is here only because submit-time
# validation uses fusion_core's spec checks; pass TORCH_INDEX_URL=<PyTorch's CPU wheel index>
# to keep the image small (the default index serves the CUDA build).
FROM python:3.11.10-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_VERBOSITY=error

RUN useradd --create-home --uid 10001 otfuse
WORKDIR /app
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX_URL"; \
    else \
        pip install "torch==${TORCH_VERSION}"; \
    fi
COPY pyproject.toml README.md ./
COPY fusion_core fusion_core
COPY service service
COPY worker worker
COPY otfuse otfuse
RUN pip install . && python -c "import service.app, fusion_core"

USER otfuse
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
# Needs OTFUSE_API_KEYS: without keys `otfuse serve` refuses to listen beyond loopback.
CMD ["otfuse", "serve", "--host", "0.0.0.0", "--port", "8000"]
