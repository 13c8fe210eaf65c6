"""otfuse's HTTP service: settings, job schemas, job store, storage, the FastAPI app.

Route functions validate, call the job store or the queue, and return; the job pipeline
lives in `worker/`.
"""
