"""What the API (`service/`) and the workers (`worker/`) both build on, so that neither imports
the other: settings, the job store, storage (S3, local folders, the hub), who may read and
write what (`access`), and the queue that carries job ids to workers. No torch here: the API
process imports this."""
