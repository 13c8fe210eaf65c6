"""Where checkpoints and data come from and results go: S3 (boto3) or local folders.

URIs: `s3://bucket/key-or-prefix` and `file:///absolute/path`. `Storage` picks the backend
by scheme. Inputs are *staged* into the job's scratch folder in two steps, so nothing is
fetched before everything is checked:

1. `list_checkpoint` / `stat_file`: what a URI holds. Only the files a fusion reads are taken
   (config, safetensors, tokenizer files: `fusion_core.files`); an object key that is not a
   plain relative path (`..`, `.`, empty segments) fails the job, naming the key; a local file
   whose link leads out of the readable areas fails it too.
2. `fetch`: S3 objects are downloaded (cancellable between chunks) to `scratch/<name>`, a
   path checked to stay in the scratch folder; local files are linked there by their
   resolved, checked path, never copied.

Publishing is atomic and idempotent (see `publish`); deleting a job's artifacts removes only
the files it published, after checking they are still its own (`job.json`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from fusion_core.files import CONFIG_FILE, is_checkpoint_file

JOB_FILE = "job.json"  # written first under the final prefix: whose artifacts these are
METRICS_FILE = "metrics.json"  # written last: the result is complete
TMP_PREFIX = "_otfuse_tmp/"  # in the output bucket: uploads before they are copied into place
CHUNK = 8 << 20
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

Readable = Callable[[str], bool]  # may the job's tenant read this (normalized) URI?
ShouldStop = Callable[[], bool]


class StorageError(Exception):
    """A storage operation failed; the message names the URI."""


class UnsafeInput(StorageError):
    """An input's content is refused (a hostile key or link, too many bytes): the caller's
    mistake, reported as an input error."""


class TransferCancelled(Exception):
    """`should_stop` said stop in the middle of a transfer."""


@dataclass(frozen=True)
class StoredFile:
    name: str  # file name inside the checkpoint folder (a single path segment)
    size: int
    location: str  # the S3 key, or the resolved local path


def parse_uri(uri: str) -> tuple[str, str, str]:
    """`s3://b/k` -> ("s3", "b", "k"); `file:///p` -> ("file", "", "/p");
    `hf://org/name@rev` -> ("hf", "org/name", "rev").
    Raises ValueError saying what is wrong (the caller names the URI)."""
    if _CONTROL.search(uri):
        raise ValueError("control characters are not allowed in URIs")
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return "s3", parsed.netloc, parsed.path.lstrip("/")
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError("file URIs name a local path (file:///...)")
        path = unquote(parsed.path)
        if _CONTROL.search(path):
            raise ValueError("control characters are not allowed in paths")
        return "file", "", path
    if parsed.scheme == "hf":
        from .hub import parse_hub

        repo, revision = parse_hub(uri)
        return "hf", repo, revision or ""
    raise ValueError("scheme must be s3://, file:// or hf://")


def join(prefix: str, name: str) -> str:
    return prefix.rstrip("/") + "/" + name


def _checkpoint_files(uri: str, files: list[StoredFile]) -> list[StoredFile]:
    if not any(f.name == CONFIG_FILE for f in files):
        raise UnsafeInput(f"{uri}: no {CONFIG_FILE} directly in this folder")
    return files


def _check_key(uri: str, key: str, relative: str) -> None:
    """An object key below a model prefix must be a plain relative path."""
    parts = relative.split("/")
    if any(p in ("", ".", "..") for p in parts) or "\\" in relative or _CONTROL.search(relative):
        raise UnsafeInput(f"{uri}: object key {key!r} is not a plain relative path; refused")


def _target(dest: Path, name: str) -> Path:
    """`dest/name`, checked to stay directly inside `dest`."""
    target = dest / name
    if "/" in name or name in ("", ".", "..") or target.resolve().parent != dest.resolve():
        raise UnsafeInput(f"{name!r}: would be written outside the job's scratch folder")
    return target


class LocalBackend:
    def list_checkpoint(self, uri: str, readable: Readable, allow_pickle=False):
        folder = Path(parse_uri(uri)[2])
        if not folder.is_dir():
            raise StorageError(f"{uri}: no such folder")
        files = []
        for entry in sorted(folder.iterdir()):
            if is_checkpoint_file(entry.name, allow_pickle):
                files.append(self._checked(join(uri, entry.name), entry, readable))
        return _checkpoint_files(uri, files)

    def stat_file(self, uri: str, readable: Readable) -> StoredFile:
        path = Path(parse_uri(uri)[2])
        if not path.exists():
            raise StorageError(f"{uri}: no such file")
        return self._checked(uri, path, readable)

    @staticmethod
    def _checked(uri: str, path: Path, readable: Readable) -> StoredFile:
        """The file behind `path`, after its links: a regular file the tenant may read."""
        resolved = path.resolve()
        if not readable(f"file://{resolved}"):
            raise UnsafeInput(f"{uri}: a link leading out of the readable folders; refused")
        if not resolved.is_file():
            raise UnsafeInput(f"{uri}: not a regular file")
        return StoredFile(path.name, resolved.stat().st_size, str(resolved))

    def fetch(self, uri: str, files: list[StoredFile], dest: Path, should_stop: ShouldStop):
        dest.mkdir(parents=True, exist_ok=True)
        for file in files:
            _target(dest, file.name).symlink_to(file.location)
        return dest

    def fetch_file(self, uri: str, file: StoredFile, dest: Path, should_stop: ShouldStop):
        return Path(file.location)  # read in place: resolved and checked by stat_file

    def read_range(self, uri: str, file: StoredFile, start: int, length: int) -> bytes:
        """Bytes of a listed (resolved, checked) file: a header, never a whole checkpoint."""
        try:
            with open(file.location, "rb") as handle:
                handle.seek(start)
                return handle.read(length)
        except OSError as exc:
            raise StorageError(f"{uri}: {exc.strerror or exc}") from exc

    def exists(self, uri: str, folder: bool) -> bool:
        path = Path(parse_uri(uri)[2])
        return (path / CONFIG_FILE).is_file() if folder else path.is_file()

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
        if root.exists() and not root.is_dir():
            raise StorageError(f"{prefix}: exists and is not a folder")
        if not root.is_dir():
            return []
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    def publish(self, local: Path, prefix: str, job_id: str, attempt: int) -> list[str]:
        """Copy to a sibling temp folder, then rename it into place (atomic). Returns the
        published file names."""
        final = Path(parse_uri(prefix)[2])
        if final.exists() and not final.is_dir():
            raise StorageError(f"{prefix}: exists and is not a folder")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.otfuse-tmp-{job_id}-{attempt}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            shutil.copytree(local, tmp)
            if final.exists():  # a crashed attempt of this job, or an empty folder (checked)
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return sorted(str(p.relative_to(final)) for p in final.rglob("*") if p.is_file())

    def delete_files(self, prefix: str, names: list[str]) -> None:
        root = Path(parse_uri(prefix)[2])
        for name in names:
            path = root / name
            if path.resolve().parent.is_relative_to(root.resolve()) and path.is_file():
                path.unlink()
        for folder in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
            if not any(folder.iterdir()):
                folder.rmdir()
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()

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
        # Standard retries: 5xx, throttling and connection errors are retried with
        # exponential backoff, `s3_attempts` tries in all.
        retries = {"mode": "standard", "max_attempts": settings.s3_attempts}
        config = Config(signature_version="s3v4", s3=style, retries=retries)
        kwargs = {"region_name": settings.s3_region, "config": config}
        self._client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url, **kwargs)
        # Submit-time probes: one quick try, so a store that is down does not stall a request.
        quick = Config(
            signature_version="s3v4",
            s3=style,
            retries={"mode": "standard", "max_attempts": 1},
            connect_timeout=3,
            read_timeout=5,
        )
        self._probe = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            config=quick,
        )
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

        if isinstance(exc, StorageError):
            return exc
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            return StorageError(f"{uri}: {error.get('Code')}: {error.get('Message', '')}".strip())
        return StorageError(f"{uri}: {exc}")

    def _objects(self, bucket: str, prefix: str) -> list[tuple[str, int]]:
        objects = []
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            objects += [(o["Key"], int(o["Size"])) for o in page.get("Contents", [])]
        return objects

    def _keys(self, bucket: str, prefix: str) -> list[str]:
        return [key for key, _ in self._objects(bucket, prefix)]

    def list_checkpoint(self, uri: str, readable: Readable, allow_pickle=False):
        _, bucket, key = parse_uri(uri)
        prefix = key.rstrip("/") + "/"
        if prefix == "/":
            raise UnsafeInput(f"{uri}: names a bucket root; name the checkpoint's folder")
        try:
            objects = self._objects(bucket, prefix)
        except Exception as exc:
            raise self._error(uri, exc) from exc
        if not objects:
            raise StorageError(f"{uri}: no objects under this prefix")
        files = []
        for object_key, size in objects:
            relative = object_key[len(prefix) :]
            _check_key(uri, object_key, relative)
            if "/" not in relative and is_checkpoint_file(relative, allow_pickle):
                files.append(StoredFile(relative, size, object_key))
        return _checkpoint_files(uri, files)

    def stat_file(self, uri: str, readable: Readable) -> StoredFile:
        _, bucket, key = parse_uri(uri)
        try:
            head = self._client.head_object(Bucket=bucket, Key=key)
        except Exception as exc:
            raise self._error(uri, exc) from exc
        return StoredFile(key.rsplit("/", 1)[-1], int(head["ContentLength"]), key)

    def fetch(self, uri: str, files: list[StoredFile], dest: Path, should_stop: ShouldStop):
        _, bucket, _ = parse_uri(uri)
        dest.mkdir(parents=True, exist_ok=True)
        for file in files:
            self._download(uri, bucket, file.location, _target(dest, file.name), should_stop)
        return dest

    def fetch_file(self, uri: str, file: StoredFile, dest: Path, should_stop: ShouldStop):
        _, bucket, _ = parse_uri(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        self._download(uri, bucket, file.location, dest, should_stop)
        return dest

    def _download(self, uri: str, bucket: str, key: str, target: Path, should_stop) -> None:
        def progress(_bytes: int) -> None:  # called between chunks by boto3's transfer threads
            if should_stop():
                raise TransferCancelled(uri)

        try:
            self._client.download_file(
                bucket, key, str(target), Config=self._transfer, Callback=progress
            )
        except TransferCancelled:
            raise
        except Exception as exc:
            if should_stop():
                raise TransferCancelled(uri) from exc
            raise self._error(uri, exc) from exc

    def read_range(self, uri: str, file: StoredFile, start: int, length: int) -> bytes:
        """One ranged GET of a listed object (a safetensors header, a config)."""
        if length <= 0:
            return b""
        _, bucket, _ = parse_uri(uri)
        try:
            reply = self._probe.get_object(
                Bucket=bucket, Key=file.location, Range=f"bytes={start}-{start + length - 1}"
            )
            return reply["Body"].read(length)
        except Exception as exc:
            raise self._error(uri, exc) from exc

    def exists(self, uri: str, folder: bool) -> bool:
        from botocore.exceptions import ClientError

        _, bucket, key = parse_uri(uri)
        key = key.rstrip("/") + "/" + CONFIG_FILE if folder else key
        try:
            self._probe.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._error(uri, exc) from exc
        except Exception as exc:
            raise self._error(uri, exc) from exc
        return True

    def read_json(self, uri: str) -> dict | None:
        from botocore.exceptions import ClientError

        _, bucket, key = parse_uri(uri)
        try:
            body = self._client.get_object(Bucket=bucket, Key=key)["Body"].read(16 << 20)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise self._error(uri, exc) from exc
        except Exception as exc:
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

    def publish(self, local: Path, prefix: str, job_id: str, attempt: int) -> list[str]:
        """Upload to a temporary prefix, then copy to the final keys (job.json first,
        metrics.json last: a reader that sees metrics.json sees a complete result), then
        delete the temporary keys (of every attempt of the job). Returns the published names.
        If the copies fail midway, the ones made are deleted again (best effort: the store
        may be down)."""
        _, bucket, key = parse_uri(prefix)
        key = key.rstrip("/") + "/"
        tmp = f"{TMP_PREFIX}{job_id}/{attempt}/"
        names = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
        order = [JOB_FILE] + [n for n in names if n not in (JOB_FILE, METRICS_FILE)]
        order.append(METRICS_FILE)
        copied: list[str] = []
        try:
            for name in order:
                self._client.upload_file(
                    str(local / name), bucket, tmp + name, Config=self._transfer
                )
            for name in order:
                self._client.copy(
                    {"Bucket": bucket, "Key": tmp + name}, bucket, key + name, Config=self._transfer
                )
                copied.append(name)
        except Exception as exc:
            self._delete_quietly(bucket, [key + n for n in copied])
            raise self._error(prefix, exc) from exc
        finally:  # this attempt's uploads, and those of attempts that died before cleaning up
            self._delete_quietly(bucket, None, f"{TMP_PREFIX}{job_id}/")
        return order

    def _delete_keys(self, bucket: str, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            chunk = [{"Key": k} for k in keys[start : start + 1000]]
            self._client.delete_objects(Bucket=bucket, Delete={"Objects": chunk, "Quiet": True})

    def _delete_quietly(self, bucket: str, keys: list[str] | None, prefix: str = "") -> None:
        with contextlib.suppress(Exception):  # the store is failing; the caller reports why
            self._delete_keys(bucket, keys if keys is not None else self._keys(bucket, prefix))

    def delete_files(self, prefix: str, names: list[str]) -> None:
        _, bucket, key = parse_uri(prefix)
        key = key.rstrip("/") + "/"
        try:
            self._delete_keys(bucket, [key + name for name in names])
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
        if scheme == "hf":
            from .hub import HubBackend

            return HubBackend(self.settings.hub_cache, self.settings.hub_offline)
        if scheme == "s3":
            if not self.settings.s3_enabled:
                raise StorageError(f"{uri}: S3 is not configured (OTFUSE_S3_ENDPOINT_URL)")
            return self.s3
        return self.local

    def delete_published(self, prefix: str, job_id: str, names: list[str]) -> None:
        """Delete exactly `names` under `prefix`, if `job.json` there still says they are
        `job_id`'s (another job may have published there since)."""
        backend = self.backend(prefix)
        owner = backend.read_json(join(prefix, JOB_FILE))
        if not owner or owner.get("job_id") != job_id:
            raise StorageError(f"{prefix}: the files there are no longer this job's")
        backend.delete_files(prefix, [n for n in names if n != JOB_FILE] + [JOB_FILE])

    def ping(self) -> None:
        if self.settings.s3_enabled:
            self.s3.ping()
