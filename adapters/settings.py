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
        description="read-only folders file:// inputs may name (embedded default: the working "
        "folder)",
    )
    tenant_prefixes: Annotated[dict[str, list[str]], NoDecode] = Field(
        default_factory=dict,
        description="tenant=URI,tenant=URI: more prefixes a tenant reads and writes (besides "
        "fusions/{tenant}/ of OTFUSE_BUCKET and, embedded, artifacts/{tenant}/ of the data dir)",
    )
    data_dir: Path = Field(Path("runs/service"), description="embedded: job file + artifacts")
    hub_repos: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="hub repos hf:// models may name, as patterns (org/*, org/name); none = "
        "no hub inputs",
    )
    hub_cache: Path | None = Field(None, description="hub cache folder (default: the hub's)")
    hub_offline: bool | None = Field(
        None, description="hub models from the cache only (default: HF_HUB_OFFLINE)"
    )
    multipart_threshold_mb: int = Field(64, ge=5, description="files above use multipart")
    s3_attempts: int = Field(
        5, ge=1, le=20, description="tries of an S3 request (exponential backoff between)"
    )

    # Auth.
    api_keys: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, description="key:tenant,key:tenant (none = embedded, loopback)"
    )

    # Jobs.
    max_models: int = Field(8, ge=2, description="models per job")
    max_input_bytes: int = Field(
        64 << 30, ge=1, description="bytes of checkpoints and data one job may download"
    )
    max_layers: int = Field(512, ge=1, description="largest depth a model's config may declare")
    max_width: int = Field(131_072, ge=1, description="largest hidden or MLP width")
    max_vocab: int = Field(1_048_576, ge=1, description="largest vocabulary (and label count)")
    max_parameters: int = Field(
        200_000_000_000, ge=1, description="largest parameter count of one model"
    )
    max_attempts: int = Field(3, ge=1, description="deliveries of one job before it fails")
    soft_time_limit: int = Field(3600, ge=1, description="seconds; the job fails cleanly")
    hard_time_limit: int = Field(3900, ge=2, description="seconds; the worker child is killed")
    lease_seconds: int = Field(30, ge=2, description="running-job lease, renewed every third")
    presign_seconds: int = Field(0, ge=0, le=604800, description="presigned GET URLs; 0 = off")
    retry_after: int = Field(1, ge=1, description="Retry-After seconds while a job is not done")
    idempotency_ttl: int = Field(86400, ge=60, description="seconds an Idempotency-Key is kept")
    record_ttl: int = Field(
        7 * 86400, ge=60, description="seconds a finished job's record is kept (not its outputs)"
    )

    # API bounds.
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest request body")
    max_running_per_tenant: int = Field(4, ge=1, description="a tenant's jobs running at once")
    max_queued_per_tenant: int = Field(100, ge=1, description="a tenant's jobs waiting")
    submit_rate: float = Field(10.0, gt=0, description="a tenant's sustained submits per second")
    submit_burst: int = Field(20, ge=1, description="submits a tenant may make at once")
    worker_memory_bytes: int | None = Field(
        None,
        ge=1,
        description="memory a worker has: jobs whose planned peak is above it are refused at "
        "submit (unset: not checked; embedded: this machine's memory)",
    )
    worker_gpu_memory_bytes: int | None = Field(
        None,
        ge=1,
        description="GPU memory a worker has (and auto = cuda when set): cuda jobs whose "
        "planned peak is above it are refused at submit (unset: not checked)",
    )
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

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, keys):
        from .access import TENANT_NAME

        for key, tenant in keys.items():
            if "change-me" in key.lower() or len(key) < 8:
                raise ValueError(
                    "OTFUSE_API_KEYS holds a placeholder or a key shorter than 8 characters"
                )
            if not TENANT_NAME.match(tenant):
                raise ValueError(f"tenant name {tenant!r}: letters, digits, . _ - (at most 63)")
        return keys

    @field_validator("tenant_prefixes", mode="before")
    @classmethod
    def _parse_prefixes(cls, value):
        if not isinstance(value, str):
            return value
        prefixes: dict[str, list[str]] = {}
        for pair in (p.strip() for p in value.split(",") if p.strip()):
            tenant, sep, uri = pair.partition("=")
            if not sep or not tenant.strip() or not uri.strip():
                raise ValueError("OTFUSE_TENANT_PREFIXES must be tenant=URI,tenant=URI")
            prefixes.setdefault(tenant.strip(), []).append(uri.strip())
        return prefixes

    @field_validator("tenant_prefixes")
    @classmethod
    def _normalize_prefixes(cls, prefixes):
        from fusion_core.errors import InputError

        from .access import normalize

        try:
            return {
                tenant: [normalize("OTFUSE_TENANT_PREFIXES", uri, folder=True) for uri in uris]
                for tenant, uris in prefixes.items()
            }
        except InputError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("allowed_buckets", "file_roots", "hub_repos", mode="before")
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
        """Read-only folders (the tenants' own areas are apart: `service.access`)."""
        roots = list(self.file_roots)
        if self.mode == "embedded" and not roots:
            roots = [Path.cwd()]
        return tuple(Path(r).expanduser().resolve() for r in roots)

    @property
    def limits(self):
        """The fusion core's per-model bounds."""
        from fusion_core.limits import Limits

        return Limits(self.max_layers, self.max_width, self.max_vocab, self.max_parameters)

    def tenant_for(self, key: str) -> str | None:
        for known, tenant in self.api_keys.items():
            if hmac.compare_digest(known.encode(), key.encode()):
                return tenant
        return None
