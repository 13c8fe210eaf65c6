# The CUDA worker image: one Celery worker process per GPU (run one container per GPU, or set
# CUDA_VISIBLE_DEVICES). torch's Linux wheels from the default index are CUDA builds that
# bring their CUDA runtime; the host needs the NVIDIA driver and container toolkit only.
FROM python:3.11.10-slim-bookworm

ARG TORCH_VERSION=2.13.0
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_VERBOSITY=error \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN useradd --create-home --uid 10001 otfuse
WORKDIR /app
RUN pip install "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY fusion_core fusion_core
COPY adapters adapters
COPY service service
COPY worker worker
COPY otfuse otfuse
RUN pip install . && python -c "import worker.celery_app, fusion_core"

USER otfuse
# SIGTERM: the running job stops at its next layer, step or transfer chunk, returns to the
# queue and runs again on the next worker; a worker killed outright has its job redelivered
# (acks_late, reject_on_worker_lost) and written once.
STOPSIGNAL SIGTERM
CMD ["otfuse", "worker", "--log-level", "INFO"]
