"""gs:// shard folders (empssl.remote) against a GCS emulator on 127.0.0.1: ``empssl shard --out gs://`` writes the
local folder's bytes, train and eval read ``gs://bucket/prefix`` as they read the local copy, and bad input is one
line and exit 2.

The emulator is gcp-storage-emulator (pure Python, in memory, a free port), which google-cloud-storage reaches through
``STORAGE_EMULATOR_HOST`` with anonymous credentials. LitData reads the chunks through obstore (its dependency), as it
does for every user, in the store that empssl.litdata_http builds where the client points. The emulator's XML-API
download (the one obstore asks) leaves out the Last-Modified and ETag headers that Google's sends and obstore
requires; :func:`_xml_reads` adds them. The google credential lookup's metadata-server probe is off: nothing beyond
127.0.0.1 is asked.
"""

import contextlib
import json
from datetime import datetime
from pathlib import Path

import pytest
import torch

from empssl import stream
from empssl.checkpoint import read_checkpoint
from empssl.cli import main

from .conftest import TINY
from .test_remote import _free_port, _loader, _read_failing
from .test_stream import _one_line, image_tree, shards_of

pytest.importorskip("litdata")
emulator = pytest.importorskip("gcp_storage_emulator.server")  # the test extra
storage = pytest.importorskip("google.cloud.storage")

BUCKET = "empssl-test"
PER_CLASS = {"train": 10, "test": 4}


@pytest.fixture(scope="module")
def store(tmp_path_factory, data_dir):
    """(local shard folder, its source tree, data dir): the emulator running, the shards not yet in it."""
    port = _free_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        _xml_reads(mp)
        mp.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
        mp.setenv("NO_GCE_CHECK", "True")
        mp.setenv("CLOUDSDK_CONFIG", str(tmp_path_factory.mktemp("gcloud")))  # no gcloud credentials
        mp.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
        src = image_tree(tmp_path_factory.mktemp("src"), data_dir, PER_CLASS)
        local = shards_of(src, tmp_path_factory.mktemp("shards") / "shards", shard_size=30)
        try:
            yield local, src, tmp_path_factory.mktemp("dd")
        finally:
            server.stop()


XML_READS: list[str] = []  # the objects read through the emulator's XML API (obstore's requests), in any process


def _xml_reads(mp: pytest.MonkeyPatch) -> None:
    """The emulator's XML-API download as obstore asks it and Google answers it: the bucket's name percent-encoded
    in the path, and the Last-Modified and ETag headers in the answer; each object read is recorded in XML_READS (the
    emulator runs in this process: every reader's request lands here)."""
    from email.utils import format_datetime

    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    def download(request, response, storage, *args, **kwargs):
        objects.download(request, response, storage, *args, **kwargs)
        bucket, name = request.params["bucket_name"], request.params["object_id"]
        with contextlib.suppress(NotFound):  # (the emulator's own 404 stands)
            obj = storage.get_file_obj(bucket, name)
            response["Last-Modified"] = format_datetime(datetime.fromisoformat(obj["updated"]), usegmt=True)
            response["ETag"] = f'"{obj["etag"]}"'
            XML_READS.append(name)

    xml = "^/(?P<bucket_name>[-.\\w]+)/"
    assert sum(pattern.startswith(xml) for pattern, _ in emulator.HANDLERS) == 1, "the emulator's XML route changed"
    mp.setattr(emulator, "HANDLERS", tuple(  # obstore percent-encodes the bucket's name too ("empssl%2Dtest")
        (pattern.replace("[-.\\w]+", "[-.\\w%]+", 1), {**methods, "GET": download}) if pattern.startswith(xml)
        else (pattern, methods) for pattern, methods in emulator.HANDLERS))


def upload(folder: Path, prefix: str, change=lambda name, data: data) -> str:
    """Every file of ``folder`` to gs://BUCKET/prefix/ (``change(name, bytes)`` may edit one, None leaves it out)."""
    bucket = storage.Client().bucket(BUCKET)
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and (data := change(name, path.read_bytes())) is not None:
            bucket.blob(f"{prefix}/{name}").upload_from_string(data)
    return f"gs://{BUCKET}/{prefix}"


def _train(tmp_path, data, data_dir, out="out"):
    return main(["train", "--data", str(data), "--data-mode", "stream", "--image-size", "32", "--out",
                 str(tmp_path / out), "--data-dir", str(data_dir), "--no-progress", "--epochs", "1",
                 "--monitor-bank", "20", *TINY])


