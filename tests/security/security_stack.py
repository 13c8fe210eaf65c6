"""Names the attack tests share (the fixtures are in conftest.py)."""

from __future__ import annotations

from helpers import wait_for

ALICE = {"Authorization": "Bearer key-alice"}
BOB = {"Authorization": "Bearer key-bob-0"}
DONE = ("succeeded", "failed", "cancelled")
INPUT_CAP = 30_000_000


def wait_done(client, job_id: str, headers: dict, timeout: float = 90) -> dict:
    def done():
        job = client.get(f"/fusions/{job_id}", headers=headers).json()
        return job if job["status"] in DONE else None

    return wait_for(done, timeout, f"job {job_id} to end")
