"""Faults injected into running jobs on the real stack: the worker killed at every stage, a
Redis restart, S3 failing mid-upload, the API restarted under a polling client. Each job ends
exactly once, with one set of artifacts or none."""

from __future__ import annotations

import pytest
from scenarios import KILL_STAGES, api_restarted, redis_restarted, s3_failing, worker_killed


@pytest.mark.parametrize("stage", KILL_STAGES)
def test_a_worker_killed_at_any_stage_succeeds_exactly_once(lab, stage):
    outcome = worker_killed(lab, stage)
    assert outcome.status == "succeeded", outcome
    assert outcome.attempts >= 2 and outcome.successes == 1, outcome
    assert outcome.artifacts_ok, outcome


def test_a_redis_restart_loses_no_job(lab):
    outcomes = redis_restarted(lab)
    assert [o.status for o in outcomes] == ["succeeded"] * len(outcomes), outcomes
    assert all(o.ok for o in outcomes), outcomes


@pytest.mark.parametrize("mode,after", [("fail", 0), ("drop", 0), ("fail", 4)])
def test_s3_failing_mid_upload_fails_the_job_cleanly(lab, mode, after):
    outcome = s3_failing(lab, mode, after)
    assert outcome.status == "failed" and outcome.error == "storage_error", outcome
    assert outcome.artifacts_ok, "files were left under the final prefix"
    assert outcome.refused >= 3  # retried with backoff: OTFUSE_S3_ATTEMPTS tries


def test_an_api_restart_does_not_lose_a_polling_client(lab):
    outcome = api_restarted(lab)
    assert outcome.status == "succeeded" and outcome.ok, outcome
