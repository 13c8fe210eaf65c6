"""Where checkpoints and data come from and results go: S3 (boto3) or local folders.

URIs: `s3://bucket/key-or-prefix` and `file:///absolute/path`. `Storage` picks the backend
by scheme. Publishing is atomic and idempotent (see `publish`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

JOB_FILE = "job.json"  # written first under the final prefix: whose artifacts these are
METRICS_FILE = "metrics.json"  # written last: the result is complete


class StorageError(Exception):
    """A storage operation failed; the message names the URI."""


def parse_uri(uri: str) -> tuple[str, str, str]:
    """`s3://b/k` -> ("s3", "b", "k"); `file:///p` -> ("file", "", "/p")."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return "s3", parsed.netloc, parsed.path.lstrip("/")
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{uri}: file URIs name a local path (file:///...)")
        return "file", "", unquote(parsed.path)
    raise ValueError(f"{uri}: scheme must be s3:// or file://")


def join(prefix: str, name: str) -> str:
    return prefix.rstrip("/") + "/" + name


class LocalBackend:
    def fetch_folder(self, uri: str, dest: Path) -> Path:
        path = Path(parse_uri(uri)[2])
        if not path.is_dir():
            raise StorageError(f"{uri}: no such folder")
        return path  # read in place

    def fetch_file(self, uri: str, dest: Path) -> Path:
        path = Path(parse_uri(uri)[2])
        if not path.is_file():
            raise StorageError(f"{uri}: no such file")
        return path

    def read_json(self, uri: str) -> dict | None:
        path = Path(parse_uri(uri)[2])
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StorageError(f"{uri}: {exc}") from exc

    def list_names(self, prefix: str) -> list[str]:
        root = Path(parse_uri(prefix)[2])
        if not root.is_dir():
            return []
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    def publish(self, local: Path, prefix: str, job_id: str, attempt: int) -> None:
        """Copy to a sibling temp folder, then rename it into place (atomic)."""
        final = Path(parse_uri(prefix)[2])
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.otfuse-tmp-{job_id}-{attempt}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(local, tmp)
        if final.exists():  # a crashed attempt of this job, or an empty folder (checked before)
            shutil.rmtree(final)
        os.replace(tmp, final)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(Path(parse_uri(prefix)[2]), ignore_errors=True)

    def presign(self, uri: str, seconds: int) -> str | None:
        return None

    def ping(self) -> None:
        pass


class S3Backend:
    def __init__(self, settings):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        style = {"addressing_style": "path"} if settings.s3_endpoint_url else {}
        config = Config(signature_version="s3v4", s3=style, retries={"mode": "standard"})
        kwargs = {"region_name": settings.s3_region, "config": config}
        self._client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url, **kwargs)
        public = settings.s3_public_endpoint_url or settings.s3_endpoint_url
        self._signer = boto3.client("s3", endpoint_url=public, **kwargs)
        mb = 1024 * 1024
        self._transfer = TransferConfig(
            multipart_threshold=settings.multipart_threshold_mb * mb,
            multipart_chunksize=max(8, settings.multipart_threshold_mb // 4) * mb,
        )
        self._bucket = settings.bucket

    def _error(self, uri: str, exc: Exception) -> StorageError:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            return StorageError(f"{uri}: {error.get('Code')}: {error.get('Message', '')}".strip())
        return StorageError(f"{uri}: {exc}")

    def _keys(self, bucket: str, prefix: str) -> list[str]:
        keys = []
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return keys

    def fetch_folder(self, uri: str, dest: Path) -> Path:
        _, bucket, key = parse_uri(uri)
        prefix = key.rstrip("/") + "/" if key else ""
        try:
            keys = [k for k in self._keys(bucket, prefix) if not k.endswith("/")]
            if not keys:
                raise StorageError(f"{uri}: no objects under this prefix")
            for k in keys:
                target = dest / k[len(prefix) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                self._client.download_file(bucket, k, str(target), Config=self._transfer)
        except StorageError:
            raise
        except Exception as exc:
            raise self._error(uri, exc) from exc
        return dest

    def fetch_file(self, uri: str, dest: Path) -> Path:
        _, bucket, key = parse_uri(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._client.download_file(bucket, key, str(dest), Config=self._transfer)
        except Exception as exc:
            raise self._error(uri, exc) from exc
        return dest

    def read_json(self, uri: str) -> dict | None:
        from botocore.exceptions import ClientError

        _, bucket, key = parse_uri(uri)
        try:
            body = self._client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise self._error(uri, exc) from exc
        try:
            return json.loads(body)
        except ValueError as exc:
            raise StorageError(f"{uri}: not JSON") from exc

    def list_names(self, prefix: str) -> list[str]:
        _, bucket, key = parse_uri(prefix)
        key = key.rstrip("/") + "/"
        try:
            return sorted(k[len(key) :] for k in self._keys(bucket, key))
        except Exception as exc:
            raise self._error(prefix, exc) from exc

    def publish(self, local: Path, prefix: str, job_id: str, attempt: int) -> None:
        """Upload to a temporary prefix, then copy to the final keys (job.json first,
        metrics.json last: a reader that sees metrics.json sees a complete result), then
        delete the temporary keys."""
        _, bucket, key = parse_uri(prefix)
        key = key.rstrip("/") + "/"
        tmp = f"_otfuse_tmp/{job_id}/{attempt}/"
        names = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
        order = [JOB_FILE] + [n for n in names if n not in (JOB_FILE, METRICS_FILE)]
        order.append(METRICS_FILE)
        try:
            for name in order:
                self._client.upload_file(
                    str(local / name), bucket, tmp + name, Config=self._transfer
                )
            for name in order:
                self._client.copy(
                    {"Bucket": bucket, "Key": tmp + name}, bucket, key + name, Config=self._transfer
                )
        except Exception as exc:
            raise self._error(prefix, exc) from exc
        finally:
            self._delete(bucket, tmp)

    def _delete(self, bucket: str, prefix: str) -> None:
        keys = self._keys(bucket, prefix)
        for start in range(0, len(keys), 1000):
            chunk = [{"Key": k} for k in keys[start : start + 1000]]
            self._client.delete_objects(Bucket=bucket, Delete={"Objects": chunk, "Quiet": True})

    def delete_prefix(self, prefix: str) -> None:
        _, bucket, key = parse_uri(prefix)
        try:
            self._delete(bucket, key.rstrip("/") + "/")
        except Exception as exc:
            raise self._error(prefix, exc) from exc

    def presign(self, uri: str, seconds: int) -> str | None:
        _, bucket, key = parse_uri(uri)
        return self._signer.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=seconds
        )

    def ping(self) -> None:
        if self._bucket:
            try:
                self._client.head_bucket(Bucket=self._bucket)
            except Exception as exc:
                raise self._error(f"s3://{self._bucket}", exc) from exc


class Storage:
    """Dispatches by URI scheme; S3 only when configured."""

    def __init__(self, settings):
        self.settings = settings
        self.local = LocalBackend()
        self._s3 = None

    @property
    def s3(self) -> S3Backend:
        if self._s3 is None:
            self._s3 = S3Backend(self.settings)
        return self._s3

    def backend(self, uri: str):
        scheme = parse_uri(uri)[0]
        if scheme == "s3":
            if not self.settings.s3_enabled:
                raise StorageError(f"{uri}: S3 is not configured (OTFUSE_S3_ENDPOINT_URL)")
            return self.s3
        return self.local

    def ping(self) -> None:
        if self.settings.s3_enabled:
            self.s3.ping()
