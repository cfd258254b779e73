"""LitData's chunk reads from an S3-compatible store over plain http, with bounded connects, reads and retries.

litdata 0.2.76 reads chunks through obstore, whose ``S3Store`` it builds in ``downloader._build_obstore_s3_store``
with fixed options: no ``allow_http`` (a plain-http endpoint such as MinIO or moto fails with "HTTP error: builder
error") and obstore's default retries (a silent endpoint holds a read for minutes); no ``StreamingDataset``
argument reaches them. :func:`install` wraps that function to build the store again with ``allow_http`` for an
http:// endpoint and the bounded timeouts and tries below. Installed before the loader forks its workers, it holds
in them too; a spawned worker reads without it (pass ``multiprocessing_context="fork"``).
"""

from __future__ import annotations

import functools
import sys
from typing import Any

TESTED = ("0.2.76",)  # the litdata versions this adapter was tested with (tests/test_remote.py)
# every request to a store, empssl's (boto3, empssl.remote) and LitData's chunk reads: worst case about 3 x 3 s plus
# back-off on a silent endpoint
CONNECT_SECONDS, READ_SECONDS, ATTEMPTS = 3, 30, 3


@functools.cache  # once per process (its forked workers inherit it)
def install() -> None:
    """Wrap LitData's obstore store set-up; one line on stderr where litdata is not a version tested with."""
    import litdata
    from litdata.streaming import downloader, reader

    build = getattr(downloader, "_build_obstore_s3_store", None)
    if hasattr(build, "litdata_build"):  # wrapped already
        return
    if litdata.__version__ not in TESTED or build is None:
        print(f"empssl: litdata {litdata.__version__} is not a version the plain-http adapter was tested with "
              f"({', '.join(TESTED)}); {'it may not hold' if build else 'not installed'}", file=sys.stderr)
        if build is None:
            return

    def bounded(bucket: str, s3_client: Any) -> Any:
        from obstore.store import S3Store

        store = build(bucket, s3_client)
        options: Any = {**store.client_options, "connect_timeout": f"{CONNECT_SECONDS}s",
                        "read_timeout": f"{READ_SECONDS}s",
                        "allow_http": str(s3_client.client.meta.endpoint_url).startswith("http://")}
        config: Any = {k: v for k, v in store.config.items() if k != "bucket"}  # the bucket is given once
        return S3Store(bucket, config=config, client_options=options, retry_config={"max_retries": ATTEMPTS - 1},
                       credential_provider=store.credential_provider)

    bounded.litdata_build = build  # type: ignore[attr-defined]  # LitData's own (the tests read it)
    downloader._build_obstore_s3_store = bounded
    # A failed chunk read is raised by the reader, with its cause, and named in one line by stream.failed_read:
    # the traceback each worker's prefetch thread would print first is left out.
    reader.PrepareChunksThread._report_crash = lambda self, exc: None
