"""LitData's chunk reads through obstore, for s3:// over plain http and for gs:// where its client points, with bounded
connects, reads and retries.

litdata 0.2.76 reads chunks through obstore (a dependency of LitData), whose stores it builds with fixed options and
obstore's default retries (a silent endpoint holds a read for minutes); no ``StreamingDataset`` argument reaches them.
:func:`install` wraps the two places that build them:

- s3:// (``downloader._build_obstore_s3_store``): no ``allow_http``, so a plain-http endpoint such as MinIO or moto
  fails with "HTTP error: builder error". The same store is built again, with ``allow_http`` for an http:// endpoint.
- gs:// (``GCPDownloader._get_store``): a store for Google's endpoint signed with the google-cloud-storage client's
  credentials, although that client may point elsewhere (``STORAGE_EMULATOR_HOST``, ``API_ENDPOINT_OVERRIDE``) with
  anonymous credentials, which cannot sign. The store is built for ``client.api_endpoint``, unsigned where the
  client's credentials are anonymous, else signed with them as LitData does.

Both get the bounded timeouts and tries below. Installed before the loader forks its workers, the wrappers hold in
them too; a spawned worker reads without them (pass ``multiprocessing_context="fork"``).
"""

from __future__ import annotations

import functools
import sys
from typing import Any

TESTED = ("0.2.76",)  # the litdata versions this adapter was tested with (tests/test_remote.py)
# every request to a store, empssl's (boto3, empssl.remote) and LitData's chunk reads: worst case about 3 x 3 s plus
# back-off on a silent endpoint
CONNECT_SECONDS, READ_SECONDS, ATTEMPTS = 3, 30, 3
RETRY: Any = {"max_retries": ATTEMPTS - 1}  # obstore's retry_config: ATTEMPTS tries in all


@functools.cache  # once per process (its forked workers inherit it)
def install() -> None:
    """Wrap LitData's obstore store set-up (the module docstring); one line on stderr where litdata is not a version
    tested with."""
    import litdata
    from litdata.streaming import downloader, reader

    build = getattr(downloader, "_build_obstore_s3_store", None)
    if hasattr(build, "litdata_build"):  # wrapped already
        return
    found = build is not None and all(hasattr(o, name) for o, name in [
        (downloader.GCPDownloader, "_get_store"), (downloader, "_cached_obstore_store")])
    if litdata.__version__ not in TESTED or not found:
        print(f"empssl: litdata {litdata.__version__} is not a version the object-store adapter was tested with "
              f"({', '.join(TESTED)}); {'it may not hold' if found else 'not installed'}", file=sys.stderr)
    if build is None or not found:
        return

    def bounded(bucket: str, s3_client: Any) -> Any:
        from obstore.store import S3Store

        store = build(bucket, s3_client)
        options: Any = {**store.client_options, **bounds(str(s3_client.client.meta.endpoint_url))}
        config: Any = {k: v for k, v in store.config.items() if k != "bucket"}  # the bucket is given once
        return S3Store(bucket, config=config, client_options=options, retry_config=RETRY,
                       credential_provider=store.credential_provider)

    def gcs_store(self: Any, bucket: str) -> Any:
        def build_gcs() -> Any:
            from google.auth.credentials import AnonymousCredentials
            from obstore.auth.google import GoogleCredentialProvider
            from obstore.store import GCSStore

            client = self._get_client()
            endpoint, anonymous = str(client.api_endpoint), isinstance(client._credentials, AnonymousCredentials)
            options: Any = bounds(endpoint)
            return GCSStore(bucket, config={"base_url": endpoint, "skip_signature": anonymous},
                            client_options=options, retry_config=RETRY,
                            credential_provider=None if anonymous else
                            GoogleCredentialProvider(credentials=client._credentials))

        return downloader._cached_obstore_store(self, build_gcs)

    bounded.litdata_build = build  # type: ignore[attr-defined]  # LitData's own (the tests read it)
    downloader._build_obstore_s3_store = bounded
    downloader.GCPDownloader._get_store = gcs_store
    # A failed chunk read is raised by the reader, with its cause, and named in one line by stream.failed_read:
    # the traceback each worker's prefetch thread would print first is left out.
    reader.PrepareChunksThread._report_crash = lambda self, exc: None


def bounds(endpoint: str) -> dict[str, Any]:
    """obstore's client options for a store at ``endpoint``: the bounded connect and read, plain http where it is
    http://."""
    return {"connect_timeout": f"{CONNECT_SECONDS}s", "read_timeout": f"{READ_SECONDS}s",
            "allow_http": endpoint.startswith("http://")}
