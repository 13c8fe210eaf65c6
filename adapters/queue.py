"""How a job reaches a worker: a Celery task on the `fusion` queue (distributed mode) or the
embedded in-process worker (`worker.embedded`). Both take the job id only."""

from __future__ import annotations

TASK_NAME = "otfuse.fuse"
QUEUE_NAME = "fusion"


class Queue:
    def enqueue(self, job_id: str) -> None:
        raise NotImplementedError

    def ping(self) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


def make_celery(settings):
    """The Celery app with the configuration the API and the workers share (the Redis
    visibility timeout must be identical on both sides and above the hard time limit)."""
    from celery import Celery

    app = Celery("otfuse", broker=settings.broker, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_default_queue=QUEUE_NAME,
        task_routes={TASK_NAME: {"queue": QUEUE_NAME}},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,  # one process per GPU: run one worker container per GPU
        # Each pool child imports torch and fusion_core at start (worker_process_init): on a
        # busy host that takes longer than Celery's 4 s default, and the child would be killed
        # and respawned forever.
        worker_proc_alive_timeout=120,
        task_soft_time_limit=settings.soft_time_limit,
        task_time_limit=settings.hard_time_limit,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        broker_connection_retry_on_startup=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
    )
    return app


class CeleryQueue(Queue):
    def __init__(self, settings):
        self.app = make_celery(settings)

    def enqueue(self, job_id: str) -> None:
        self.app.send_task(TASK_NAME, args=[job_id], queue=QUEUE_NAME)

    def ping(self) -> None:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
