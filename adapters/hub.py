"""Model repos on the Hugging Face hub as inputs: `hf://org/name[@revision]`.

Resolved through huggingface_hub, so its cache, `HF_TOKEN` and `HF_HUB_OFFLINE` apply (offline:
from the cache only). Only the files a fusion reads are fetched (config, safetensors, tokenizer
files: `fusion_core.files`); their sizes are known before anything is downloaded, so the
job's byte cap holds. A server lets tenants name only the repos its operator allows
(`OTFUSE_HUB_REPOS`, patterns such as `my-org/*`; none by default).
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

from fusion_core.files import CONFIG_FILE, PICKLED_FILES, SAFETENSORS_INDEX, SIDE_FILES

from .storage import StorageError, StoredFile, UnsafeInput, _target

HUB_URI = re.compile(
    r"^hf://(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95})"
    r"(?:@(?P<revision>[A-Za-z0-9][A-Za-z0-9._/-]{0,254}))?/?$"
)
PATTERNS = [CONFIG_FILE, "*.safetensors", SAFETENSORS_INDEX, *SIDE_FILES]


def parse_hub(uri: str) -> tuple[str, str | None]:
    """("org/name", revision or None); ValueError saying what is wrong."""
    match = HUB_URI.match(uri)
    revision = match and match.group("revision")
    if not match or (revision and (".." in revision or "//" in revision)):
        raise ValueError("hub URIs are hf://org/name or hf://org/name@revision")
    return match.group("repo"), revision


def canonical(uri: str) -> str:
    repo, revision = parse_hub(uri)
    return f"hf://{repo}@{revision}" if revision else f"hf://{repo}"


def allowed(uri: str, patterns: list[str]) -> bool:
    """Whether an operator's patterns (`org/*`, `org/name`) admit the repo of `uri`."""
    repo, _ = parse_hub(uri)
    return any(fnmatch.fnmatchcase(repo, pattern) for pattern in patterns)


class NotOnTheHub(StorageError):
    """The repo or revision does not exist (or, offline, is not in the cache)."""


def fnmatch_any(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


class HubBackend:
    def __init__(self, cache_dir: Path | None = None, offline: bool | None = None):
        self.cache_dir = cache_dir
        self.offline = offline

    def _offline(self) -> bool:
        from huggingface_hub import constants

        return constants.HF_HUB_OFFLINE if self.offline is None else self.offline

    def _snapshot(self, uri: str, patterns: list[str], dry_run: bool = False):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        repo, revision = parse_hub(uri)
        offline = self._offline()
        try:
            return snapshot_download(
                repo,
                revision=revision,
                allow_patterns=patterns,
                cache_dir=self.cache_dir,
                local_files_only=offline,
                dry_run=dry_run,
            )
        except (LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as exc:
            where = "in the hub cache (offline)" if offline else "on the hub"
            raise NotOnTheHub(f"{uri}: not found {where}") from exc
        except (HfHubHTTPError, OSError, ValueError) as exc:
            raise StorageError(f"{uri}: {type(exc).__name__}: {exc}".splitlines()[0]) from exc

    def list_checkpoint(self, uri: str, readable=None, allow_pickle=False) -> list[StoredFile]:
        patterns = PATTERNS + (list(PICKLED_FILES) if allow_pickle else [])
        if self._offline():  # nothing to download: the cached snapshot's files, as they are
            snapshot = Path(self._snapshot(uri, patterns))
            found = [(p.name, p.stat().st_size) for p in sorted(snapshot.iterdir()) if p.is_file()]
        else:  # sizes from the hub before anything is downloaded
            found = [
                (info.filename, int(info.file_size or 0))
                for info in self._snapshot(uri, patterns, dry_run=True)
            ]
        files = [
            StoredFile(name, size, name)
            for name, size in found
            if "/" not in name and fnmatch_any(name, patterns)  # the repo's top level only
        ]
        if not any(f.name == CONFIG_FILE for f in files):
            raise UnsafeInput(f"{uri}: no {CONFIG_FILE} at the top of this repo")
        return files

    def fetch(self, uri: str, files: list[StoredFile], dest: Path, should_stop) -> Path:
        """Download (or find in the cache) exactly `files`, linked into `dest`."""
        snapshot = Path(self._snapshot(uri, [f.name for f in files]))
        dest.mkdir(parents=True, exist_ok=True)
        cache = snapshot.parents[2].resolve()  # .../models--org--name/snapshots/<commit>
        for file in files:
            resolved = (snapshot / file.name).resolve()
            if not resolved.is_relative_to(cache) or not resolved.is_file():
                raise UnsafeInput(f"{uri}: {file.name} does not resolve inside the hub cache")
            _target(dest, file.name).symlink_to(resolved)
        return dest

    def resolve(self, uri: str) -> Path:
        """The local snapshot folder of a repo's checkpoint files (the CLI reads it in place)."""
        files = self.list_checkpoint(uri)
        return Path(self._snapshot(uri, [f.name for f in files]))

    def exists(self, uri: str, folder: bool) -> bool:
        try:
            self.list_checkpoint(uri)
        except (UnsafeInput, NotOnTheHub):
            return False
        return True

    def stat_file(self, uri: str, readable=None) -> StoredFile:
        raise UnsafeInput(
            f"{uri}: hub URIs name model repos; data files come from s3:// or file://"
        )

    def fetch_file(self, uri: str, file: StoredFile, dest: Path, should_stop) -> Path:
        raise UnsafeInput(f"{uri}: hub URIs name model repos, not data files")
