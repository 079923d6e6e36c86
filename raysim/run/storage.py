"""Run directories on a filesystem URL (`s3://bucket/runs/x`, `gs://...`, `file:///...`,
`memory://...`: anything fsspec implements), so a RayJob retried on a fresh cluster finds
its run and resumes.

The run works in a local staging directory and `Mirror.sync` copies it to the URL after
every checkpoint and at the end: only new or changed files are uploaded, files the run
deleted (pruned checkpoints) are deleted remotely. A checkpoint's `meta.json` (its content
hash; what makes a checkpoint exist for `raysim.run.checkpoint`) is uploaded after everything
else, and deleted first, so a reader of the URL never sees a half-written checkpoint.
`client_state/` is not mirrored: the workers read and write it at the URL themselves
(actors/state_store.py), from whichever node they run on."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path, PurePosixPath

from raysim.config import ConfigError

MARKER = ".raysim-staging"  # in a staging directory: the URL it mirrors
REMOTE_ONLY = "client_state"  # written at the URL by the workers, never staged
_CREDENTIALS = {
    "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for an S3-compatible store)",
    "s3a": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS (a service-account key file)",
    "gcs": "GOOGLE_APPLICATION_CREDENTIALS (a service-account key file)",
    "az": "AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY (or AZURE_STORAGE_CONNECTION_STRING)",
    "abfs": "AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY (or AZURE_STORAGE_CONNECTION_STRING)",
}


class StorageError(ConfigError):
    """A run directory URL that cannot be used: the CLI prints it and exits with code 2."""


def is_url(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def protocol(url: str) -> str:
    return url.split("://", 1)[0].lower()


def open_fs(url: str):
    """(fsspec filesystem, path inside it) for a URL, or a StorageError saying what to install."""
    import fsspec.core

    proto = protocol(url)
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as err:
        fix = (
            "install raysim's storage extra: pip install 'raysim[storage]' (s3fs and gcsfs)"
            if proto in ("s3", "s3a", "gs", "gcs")
            else "install the package named"
        )
        raise StorageError(
            f"--out {url}: the {proto}:// filesystem needs a package that is not installed ({err}); {fix}."
        ) from None
    except (ValueError, TypeError) as err:
        raise StorageError(
            f"--out {url}: no filesystem implements {proto}:// ({err}). Use a local path (e.g. a PVC mount), "
            "file://, s3:// or gs:// (with `pip install 'raysim[storage]'`), or another protocol fsspec knows."
        ) from None


def access_error(url: str, err: BaseException) -> StorageError:
    """A failed call on the URL's filesystem as one clear message (credentials, mostly)."""
    proto = protocol(url)
    text = f"{type(err).__name__}: {err}"
    creds = _CREDENTIALS.get(proto)
    looks_like_auth = isinstance(err, PermissionError) or any(
        w in text.lower() for w in ("credential", "access denied", "accessdenied", "forbidden", "403", "unauthori")
    )
    hint = (
        f"set the credentials of {proto}:// as environment variables: {creds}"
        if creds
        else f"check that {url} is reachable and that this process may read and write it"
    )
    what = "cannot use" if not looks_like_auth else "has no access to"
    return StorageError(f"--out {url}: raysim {what} it ({text}); {hint}.")


def default_staging(url: str) -> Path:
    from raysim.cache import cache_root

    return cache_root() / "runs" / hashlib.sha256(url.encode()).hexdigest()[:16]


def remove_tree(location: str) -> None:
    """rm -rf a local path or a URL (nothing there is fine)."""
    if not is_url(location):
        shutil.rmtree(location, ignore_errors=True)
        return
    fs, path = open_fs(location)
    try:
        if fs.find(path):
            fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
    except Exception as err:  # noqa: BLE001 - reported as a storage problem
        raise access_error(location, err) from None


def _is_commit(rel: str) -> bool:
    """A checkpoint's meta.json: the file that makes the checkpoint visible to a reader."""
    parts = PurePosixPath(rel).parts
    return len(parts) == 3 and parts[0] == "checkpoints" and parts[2] == "meta.json"


