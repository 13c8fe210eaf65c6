"""The job store: job records, per-tenant listing, idempotency keys, leases, counters.

Records are JSON objects (the `Job` schema). Two implementations with one contract:
`RedisJobStore` (distributed mode; durable with Redis persistence) and `MemoryJobStore`
(embedded mode; thread-safe, optionally saved to a JSON file). Every change to a record goes
through `update(job_id, change)`: `change` gets a copy and returns the new record or None.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

Change = Callable[[dict], dict | None]
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
DONE: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
STAGE_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, float("inf"))


class IdempotencyConflict(Exception):
    """The idempotency key was used with another body."""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_job_id() -> str:
    """Time-ordered ids: lexical order is creation order, so listing needs no extra index."""
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(6).hex()}"


def dumps(job: dict) -> bytes:
    return json.dumps(job, separators=(",", ":"), sort_keys=True).encode()


def peek(raw: bytes, field: str) -> str | None:
    """A top-level string field of a stored record without parsing it (the polling hot path).

    Records are written with sorted keys, so the top-level `status`, `tenant` and
    `updated_at` come after every nested object (error, labels, result, spec): the last
    `,"field":"` is the top-level one. A bare `"` cannot occur inside a JSON string."""
    marker = b',"' + field.encode() + b'":"'
    start = raw.rfind(marker)
    if start < 0:
        return None
    start += len(marker)
    return raw[start : raw.index(b'"', start)].decode()


def encode_token(job_id: str) -> str:
    return base64.urlsafe_b64encode(job_id.encode()).decode().rstrip("=")


def decode_token(token: str) -> str:
    try:
        value = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("page_token is not one this API returned") from exc
    if not value.isalnum():
        raise ValueError("page_token is not one this API returned")
    return value


class JobStore:
    """The contract both stores keep (see the module docstring)."""

    def create(self, job: dict, idempotency: tuple[str, str] | None = None) -> tuple[dict, bool]:
        """Store a new record. With (key, fingerprint): the first call creates; a repeat with
        the same fingerprint returns the original job and False; another fingerprint raises
        IdempotencyConflict."""
        raise NotImplementedError

    def get_raw(self, job_id: str) -> bytes | None:
        raise NotImplementedError

    async def aget_raw(self, job_id: str) -> bytes | None:
        return self.get_raw(job_id)

    def get(self, job_id: str) -> dict | None:
        raw = self.get_raw(job_id)
        return json.loads(raw) if raw is not None else None

    def update(self, job_id: str, change: Change) -> dict | None:
        raise NotImplementedError

    def list(
        self, tenant: str, status: str | None, after: str | None, limit: int
    ) -> tuple[list[dict], str | None]:
        """Newest first; `after` is the last id of the previous page."""
        raise NotImplementedError

    def delete(self, job_id: str) -> None:
        raise NotImplementedError

    def active(self) -> list[str]:
        """Ids of queued and running jobs."""
        raise NotImplementedError

    def counts(self) -> dict[str, int]:
        raise NotImplementedError

    def acquire_lease(self, job_id: str, token: str, seconds: float) -> bool:
        raise NotImplementedError

    def renew_lease(self, job_id: str, token: str, seconds: float) -> bool:
        raise NotImplementedError

    def release_lease(self, job_id: str, token: str) -> None:
        raise NotImplementedError

    def lease_holder(self, job_id: str) -> str | None:
        raise NotImplementedError

    # -- per-tenant bounds ----------------------------------------------------------------
    def tenant_counts(self, tenant: str) -> dict[str, int]:
        """The tenant's jobs by status."""
        raise NotImplementedError

    def take_submit_token(self, tenant: str, rate: float, burst: int) -> float:
        """Token bucket of the tenant's submits: 0 when one is granted, else the seconds until
        one will be."""
        raise NotImplementedError

    def acquire_slot(self, tenant: str, job_id: str, limit: int, seconds: float) -> bool:
        """One of the tenant's `limit` running slots for `seconds` (renewed with the job's
        lease; a dead worker's slot lapses)."""
        raise NotImplementedError

    def renew_slot(self, tenant: str, job_id: str, seconds: float) -> None:
        raise NotImplementedError

    def release_slot(self, tenant: str, job_id: str) -> None:
        raise NotImplementedError

    def purge_finished(self, older_than: float) -> int:
        """Delete records of jobs that ended more than `older_than` seconds ago (and expired
        idempotency keys); returns how many records went."""
        raise NotImplementedError

    def observe_stage(self, stage: str, seconds: float) -> None:
        raise NotImplementedError

    def stage_stats(self) -> dict[str, dict]:
        """{stage: {"sum": s, "count": n, "buckets": {le: cumulative count}}}"""
        raise NotImplementedError

    def ping(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def finish(job: dict, status: str, error: tuple[str, str] | None = None, detail: str = "") -> dict:
    """A record's end: status, finish time, detail, and the error {type, message}."""
    job["status"] = status
    job["finished_at"] = now_iso()
    job["detail"] = detail or status
    if error:
        job["error"] = {"type": error[0], "message": error[1]}
    return job


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _stamp(old: dict | None, new: dict) -> dict:
    new["updated_at"] = now_iso()
    return new


class MemoryJobStore(JobStore):
    """In-process store for the embedded mode; `path` keeps the records across restarts."""

    def __init__(self, path: Path | None = None, idempotency_ttl: int = 86400):
        self._idem_ttl = idempotency_ttl
        self._lock = threading.RLock()
        self._path = Path(path) if path else None
        self._jobs: dict[str, dict] = {}
        self._idem: dict[tuple[str, str], tuple[str, str, float]] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        self._slots: dict[str, dict[str, float]] = {}  # tenant -> job -> monotonic expiry
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, at)
        self._stages: dict[str, dict] = {}
        if self._path and self._path.is_file():
            self._jobs = json.loads(self._path.read_text()).get("jobs", {})

    def _save(self) -> None:
        if not self._path:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_name(self._path.name + ".tmp")
        tmp.write_text(json.dumps({"jobs": self._jobs}))
        os.replace(tmp, self._path)

    def create(self, job, idempotency=None):
        with self._lock:
            if idempotency:
                key, fingerprint = idempotency
                seen = self._idem.get((job["tenant"], key))
                if seen and seen[2] > time.monotonic() and seen[1] in self._jobs:
                    if seen[0] != fingerprint:
                        raise IdempotencyConflict(key)
                    return copy.deepcopy(self._jobs[seen[1]]), False
                self._idem[(job["tenant"], key)] = (
                    fingerprint,
                    job["id"],
                    time.monotonic() + self._idem_ttl,
                )
            self._jobs[job["id"]] = copy.deepcopy(job)
            self._save()
            return job, True

    def get_raw(self, job_id):
        job = self.get(job_id)
        return dumps(job) if job is not None else None

    def get(self, job_id):
        with self._lock:
            job = self._jobs.get(job_id)
            return copy.deepcopy(job) if job is not None else None

    def update(self, job_id, change):
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            new = change(copy.deepcopy(job))
            if new is None:
                return copy.deepcopy(job)
            self._jobs[job_id] = _stamp(job, new)
            self._save()
            return copy.deepcopy(new)

    def list(self, tenant, status, after, limit):
        with self._lock:
            ids = sorted((i for i, j in self._jobs.items() if j["tenant"] == tenant), reverse=True)
            if after:
                ids = [i for i in ids if i < after]
            items = [self._jobs[i] for i in ids if not status or self._jobs[i]["status"] == status]
            page = copy.deepcopy(items[: limit + 1])
        more = len(page) > limit
        page = page[:limit]
        return page, (page[-1]["id"] if more and page else None)

    def delete(self, job_id):
        with self._lock:
            self._jobs.pop(job_id, None)
            self._save()

    def active(self):
        with self._lock:
            return [i for i, j in self._jobs.items() if j["status"] not in DONE]

    def counts(self):
        with self._lock:
            counts = dict.fromkeys(STATUSES, 0)
            for job in self._jobs.values():
                counts[job["status"]] += 1
            return counts

    def acquire_lease(self, job_id, token, seconds):
        with self._lock:
            held = self._leases.get(job_id)
            if held and held[1] > time.monotonic() and held[0] != token:
                return False
            self._leases[job_id] = (token, time.monotonic() + seconds)
            return True

    def renew_lease(self, job_id, token, seconds):
        with self._lock:
            held = self._leases.get(job_id)
            if not held or held[0] != token or held[1] <= time.monotonic():
                return False
            self._leases[job_id] = (token, time.monotonic() + seconds)
            return True

    def release_lease(self, job_id, token):
        with self._lock:
            if self._leases.get(job_id, ("",))[0] == token:
                del self._leases[job_id]

    def lease_holder(self, job_id):
        with self._lock:
            held = self._leases.get(job_id)
            return held[0] if held and held[1] > time.monotonic() else None

    def tenant_counts(self, tenant):
        with self._lock:
            counts = dict.fromkeys(STATUSES, 0)
            for job in self._jobs.values():
                if job["tenant"] == tenant:
                    counts[job["status"]] += 1
            return counts

    def take_submit_token(self, tenant, rate, burst):
        with self._lock:
            now = time.monotonic()
            tokens, at = self._buckets.get(tenant, (float(burst), now))
            tokens = min(float(burst), tokens + (now - at) * rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / rate
            self._buckets[tenant] = (tokens - 1 if tokens >= 1 else tokens, now)
            return wait

    def acquire_slot(self, tenant, job_id, limit, seconds):
        with self._lock:
            now = time.monotonic()
            slots = {j: t for j, t in self._slots.get(tenant, {}).items() if t > now}
            if job_id not in slots and len(slots) >= limit:
                self._slots[tenant] = slots
                return False
            slots[job_id] = now + seconds
            self._slots[tenant] = slots
            return True

    def renew_slot(self, tenant, job_id, seconds):
        with self._lock:
            if job_id in self._slots.get(tenant, {}):
                self._slots[tenant][job_id] = time.monotonic() + seconds

    def release_slot(self, tenant, job_id):
        with self._lock:
            self._slots.get(tenant, {}).pop(job_id, None)

    def purge_finished(self, older_than):
        cutoff = datetime.now(UTC).timestamp() - older_than
        with self._lock:
            old = [
                i
                for i, j in self._jobs.items()
                if j["status"] in DONE
                and j.get("finished_at")
                and _epoch(j["finished_at"]) < cutoff
            ]
            for job_id in old:
                del self._jobs[job_id]
            now = time.monotonic()
            self._idem = {k: v for k, v in self._idem.items() if v[2] > now}
            if old:
                self._save()
            return len(old)

    def observe_stage(self, stage, seconds):
        with self._lock:
            stats = self._stages.setdefault(
                stage, {"sum": 0.0, "count": 0, "buckets": dict.fromkeys(STAGE_BUCKETS, 0)}
            )
            stats["sum"] += seconds
            stats["count"] += 1
            for le in STAGE_BUCKETS:
                if seconds <= le:
                    stats["buckets"][le] += 1

    def stage_stats(self):
        with self._lock:
            return copy.deepcopy(self._stages)

    def ping(self):
        if self._path:
            self._path.parent.mkdir(parents=True, exist_ok=True)


class RedisJobStore(JobStore):
    """Job records in Redis: `job:{id}` JSON, `tenant:{t}` lexically sorted ids, `active`
    set, `counts` and `tcount:{t}` hashes (jobs by status, overall and per tenant),
    `idem:{t}:{key}`, `lease:{id}`, `slots:{t}` (running slots, expiry-scored), `rate:{t}`
    (submit token bucket), `done` (finished ids by finish time) + `donemeta` (their tenant and
    status, for the purge), `stage:{name}`."""

    # One finished job out: its record, its index entries and its counts, atomically (a
    # concurrent purge or delete finds `donemeta` gone and does nothing).
    _PURGE = """
    local meta = redis.call('hget', KEYS[2], ARGV[1])
    redis.call('zrem', KEYS[1], ARGV[1])
    if not meta then return 0 end
    local tab = string.find(meta, '\t', 1, true)
    local tenant, status = string.sub(meta, 1, tab - 1), string.sub(meta, tab + 1)
    redis.call('hdel', KEYS[2], ARGV[1])
    redis.call('del', ARGV[2] .. 'job:' .. ARGV[1])
    redis.call('zrem', ARGV[2] .. 'tenant:' .. tenant, ARGV[1])
    redis.call('srem', ARGV[2] .. 'active', ARGV[1])
    redis.call('hincrby', ARGV[2] .. 'counts', status, -1)
    redis.call('hincrby', ARGV[2] .. 'tcount:' .. tenant, status, -1)
    return 1
    """
    _TOKEN = """
    local t = redis.call('TIME')
    local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
    local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
    local state = redis.call('hmget', KEYS[1], 'tokens', 'at')
    local tokens = tonumber(state[1]) or burst
    local at = tonumber(state[2]) or now
    tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
    local wait = 0
    if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
    redis.call('hset', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
    redis.call('expire', KEYS[1], math.ceil(burst / rate) + 1)
    return tostring(wait)
    """
    _SLOT = """
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    redis.call('zremrangebyscore', KEYS[1], '-inf', now)
    local held = redis.call('zscore', KEYS[1], ARGV[1])
    if not held and redis.call('zcard', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
    redis.call('zadd', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
    redis.call('pexpire', KEYS[1], tonumber(ARGV[3]) * 2)
    return 1
    """
    _RENEW_SLOT = """
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    if redis.call('zscore', KEYS[1], ARGV[1]) then
        redis.call('zadd', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
        redis.call('pexpire', KEYS[1], tonumber(ARGV[2]) * 2)
    end
    return 1
    """

    def __init__(
        self,
        url: str,
        prefix: str = "otfuse:",
        idempotency_ttl: int = 86400,
        record_ttl: int = 7 * 86400,
    ):
        import redis

        self._url = url
        self._redis = redis.Redis.from_url(url, health_check_interval=30)
        self._async = None
        self._p = prefix
        self._idem_ttl = idempotency_ttl
        self._record_ttl = record_ttl

    def _job(self, job_id: str) -> str:
        return f"{self._p}job:{job_id}"

    def _tenant(self, tenant: str) -> str:
        return f"{self._p}tenant:{tenant}"

    def create(self, job, idempotency=None):
        if idempotency:
            key, fingerprint = idempotency
            idem = f"{self._p}idem:{job['tenant']}:{key}"
            claim = json.dumps({"fp": fingerprint, "id": job["id"]})
            for _ in range(50):
                if self._redis.set(idem, claim, nx=True, ex=self._idem_ttl):
                    break
                seen = self._redis.get(idem)
                if seen is None:
                    continue
                seen = json.loads(seen)
                if seen["fp"] != fingerprint:
                    raise IdempotencyConflict(key)
                original = self.get(seen["id"])
                if original is not None:
                    return original, False
                time.sleep(0.02)  # the first request is between its claim and its record
            else:
                raise IdempotencyConflict(key)
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(self._job(job["id"]), dumps(job))
        pipe.zadd(self._tenant(job["tenant"]), {job["id"]: 0})
        pipe.sadd(f"{self._p}active", job["id"])
        pipe.hincrby(f"{self._p}counts", job["status"], 1)
        pipe.hincrby(f"{self._p}tcount:{job['tenant']}", job["status"], 1)
        pipe.execute()
        return job, True

    def get_raw(self, job_id):
        return self._redis.get(self._job(job_id))

    async def aget_raw(self, job_id):
        if self._async is None:
            import redis.asyncio

            self._async = redis.asyncio.Redis.from_url(self._url)
        return await self._async.get(self._job(job_id))

    async def aclose(self):
        if self._async is not None:
            await self._async.aclose()
            self._async = None

    def close(self):
        self._redis.close()

    def _watched(self, key: str, write):
        """An optimistic transaction on one record: `write(pipe, job)` (job None when
        absent) queues its writes after `pipe.multi()`, or queues none; it is retried when
        another client changes the record in between."""
        import redis

        with self._redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    result = write(pipe, json.loads(raw) if raw is not None else None)
                    if pipe.explicit_transaction:
                        pipe.execute()
                    else:
                        pipe.unwatch()
                    return result
                except redis.WatchError:
                    continue

    def update(self, job_id, change):
        key = self._job(job_id)

        def write(pipe, job):
            if job is None:
                return None
            new = change(copy.deepcopy(job))
            if new is None:
                return job
            _stamp(job, new)
            pipe.multi()
            pipe.set(key, dumps(new))
            if new["status"] != job["status"]:
                self._count(pipe, job, -1)
                self._count(pipe, new, 1)
                if new["status"] in DONE:
                    pipe.srem(f"{self._p}active", job_id)
                    pipe.zadd(f"{self._p}done", {job_id: time.time()})
                    pipe.hset(f"{self._p}donemeta", job_id, f"{new['tenant']}\t{new['status']}")
                else:
                    pipe.sadd(f"{self._p}active", job_id)
                    pipe.zrem(f"{self._p}done", job_id)
                    pipe.hdel(f"{self._p}donemeta", job_id)
                    pipe.persist(key)
            if new["status"] in DONE:  # a backstop: purge_finished removes it on time
                pipe.expire(key, self._record_ttl + 86400)
            return new

        return self._watched(key, write)

    def list(self, tenant, status, after, limit):
        items: list[dict] = []
        upper = f"({after}" if after else "+"
        batch = max(limit + 1, 50 if status else limit + 1)
        while len(items) <= limit:
            ids = self._redis.zrevrangebylex(self._tenant(tenant), upper, "-", start=0, num=batch)
            if not ids:
                break
            raws = self._redis.mget([self._job(i.decode()) for i in ids])
            for raw in raws:
                if raw is not None:
                    job = json.loads(raw)
                    if not status or job["status"] == status:
                        items.append(job)
            upper = f"({ids[-1].decode()}"
            if len(ids) < batch:
                break
        more = len(items) > limit
        items = items[:limit]
        return items, (items[-1]["id"] if more and items else None)

    def _count(self, pipe, job: dict, step: int) -> None:
        pipe.hincrby(f"{self._p}counts", job["status"], step)
        pipe.hincrby(f"{self._p}tcount:{job['tenant']}", job["status"], step)

    def delete(self, job_id):
        def write(pipe, job):
            if job is None:
                return
            pipe.multi()
            pipe.delete(self._job(job_id))
            pipe.zrem(self._tenant(job["tenant"]), job_id)
            pipe.srem(f"{self._p}active", job_id)
            pipe.zrem(f"{self._p}done", job_id)
            pipe.hdel(f"{self._p}donemeta", job_id)
            self._count(pipe, job, -1)

        self._watched(self._job(job_id), write)

    def active(self):
        return [i.decode() for i in self._redis.smembers(f"{self._p}active")]

    def counts(self):
        return self._counts(f"{self._p}counts")

    def _counts(self, key: str) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        counts.update({k.decode(): max(0, int(v)) for k, v in self._redis.hgetall(key).items()})
        return counts

    def tenant_counts(self, tenant):
        return self._counts(f"{self._p}tcount:{tenant}")

    def take_submit_token(self, tenant, rate, burst):
        return float(self._redis.eval(self._TOKEN, 1, f"{self._p}rate:{tenant}", rate, burst))

    def acquire_slot(self, tenant, job_id, limit, seconds):
        key = f"{self._p}slots:{tenant}"
        return bool(self._redis.eval(self._SLOT, 1, key, job_id, limit, int(seconds * 1000)))

    def renew_slot(self, tenant, job_id, seconds):
        key = f"{self._p}slots:{tenant}"
        self._redis.eval(self._RENEW_SLOT, 1, key, job_id, int(seconds * 1000))

    def release_slot(self, tenant, job_id):
        self._redis.zrem(f"{self._p}slots:{tenant}", job_id)

    def purge_finished(self, older_than):
        done, meta = f"{self._p}done", f"{self._p}donemeta"
        cutoff = time.time() - older_than
        purged = 0
        while True:
            ids = self._redis.zrangebyscore(done, "-inf", cutoff, start=0, num=500)
            for job_id in ids:
                purged += int(self._redis.eval(self._PURGE, 2, done, meta, job_id, self._p))
            if len(ids) < 500:
                return purged

    _RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"  # noqa: E501
    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"  # noqa: E501

    def acquire_lease(self, job_id, token, seconds):
        key = f"{self._p}lease:{job_id}"
        if self._redis.set(key, token, nx=True, px=int(seconds * 1000)):
            return True
        return self.renew_lease(job_id, token, seconds)

    def renew_lease(self, job_id, token, seconds):
        key = f"{self._p}lease:{job_id}"
        return bool(self._redis.eval(self._RENEW, 1, key, token, int(seconds * 1000)))

    def release_lease(self, job_id, token):
        self._redis.eval(self._RELEASE, 1, f"{self._p}lease:{job_id}", token)

    def lease_holder(self, job_id):
        held = self._redis.get(f"{self._p}lease:{job_id}")
        return held.decode() if held else None

    def observe_stage(self, stage, seconds):
        key = f"{self._p}stage:{stage}"
        pipe = self._redis.pipeline(transaction=True)
        pipe.hincrbyfloat(key, "sum", seconds)
        pipe.hincrby(key, "count", 1)
        for le in STAGE_BUCKETS:
            if seconds <= le:
                pipe.hincrby(key, f"le:{le}", 1)
        pipe.execute()

    def stage_stats(self):
        stats = {}
        for key in self._redis.scan_iter(match=f"{self._p}stage:*", count=100):
            raw = {k.decode(): v for k, v in self._redis.hgetall(key).items()}
            stage = key.decode()[len(f"{self._p}stage:") :]
            stats[stage] = {
                "sum": float(raw.get("sum", 0)),
                "count": int(raw.get("count", 0)),
                "buckets": {le: int(raw.get(f"le:{le}", 0)) for le in STAGE_BUCKETS},
            }
        return stats

    def ping(self):
        self._redis.ping()


def make_store(settings) -> JobStore:
    if settings.mode == "distributed":
        return RedisJobStore(
            settings.redis_url, settings.key_prefix, settings.idempotency_ttl, settings.record_ttl
        )
    return MemoryJobStore(Path(settings.data_dir) / "jobs.json", settings.idempotency_ttl)
