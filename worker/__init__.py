"""otfuse's workers: the job pipeline (plain Python), the Celery app that transports job ids
to it, and the embedded in-process worker."""
