"""Who may read and write which storage URIs.

- Each tenant owns *areas* it reads and writes: `s3://{OTFUSE_BUCKET}/fusions/{tenant}/`, in
  embedded mode `file://{OTFUSE_DATA_DIR}/artifacts/{tenant}/`, and any prefix the operator
  maps to it (`OTFUSE_TENANT_PREFIXES`).
- The operator declares *read-only sources*: whole buckets (`OTFUSE_ALLOWED_BUCKETS`) and
  folders (`OTFUSE_FILE_ROOTS`). Every tenant reads them.
- *Reserved* places are never named by a tenant, even inside a read-only source: the tenant
  areas themselves (`fusions/` of the output bucket, the embedded data folder, every mapped
  prefix), the service's temporary prefix. A tenant's own area is the only exception.

Outputs must lie in one of the caller's own areas; inputs in an own area or a read-only source
outside every reserved place. URIs are normalized first (file paths resolved, so links and
`..` cannot lead elsewhere than they appear to).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fusion_core.errors import InputError

from .storage import TMP_PREFIX, parse_uri

# Tenant names become path segments of storage prefixes.
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class Area:
    """A storage prefix: everything whose normalized URI starts with `uri` (ends with /)."""

    uri: str

    @classmethod
    def of(cls, uri: str) -> Area:
        return cls(uri.rstrip("/") + "/")

    def contains(self, uri: str) -> bool:
        return uri == self.uri.rstrip("/") or uri.startswith(self.uri)


def normalize(field: str, uri: str, folder: bool) -> str:
    """`s3://bucket/key` (folders end with /) or `file:///resolved/path` (folders end with /).
    Raises InputError at `field` for anything else."""
    try:
        scheme, bucket, path = parse_uri(uri)
    except ValueError as exc:
        raise InputError(f"{exc} (got {uri!r})", field) from None
    if scheme == "hf":
        from .hub import canonical

        if not folder:
            raise InputError(
                f"{uri}: hub URIs name model repos; data files come from s3:// or file://", field
            )
        return canonical(uri)
    if scheme == "s3":
        if not bucket:
            raise InputError(f"{uri}: no bucket", field)
        # Keys are opaque to S3, but not to every S3-compatible server or to the prefix
        # checks here: no `.`, `..` or empty segments.
        segments = path.rstrip("/").split("/") if path.rstrip("/") else []
        if any(part in ("", ".", "..") for part in segments) or "\\" in path:
            raise InputError(f"{uri}: the key must be a plain path (no ., .. or //)", field)
        if not folder and (not path or path.endswith("/")):
            raise InputError(f"{uri}: names a folder, not a file", field)
        if folder:
            path = path.rstrip("/") + "/" if path else ""
        return f"s3://{bucket}/{path}"
    if not path.startswith("/"):
        raise InputError(f"{uri}: file URIs need an absolute path", field)
    resolved = Path(path).resolve()
    return f"file://{resolved}/" if folder else f"file://{resolved}"


class Access:
    def __init__(self, settings):
        self.settings = settings
        self.sources = [Area.of(f"s3://{b}/") for b in sorted(settings.buckets)]
        self.sources += [Area.of(f"file://{root}/") for root in settings.roots]
        reserved = [Area.of(uri) for uris in settings.tenant_prefixes.values() for uri in uris]
        if settings.bucket:
            reserved += [Area.of(f"s3://{settings.bucket}/fusions/")]
            reserved += [Area.of(f"s3://{settings.bucket}/{TMP_PREFIX}")]
        if settings.mode == "embedded":
            reserved += [Area.of(f"file://{Path(settings.data_dir).resolve()}/")]
        self.reserved = reserved

    # -- the areas ---------------------------------------------------------------------------
    def own(self, tenant: str) -> list[Area]:
        areas = [Area.of(uri) for uri in self.settings.tenant_prefixes.get(tenant, [])]
        if self.settings.bucket:
            areas.append(Area.of(f"s3://{self.settings.bucket}/fusions/{tenant}/"))
        if self.settings.mode == "embedded":
            data = Path(self.settings.data_dir).resolve()
            areas.append(Area.of(f"file://{data}/artifacts/{tenant}/"))
        return areas

    def default_output(self, tenant: str, job_id: str) -> str:
        settings = self.settings
        if settings.bucket:
            return f"s3://{settings.bucket}/fusions/{tenant}/{job_id}/"
        if settings.mode == "distributed":
            raise InputError("required: the server has no default bucket (OTFUSE_BUCKET)", "output")
        return f"file://{Path(settings.data_dir).resolve()}/artifacts/{tenant}/{job_id}/"

    # -- the checks --------------------------------------------------------------------------
    def readable(self, tenant: str, uri: str) -> bool:
        if uri.startswith("hf://"):
            from .hub import allowed

            return allowed(uri, self.settings.hub_repos)
        if any(area.contains(uri) for area in self.own(tenant)):
            return True
        if any(area.contains(uri) for area in self.reserved):
            return False
        return any(area.contains(uri) for area in self.sources)

    def writable(self, tenant: str, uri: str) -> bool:
        return any(area.contains(uri) for area in self.own(tenant))

    def check_read(self, field: str, tenant: str, uri: str, folder: bool) -> str:
        """The normalized URI of an input the tenant may read, else an InputError at `field`."""
        normalized = normalize(field, uri, folder)
        self._check_scheme(field, normalized)
        if folder and normalized.startswith("s3://") and normalized.count("/") <= 3:
            raise InputError(f"{uri}: names a bucket root; name the checkpoint's folder", field)
        if normalized.startswith("hf://") and not self.readable(tenant, normalized):
            raise InputError(
                f"{uri}: this server does not take this hub repo (OTFUSE_HUB_REPOS)", field
            )
        if not self.readable(tenant, normalized):
            raise InputError(
                f"{uri}: not readable by this tenant (inputs come from the server's read-only "
                "sources or your own prefix)",
                field,
            )
        return normalized

    def check_write(self, field: str, tenant: str, uri: str) -> str:
        normalized = normalize(field, uri, folder=True)
        self._check_scheme(field, normalized)
        if not self.writable(tenant, normalized):
            areas = ", ".join(area.uri for area in self.own(tenant)) or "none"
            raise InputError(f"{uri}: outputs go under your own prefix ({areas})", field)
        return normalized

    def _check_scheme(self, field: str, uri: str) -> None:
        if uri.startswith("s3://") and not self.settings.s3_enabled:
            raise InputError("s3:// URIs need S3 configured on the server", field)
