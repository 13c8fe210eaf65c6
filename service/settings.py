"""One settings object, read from `OTFUSE_*` environment variables (pydantic-settings).

No `OTFUSE_REDIS_URL` = the embedded default: in-process job store and queue, a local folder
as storage, loopback only. With it = distributed mode: Redis job store, Celery broker, S3.
"""

from __future__ import annotations

import hmac
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OTFUSE_", extra="ignore")

    # Where things live.
    redis_url: str | None = Field(None, description="job store; unset = embedded mode")
    broker_url: str | None = Field(None, description="Celery broker (default: OTFUSE_REDIS_URL)")
    key_prefix: str = Field("otfuse:", description="prefix of every job-store key in Redis")
    s3_endpoint_url: str | None = Field(None, description="S3 API endpoint (MinIO, ...)")
    s3_public_endpoint_url: str | None = Field(
        None, description="endpoint presigned URLs are signed for (default: the S3 endpoint)"
    )
    s3_region: str = Field("us-east-1", description="region for signing")
    bucket: str | None = Field(None, description="default output bucket")
    allowed_buckets: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="buckets s3:// URIs may name (default: OTFUSE_BUCKET)"
    )
    file_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="folders file:// URIs may name (embedded default: the working folder)",
    )
    data_dir: Path = Field(Path("runs/service"), description="embedded: job file + artifacts")
    multipart_threshold_mb: int = Field(64, ge=5, description="files above use multipart")

    # Auth.
    api_keys: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, description="key:tenant,key:tenant (none = embedded, loopback)"
    )

    # Jobs.
    max_models: int = Field(8, ge=2, description="models per job")
    max_attempts: int = Field(3, ge=1, description="deliveries of one job before it fails")
    soft_time_limit: int = Field(3600, ge=1, description="seconds; the job fails cleanly")
    hard_time_limit: int = Field(3900, ge=2, description="seconds; the worker child is killed")
    lease_seconds: int = Field(30, ge=2, description="running-job lease, renewed every third")
    presign_seconds: int = Field(0, ge=0, le=604800, description="presigned GET URLs; 0 = off")
    retry_after: int = Field(1, ge=1, description="Retry-After seconds while a job is not done")
    idempotency_ttl: int = Field(86400, ge=60, description="seconds an Idempotency-Key is kept")
    allow_pickle: bool = Field(False, description="read legacy .bin with weights_only loading")
    device: str = Field("auto", description="auto = cuda when the worker has one, else cpu")
    embedded_workers: int = Field(1, ge=1, description="embedded: worker threads")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_keys(cls, value):
        if isinstance(value, str):
            pairs = [p.strip() for p in value.split(",") if p.strip()]
            keys = {}
            for pair in pairs:
                key, sep, tenant = pair.rpartition(":")
                if not sep or not key or not tenant:
                    raise ValueError("OTFUSE_API_KEYS must be key:tenant,key:tenant")
                keys[key] = tenant
            return keys
        return value

    @field_validator("allowed_buckets", "file_roots", mode="before")
    @classmethod
    def _split(cls, value):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @model_validator(mode="after")
    def _check(self):
        if self.hard_time_limit <= self.soft_time_limit:
            raise ValueError("OTFUSE_HARD_TIME_LIMIT must be above OTFUSE_SOFT_TIME_LIMIT")
        return self

    @property
    def mode(self) -> Literal["embedded", "distributed"]:
        return "distributed" if self.redis_url else "embedded"

    @property
    def broker(self) -> str | None:
        return self.broker_url or self.redis_url

    @property
    def visibility_timeout(self) -> int:
        """Redis redelivers an unacked message after this; above the hard limit so a running
        job is never handed to a second worker while its first is still allowed to run."""
        return self.hard_time_limit + 2 * self.lease_seconds + 60

    @property
    def s3_enabled(self) -> bool:
        return bool(self.s3_endpoint_url or self.bucket or self.allowed_buckets)

    @cached_property
    def buckets(self) -> frozenset[str]:
        return frozenset(self.allowed_buckets or ([self.bucket] if self.bucket else []))

    @cached_property
    def roots(self) -> tuple[Path, ...]:
        roots = list(self.file_roots)
        if self.mode == "embedded" and not roots:
            roots = [Path.cwd()]
        if self.mode == "embedded":
            roots.append(self.data_dir)
        return tuple(Path(r).expanduser().resolve() for r in roots)

    def tenant_for(self, key: str) -> str | None:
        for known, tenant in self.api_keys.items():
            if hmac.compare_digest(known.encode(), key.encode()):
                return tenant
        return None