def test_shard_into_the_bucket_then_train_and_eval_from_it_as_from_the_local_copy(store, tmp_path, capsys):
    local, src, dd = store
    url = f"gs://{BUCKET}/demo"
    argv = ["shard", str(src), "--out", url, "--shard-size", "30", "--workers", "1", "--no-progress",
            "--data-dir", str(dd)]
    assert main(argv) == 0, capsys.readouterr().err
    assert f"manifest {url}/manifest.json" in capsys.readouterr().out
    blobs = {b.name[len("demo/"):]: b for b in storage.Client().list_blobs(BUCKET, prefix="demo/")}
    assert blobs.keys() == {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    for name, blob in blobs.items():  # the local folder's bytes
        assert blob.download_as_bytes() == (local / name).read_bytes(), name
    assert main(argv) == 2
    _one_line(capsys, f"--out {url} already holds a shard folder")

    runs = {}
    XML_READS.clear()
    for name, data in (("local", local), ("gs", url)):
        assert _train(tmp_path, data, dd, name) == 0, capsys.readouterr().err
        runs[name] = read_checkpoint(tmp_path / name), json.loads((tmp_path / name / "results.json").read_text())
    (ckpt, results), (ref_ckpt, ref_results) = runs["gs"], runs["local"]
    assert ckpt["step"] == ref_ckpt["step"] == 5
    for key, value in ref_ckpt["model"].items():
        assert torch.equal(value, ckpt["model"][key]), key
    for key in ("linear_top1", "knn_top1", "n_train", "n_test"):
        assert results[key] == ref_results[key], key
    assert results["eval_sets"]["train"]["source"] == url
    assert ckpt["data"] == ref_ckpt["data"]  # what a resumed run checks its data against
    assert {n.rpartition("/")[2] for n in XML_READS} >= {p.name for p in local.rglob("chunk-*.bin")}  # by obstore


def test_a_missing_bucket_folder_or_endpoint_and_no_credentials_are_one_line(store, tmp_path, capsys, monkeypatch):
    _, _, dd = store
    assert _train(tmp_path, "gs://no-such-bucket/demo", dd) == 2
    _one_line(capsys, "gs://no-such-bucket/demo: bucket no-such-bucket not found at http://127.0.0.1:")
    assert _train(tmp_path, f"gs://{BUCKET}/nothing", dd) == 2
    _one_line(capsys, f"no manifest.json in gs://{BUCKET}/nothing: not a folder of empssl shards")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    assert _train(tmp_path, f"gs://{BUCKET}/demo", dd) == 2
    _one_line(capsys, f"gs://{BUCKET}/demo: cannot reach http://127.0.0.1:", "within 9 s of tries")
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")  # Google's own endpoint, without credentials: refused before asking
    assert _train(tmp_path, f"gs://{BUCKET}/demo", dd) == 2
    _one_line(capsys, f"gs://{BUCKET}/demo: no credentials found; set GOOGLE_APPLICATION_CREDENTIALS")
    assert not (tmp_path / "out").exists()


def test_a_missing_index_or_a_shard_of_another_size_in_the_bucket_is_one_line(store, tmp_path, capsys):
    local, _, dd = store
    upload(local, "noindex", lambda name, data: None if name == "test/index.json" else data)
    upload(local, "cut", lambda name, data: data[:-1] if name == "train/chunk-0-1.bin" else data)
    assert _train(tmp_path, f"gs://{BUCKET}/noindex", dd) == 2
    _one_line(capsys, f"missing gs://{BUCKET}/noindex/test/index.json (listed in manifest.json)")
    assert _train(tmp_path, f"gs://{BUCKET}/cut", dd) == 2
    _one_line(capsys, f"shard gs://{BUCKET}/cut/train/chunk-0-1.bin is ", "manifest.json says")


def test_a_shard_that_vanishes_from_the_bucket_while_read_is_named_in_one_line(store, tmp_path):
    url = upload(store[0], "vanish")
    items = stream.shard_items(stream.read_manifest(url, str(tmp_path)), "train")
    gone = sorted(p.name for p in (store[0] / "train").glob("chunk-*.bin"))[1]
    storage.Client().bucket(BUCKET).blob(f"vanish/train/{gone}").delete()
    err = str(stream.read_error(items, [40], "cannot read image 40:\nhung download"))
    assert err.startswith(f"missing shard {url}/train/{gone} (listed in manifest.json); it changed after this "
                          f"command checked it") and "\n" not in err


def test_an_endpoint_gone_while_iterating_is_one_line_after_bounded_tries(store, tmp_path, monkeypatch):
    port = _free_port()  # a second emulator, with its own objects, stopped once the loader is open
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
        url = upload(store[0], "gone")
        loader, items = _loader(url, tmp_path, workers=1)  # manifest and index.json read; no chunk yet
    finally:
        server.stop()
    failed = _read_failing(loader, items)
    err = str(failed)
    assert err.startswith(f"{url}: cannot reach http://127.0.0.1:{port} within 9 s of tries") and "\n" not in err, err
    assert "max_retries: 2," in str(failed.__cause__)  # the worker's obstore reads tried 3 times