class Mirror:
    """A local staging directory mirrored to a URL."""

    def __init__(self, url: str, staging: str | Path | None = None):
        self.url = url.rstrip("/")
        self.fs, self.root = open_fs(self.url)
        self.root = self.root.rstrip("/")
        self.staging = Path(staging if staging is not None else default_staging(self.url)).absolute()
        self.synced: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) as uploaded
        self._made: set[str] = set()

    # -- remote side (every call goes through _call: errors become StorageError)

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (StorageError, FileNotFoundError):
            raise
        except Exception as err:  # noqa: BLE001 - credentials, network, permissions
            raise access_error(self.url, err) from None

    def _remote(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def remote_files(self) -> list[str]:
        """Relative paths of every file at the URL (client_state included)."""
        try:
            found = self._call(self.fs.find, self.root)
        except FileNotFoundError:
            return []
        prefix = self.root.lstrip("/") + "/"
        return sorted(p.lstrip("/")[len(prefix):] for p in found if p.lstrip("/").startswith(prefix))

    def holds_run(self) -> bool:
        return bool(self._call(self.fs.exists, self._remote("config.yaml")))

    def check(self, num_workers: int = 0) -> None:
        """Fail now, with a clear message, if the URL cannot be listed (credentials) or
        cannot be reached by the client workers (memory:// with Ray workers)."""
        if self.fs.protocol in ("memory", ("memory",)) and num_workers:
            raise StorageError(
                f"--out {self.url}: memory:// lives in one process, but runtime.num_workers={num_workers} "
                "runs clients in others; use runtime.num_workers=0 or another URL"
            )
        self.remote_files()

    def _rm(self, rel: str) -> None:
        try:
            self._call(self.fs.rm_file, self._remote(rel))
        except FileNotFoundError:
            pass

    def _local_fs(self) -> bool:
        return "file" in (self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,))

    def _makedirs(self, rel: str) -> None:
        # Object stores have no directories; a local (file://) filesystem needs them.
        parent = str(PurePosixPath(rel).parent)
        if self._local_fs() and parent not in self._made:
            self._call(self.fs.makedirs, self._remote(parent), exist_ok=True)
            self._made.add(parent)

    # -- staging

    def prepare_staging(self) -> None:
        """Empty the staging directory; refuse one that is not empty and not ours."""
        s = self.staging
        if s.exists() and any(s.iterdir()):
            marker = s / MARKER
            if not marker.is_file() or marker.read_text().strip() != self.url:
                raise StorageError(
                    f"--staging {s} is not empty and is not the staging directory of {self.url}; "
                    "pass an empty (or new) directory (nothing there was changed)"
                )
            shutil.rmtree(s)
        s.mkdir(parents=True, exist_ok=True)
        (s / MARKER).write_text(self.url + "\n")
        self.synced = {}

    def _local_files(self) -> dict[str, tuple[int, int]]:
        out = {}
        for dirpath, dirnames, filenames in os.walk(self.staging):
            rel_dir = Path(dirpath).relative_to(self.staging)
            # hidden entries: the marker, half-written checkpoints (.tmp-round-*)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not (rel_dir == Path(".") and d == REMOTE_ONLY))
            for name in filenames:
                if name.startswith("."):
                    continue
                st = os.stat(os.path.join(dirpath, name))
                out[(rel_dir / name).as_posix()] = (st.st_size, st.st_mtime_ns)
        return out

    def download(self) -> list[str]:
        """Copy the run at the URL into the (prepared) staging directory. A checkpoint
        without its meta.json (an upload cut short) is left out, and deleted remotely by
        the next sync. Returns the relative paths downloaded."""
        files = [f for f in self.remote_files() if not f.startswith(REMOTE_ONLY + "/")]
        self._check_inside(files)
        committed = {str(PurePosixPath(f).parent) for f in files if _is_commit(f)}
        got = []
        for rel in files:
            parts = PurePosixPath(rel).parts
            if parts[0] == "checkpoints" and len(parts) == 3 and str(PurePosixPath(rel).parent) not in committed:
                self.synced[rel] = (-1, -1)  # remote only: deleted on the next sync
                continue
            local = self.staging / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            self._call(self.fs.get_file, self._remote(rel), str(local))
            st = local.stat()
            self.synced[rel] = (st.st_size, st.st_mtime_ns)
            got.append(rel)
        return got

    def _check_inside(self, files: list[str]) -> None:
        """Refuse, before writing anything, a remote key that would land outside the
        staging directory ("../x", an absolute path): whoever can write under the URL's
        prefix must not get a file write anywhere else on this machine."""
        root = self.staging.resolve()
        for rel in files:
            target = (self.staging / rel).resolve()
            if PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts or not target.is_relative_to(root):
                raise StorageError(
                    f"--out {self.url}: the key {rel!r} there would be written outside the staging directory "
                    f"{self.staging}; nothing was downloaded. Remove that key from the bucket (someone with "
                    "write access to it put it there) and run again."
                )

    def sync(self) -> dict[str, int]:
        """Upload new and changed files, then delete remotely what the run deleted locally."""
        local = self._local_files()
        changed = sorted(rel for rel, sig in local.items() if self.synced.get(rel) != sig)
        # A checkpoint that is being rewritten stops existing for readers first.
        rewritten = {str(PurePosixPath(r).parent) for r in changed if PurePosixPath(r).parts[0] == "checkpoints"}
        for ckpt in sorted(rewritten):
            meta = f"{ckpt}/meta.json"
            if meta in self.synced:
                self._rm(meta)
                del self.synced[meta]
        # Data first, each checkpoint's meta.json last (oldest round first).
        for rel in [r for r in changed if not _is_commit(r)] + [r for r in changed if _is_commit(r)]:
            self._makedirs(rel)
            self._call(self.fs.put_file, str(self.staging / rel), self._remote(rel))
            self.synced[rel] = local[rel]
        gone = [r for r in self.synced if r not in local]
        gone = sorted(gone, key=lambda r: (not _is_commit(r), r))  # a pruned checkpoint's meta.json first
        for rel in gone:
            self._rm(rel)
            del self.synced[rel]
        if self._local_fs():  # empty directories of pruned checkpoints
            for d in sorted({str(PurePosixPath(r).parent) for r in gone}, key=len, reverse=True):
                path = self._remote(d)
                if d != "." and not (self.staging / d).is_dir() and self.fs.isdir(path) and not self.fs.ls(path):
                    self._call(self.fs.rmdir, path)
        return {"uploaded": len(changed), "deleted": len(gone)}
