"""Shard folders in an object store: ``--data s3://bucket/prefix`` (or ``gs://``) read by train, eval and embed,
``empssl shard SRC --out s3://bucket/prefix`` (or ``gs://``) written; every other output naming a bucket is refused.

Reading: the folder's small files (manifest.json, each split's index.json and labels.npy) are fetched into a
mirror under ``--data-dir`` and checked there by :func:`empssl.shard.verify_shards`, as local folders are; each
shard's size is checked against the bucket's listing (hashing would read every byte). LitData reads the images
into a chunk cache beside the mirror.

Credentials and endpoint come from the environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` ...; gs://:
``GOOGLE_APPLICATION_CREDENTIALS``, ``STORAGE_EMULATOR_HOST``). Every request has the bounded timeouts and tries of
:mod:`empssl.litdata_http` (gs://: :data:`GS_RETRY_SECONDS` of tries): a missing bucket, object or credentials, or an
unreachable endpoint, is one line (DataError) within seconds.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from functools import cached_property
from pathlib import Path
from typing import Any

from . import litdata_http
from .data import DataError
from .files import OutputError, write_atomic
from .litdata_http import ATTEMPTS, CONNECT_SECONDS, READ_SECONDS
from .shard import MANIFEST, Manifest, ShardFile, ShardFolder, check_size, verify_shards, write_shards

GS_RETRY_SECONDS = CONNECT_SECONDS * ATTEMPTS  # google-cloud-storage counts its retries by time, not by tries


class Unreachable(DataError):
    """The store did not answer (after the bounded tries): not a sign that the data changed."""


def is_remote(spec: str | Path) -> bool:
    """True when ``spec`` names an object store (s3:// or gs://)."""
    return str(spec).startswith(("s3://", "gs://"))


def refuse_output(path: str | Path, flag: str = "--out") -> None:
    """OutputError (one line) when an output other than ``empssl shard``'s names an object store."""
    if is_remote(path):
        raise OutputError(f"{flag} {path}: this output is written on a local disk (a run directory needs a lock and "
                          f"atomic renames, which an object store has not); write it locally and copy it")


class RemoteFolder(ShardFolder):
    """The shard folder at ``url`` for :func:`empssl.shard.verify_shards`: its small files fetched into a mirror
    under ``data_dir``, its shards' sizes from the bucket's listing."""

    def __init__(self, url: str, data_dir: str = "./data") -> None:
        self.url = url.rstrip("/")
        self.scheme, _, rest = self.url.partition("://")
        self.bucket, _, self.prefix = rest.partition("/")
        if not self.bucket or any(p in ("", ".", "..") for p in self.prefix.split("/")):  # also an empty prefix
            raise DataError(f"{url}: expected {self.scheme}://BUCKET/PREFIX, a folder inside a bucket")
        super().__init__(Path(data_dir).expanduser() / "remote" / self.scheme / self.bucket / self.prefix)
        self._listed: dict[str, dict[str, int]] = {}

    def fetch(self, name: str) -> None:
        path, key, data = self.root / name, f"{self.prefix}/{name}", None
        with self.errors():
            if self.scheme == "gs":
                from google.api_core.exceptions import NotFound

                with suppress(NotFound):
                    data = bytes(self.client.bucket(self.bucket).blob(key).download_as_bytes(**gs_bounds()))
            else:
                from botocore.exceptions import ClientError

                try:
                    data = bytes(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())
                except ClientError as e:
                    if e.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404"):
                        raise
        if data is None:
            path.unlink(missing_ok=True)
            if name == MANIFEST:
                self.sizes(MANIFEST)  # names a missing bucket (a gs:// read there answers as for a missing object)
                raise DataError(f"no {MANIFEST} in {self.url}: not a folder of empssl shards (make them with: "
                                f"empssl shard SRC --out {self.url})")
            raise DataError(f"missing {self.url}/{name} (listed in {MANIFEST})")
        write_atomic(path, lambda tmp: tmp.write_bytes(data))

    def check_shard(self, split: str, f: ShardFile, hashes: bool) -> None:
        if split not in self._listed:
            self._listed[split] = self.sizes(f"{split}/")
        check_size(f"{self.url}/{split}/{f.name}", self._listed[split].get(f.name), f)

    def sizes(self, under: str) -> dict[str, int]:
        """Size of every object under ``prefix/under``, by its name below it."""
        at, out = f"{self.prefix}/{under}", dict[str, int]()
        with self.errors():
            if self.scheme == "gs":
                return {b.name[len(at):]: int(b.size)
                        for b in self.client.list_blobs(self.bucket, prefix=at, **gs_bounds())}
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=at):
                out.update({o["Key"][len(at):]: int(o["Size"]) for o in page.get("Contents", [])})
        return out

    def upload(self, local: Path, name: str) -> None:
        """``local`` to ``prefix/name``."""
        key = f"{self.prefix}/{name}"
        with self.errors():
            if self.scheme == "gs":
                self.client.bucket(self.bucket).blob(key).upload_from_filename(str(local), **gs_bounds())
            else:
                self.client.upload_file(str(local), self.bucket, key)

    @cached_property
    def client(self) -> Any:
        """boto3's S3 client (s3://) or google-cloud-storage's (gs://), made from the environment when first used."""
        if self.scheme == "s3":
            import boto3

            return boto3.session.Session().client("s3", config=client_config())
        try:
            from google.cloud import storage
        except ImportError:
            raise DataError(f"{self.url}: gs:// is read with google-cloud-storage, as LitData reads it: pip "
                            f"install google-cloud-storage") from None
        with self.errors():
            return storage.Client()

    @contextmanager
    def errors(self) -> Iterator[None]:
        """The store's refusals as one line naming the folder (and the endpoint where it matters)."""
        if self.scheme == "gs":
            with self._gs_errors():
                yield
            return
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            yield
        except NoCredentialsError:
            raise DataError(f"{self.url}: no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                            f"AWS_PROFILE)") from None
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code"))
            why = {"NoSuchBucket": f"bucket {self.bucket} not found at {self.client.meta.endpoint_url}",
                   "InvalidAccessKeyId": "the access key is not known to the store",
                   "SignatureDoesNotMatch": "the secret key does not match the access key",
                   "AccessDenied": "access denied", "403": "access denied"}.get(code, f"{code}: {e}")
            raise DataError(f"{self.url}: {why}") from None
        except BotoCoreError as e:  # no connection, a timeout: after the bounded retries
            raise Unreachable(f"{self.url}: cannot reach {self.client.meta.endpoint_url} after {ATTEMPTS} tries "
                              f"({type(e).__name__}); check AWS_ENDPOINT_URL and the network") from None

    @contextmanager
    def _gs_errors(self) -> Iterator[None]:
        from google.api_core import exceptions as api
        from google.auth.exceptions import DefaultCredentialsError

        try:
            yield
        except DefaultCredentialsError:
            raise DataError(f"{self.url}: no credentials found; set GOOGLE_APPLICATION_CREDENTIALS (or run: gcloud "
                            f"auth application-default login)") from None
        except api.NotFound:  # only where a listing or a bucket is refused: a missing object is answered in fetch
            raise DataError(f"{self.url}: bucket {self.bucket} not found at {self.client.api_endpoint}") from None
        except (api.Forbidden, api.Unauthorized) as e:
            raise DataError(f"{self.url}: access denied ({e.code})") from None
        except api.RetryError:  # no connection, a timeout: after the bounded retries
            raise Unreachable(f"{self.url}: cannot reach {self.client.api_endpoint} within {GS_RETRY_SECONDS} s of "
                              f"tries; check STORAGE_EMULATOR_HOST (if set) and the network") from None


