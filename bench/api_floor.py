"""The floor for the API benchmark: a bare FastAPI endpoint that returns a 1 KB JSON record
from Redis with the async client, nothing else (no auth, no ETag, no metrics)."""

from __future__ import annotations

import os

import redis.asyncio
from fastapi import FastAPI
from fastapi.responses import Response

app = FastAPI()
client = redis.asyncio.Redis.from_url(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379"))


@app.get("/records/{record_id}")
async def record(record_id: str) -> Response:
    raw = await client.get(f"floor:{record_id}")
    return Response(raw, media_type="application/json")