def client_config() -> Any:
    """boto3's bounded timeouts and tries, for empssl's requests and LitData's."""
    from botocore.config import Config

    return Config(connect_timeout=CONNECT_SECONDS, read_timeout=READ_SECONDS,
                  retries={"total_max_attempts": ATTEMPTS, "mode": "standard"})


def gs_bounds() -> dict[str, Any]:
    """google-cloud-storage's arguments for empssl's own requests: each of them bounded as boto3's are."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    return {"timeout": (CONNECT_SECONDS, READ_SECONDS), "retry": DEFAULT_RETRY.with_timeout(GS_RETRY_SECONDS)}


def check_listed(split_url: str, shards: list[ShardFile]) -> None:
    """DataError (one line) unless every shard of ``split_url`` (``s3://BUCKET/PREFIX/SPLIT``) is listed in the
    store at its manifest size (after a failed read)."""
    root, _, split = split_url.rstrip("/").rpartition("/")
    folder = RemoteFolder(root)
    for f in shards:
        folder.check_shard(split, f, hashes=False)


def read_remote(url: str, data_dir: str = "./data") -> Manifest:
    """The manifest of the shard folder at ``url``, checked (the module docstring); DataError (one line) otherwise."""
    folder = RemoteFolder(url, data_dir)
    manifest = verify_shards(folder)
    litdata_http.install()
    return manifest


def litdata_options(manifest: Manifest, split: str) -> dict[str, Any]:
    """``StreamingDataset``'s arguments for ``split`` of a remote folder: boto3's bounded timeouts (s3://), LitData's
    default cache size (``MAX_CACHE_SIZE``, e.g. ``50GB``, overrides it) and a cache folder beside the mirror, keyed
    by the split's shard list so that a folder rewritten or appended to is not read through an older cache."""
    shards = [[f.name, f.bytes, f.sha256] for f in manifest.splits[split].shards]
    cache = manifest.root / ".chunks" / split / hashlib.sha256(repr(shards).encode()).hexdigest()[:16]
    return {"cache_dir": str(cache), "max_cache_size": None,
            "storage_options": {"config": client_config()} if manifest.url.startswith("s3://") else None}


def write_remote(spec: str, url: str, data_dir: str = "./data", **kw: Any) -> Manifest:
    """``empssl shard SRC --out s3://...`` (or gs://): the shards written into a local staging folder under ``data_dir``
    (resumable), then uploaded, manifest.json last, so that a reader (which starts from it) never sees half a
    folder. A prefix holding a manifest is refused; one with the objects of an unfinished upload is written over."""
    folder = RemoteFolder(url, data_dir)
    if MANIFEST in folder.sizes(""):
        raise DataError(f"--out {url} already holds a shard folder ({MANIFEST}); give another prefix")
    stage = folder.root.parent / f".{folder.root.name}.upload"
    local = write_shards(spec, stage, data_dir=data_dir, **kw)
    data = [f"{name}/{f.name}" for name, split in local.splits.items() for f in [*split.shards, split.labels]]
    for key in [*data, *(f"{name}/index.json" for name in local.splits), MANIFEST]:
        folder.upload(stage / key, key)
    shutil.rmtree(stage, ignore_errors=True)
    return verify_shards(RemoteFolder(url, data_dir))
