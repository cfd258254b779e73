"""Shard folders in an object store (empssl.remote): train, eval and embed read ``s3://bucket/prefix`` as they read
the local copy, ``empssl shard --out s3://`` writes one, and bad input is one line and exit 2.

The store is moto's S3 server on 127.0.0.1 (a free port), started by the module's fixture and stopped at its end;
the credentials are fake and instance metadata is off, so nothing beyond 127.0.0.1 is asked.
"""

import json
import socket
import threading
from pathlib import Path

import pytest
import torch

import empssl
from empssl import remote, stream
from empssl.checkpoint import read_checkpoint
from empssl.cli import main
from empssl.data import DataError
from empssl.embed import embed, load_embedding
from empssl.files import OutputError
from empssl.shard import reader_serializers

from .conftest import TINY
from .test_embed import make_checkpoint
from .test_stream import _one_line, image_tree, shards_of

pytest.importorskip("litdata")
pytest.importorskip("moto.server")  # the test extra: moto[server]
boto3 = pytest.importorskip("boto3")

BUCKET = "empssl-test"
PER_CLASS = {"train": 10, "test": 4}  # 100 + 40 demo images, 32x32 JPEGs


def _moto_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    return server, "http://{}:{}".format(*server.get_host_and_port())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def store(tmp_path_factory, data_dir):
    """(endpoint, local shard folder, its source tree): the shards uploaded to s3://BUCKET/demo."""
    server, endpoint = _moto_server()
    with pytest.MonkeyPatch.context() as mp:
        missing = str(tmp_path_factory.mktemp("aws") / "none")
        for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": missing,
                           "AWS_SHARED_CREDENTIALS_FILE": missing}.items():
            mp.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
            mp.delenv(key, raising=False)
        src = image_tree(tmp_path_factory.mktemp("src"), data_dir, PER_CLASS)
        local = shards_of(src, tmp_path_factory.mktemp("shards") / "shards", shard_size=30)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        upload(local, "demo")
        try:
            yield endpoint, local, src
        finally:
            server.stop()


def upload(folder: Path, prefix: str, change=lambda name, data: data) -> str:
    """Every file of ``folder`` to s3://BUCKET/prefix/ (``change(name, bytes)`` may edit one); the URL."""
    s3 = boto3.client("s3")
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            name = path.relative_to(folder).as_posix()
            s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{name}", Body=change(name, path.read_bytes()))
    return f"s3://{BUCKET}/{prefix}"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("run"), image_size=32)


# --- read as the local copy is read -----------------------------------------------------------------------


def test_training_from_the_bucket_gives_the_weights_of_the_local_copy(store, tmp_path, capsys):
    _, local, _ = store
    runs = {}
    for name, data, mode in (("local", local, "stream"), ("s3", f"s3://{BUCKET}/demo", "stream"),
                             ("local-memory", local, "memory"), ("s3-memory", f"s3://{BUCKET}/demo", "memory")):
        out = tmp_path / name
        assert main(["train", "--data", str(data), "--data-mode", mode, "--image-size", "32", "--out", str(out),
                     "--data-dir", str(tmp_path / "dd"), "--no-progress", "--epochs", "1", "--monitor-bank", "20",
                     *TINY]) == 0, capsys.readouterr().err
        runs[name] = read_checkpoint(out), json.loads((out / "results.json").read_text())
    for name, ref in (("s3", "local"), ("s3-memory", "local-memory")):  # (the tiers train in other orders)
        (ckpt, results), (ref_ckpt, ref_results) = runs[name], runs[ref]
        assert ckpt["step"] == ref_ckpt["step"] == 5
        for key, value in ref_ckpt["model"].items():
            assert torch.equal(value, ckpt["model"][key]), (name, key)
        for key in ("linear_top1", "knn_top1", "n_train"):
            assert results[key] == ref_results[key], (name, key)
    assert runs["s3"][1]["eval_sets"]["train"]["source"] == f"s3://{BUCKET}/demo"
    # what a resumed run checks its data against: the same shard list as the local copy's
    assert runs["s3"][0]["data"] == runs["local"][0]["data"]
    assert (tmp_path / "dd" / "remote" / "s3" / BUCKET / "demo" / "manifest.json").is_file()  # the mirror


def test_eval_and_embed_from_the_bucket_equal_the_local_copy(store, run, tmp_path, capsys):
    _, local, _ = store
    results = {}
    for name, data in (("local", local), ("s3", f"s3://{BUCKET}/demo")):
        out = tmp_path / f"{name}.json"
        assert main(["eval", "--checkpoint", str(run), "--data", str(data), "--data-dir", str(tmp_path / "dd"),
                     "--data-mode", "stream", "--image-size", "32", "--probe-epochs", "3", "--out", str(out),
                     "--no-progress"]) == 0, capsys.readouterr().err
        results[name] = json.loads(out.read_text())
    for key in ("linear_top1", "knn_top1", "n_train", "n_test"):
        assert results["s3"][key] == results["local"][key], key
    kw = dict(image_size=32, data_dir=str(tmp_path / "dd"), data_mode="stream", progress=False)
    want = load_embedding(embed(run, str(local), tmp_path / "local.npz", **kw)["out"])
    got = load_embedding(embed(run, f"s3://{BUCKET}/demo", tmp_path / "s3.npz", **kw)["out"])
    assert torch.equal(got.features, want.features) and got.names == want.names and len(got.names) == 140
    assert torch.equal(got.labels, want.labels)


def test_shard_into_the_bucket_writes_the_local_folder_s_bytes(store, tmp_path, capsys, monkeypatch):
    _, local, src = store
    monkeypatch.chdir(tmp_path)
    url = f"s3://{BUCKET}/written"
    argv = ["shard", str(src), "--out", url, "--shard-size", "30", "--workers", "1", "--no-progress",
            "--data-dir", str(tmp_path / "dd")]
    assert main(argv) == 0, capsys.readouterr().err
    assert f"manifest {url}/manifest.json" in capsys.readouterr().out
    s3 = boto3.client("s3")
    listed = {o["Key"][len("written/"):] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="written/")["Contents"]}
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert listed == files
    for name in files:  # the same bytes as the local folder that trains above
        assert s3.get_object(Bucket=BUCKET, Key=f"written/{name}")["Body"].read() == (local / name).read_bytes()
    assert not (tmp_path / "s3:").exists()
    assert [p.name for p in (tmp_path / "dd" / "remote" / "s3" / BUCKET).iterdir()] == ["written"]  # the mirror;
    # the staging folder (.written.upload) is gone
    assert main(argv) == 2
    _one_line(capsys, f"--out {url} already holds a shard folder")


# --- bad input: one line, exit 2 --------------------------------------------------------------------------


def _train(tmp_path, data):
    return main(["train", "--data", data, "--data-mode", "stream", "--image-size", "32", "--out",
                 str(tmp_path / "out"), "--data-dir", str(tmp_path / "dd"), "--no-progress", *TINY])


def test_missing_credentials_bucket_and_folder_are_one_line(store, run, tmp_path, capsys, monkeypatch):
    assert _train(tmp_path, "s3://no-such-bucket/demo") == 2
    _one_line(capsys, "s3://no-such-bucket/demo: bucket no-such-bucket not found at http://127.0.0.1:")
    for command in ("train", "embed"):
        argv = (["embed", "--checkpoint", str(run), "--data", f"s3://{BUCKET}/nothing", "--out",
                 str(tmp_path / "e.npz")] if command == "embed" else None)
        assert (main(argv) if argv else _train(tmp_path, f"s3://{BUCKET}/nothing")) == 2
        _one_line(capsys, f"no manifest.json in s3://{BUCKET}/nothing: not a folder of empssl shards")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert _train(tmp_path, f"s3://{BUCKET}/demo") == 2
    _one_line(capsys, f"s3://{BUCKET}/demo: no credentials found")
    assert not (tmp_path / "out").exists()


def test_a_folder_without_an_index_or_image_items_is_one_line(store, tmp_path, capsys):
    _, local, _ = store
    url = upload(local, "noindex")
    boto3.client("s3").delete_object(Bucket=BUCKET, Key="noindex/test/index.json")
    assert _train(tmp_path, url) == 2
    _one_line(capsys, f"missing {url}/test/index.json (listed in manifest.json)")

    def renamed(name, data):  # items of {"picture", "label", "name"}: a LitData folder of someone else's keys
        return data.replace(b'\\\\\\"image\\\\\\"', b'\\\\\\"picture\\\\\\"') if name.endswith("index.json") else data

    url = upload(local, "noimage", renamed)
    assert b"picture" in boto3.client("s3").get_object(Bucket=BUCKET, Key="noimage/train/index.json")["Body"].read()
    assert _train(tmp_path, url) == 2
    _one_line(capsys, f"{url}/train/index.json: its items hold ['picture', 'label', 'name'], not image, label, name")


def test_a_shard_of_another_size_in_the_bucket_is_one_line(store, tmp_path, capsys):
    _, local, _ = store
    url = upload(local, "cut", lambda name, data: data[:-1] if name == "train/chunk-0-1.bin" else data)
    assert _train(tmp_path, url) == 2
    _one_line(capsys, f"shard {url}/train/chunk-0-1.bin is ", "manifest.json says")


def test_an_unreachable_endpoint_is_one_line_after_a_bounded_retry(store, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    assert _train(tmp_path, f"s3://{BUCKET}/demo") == 2
    _one_line(capsys, f"s3://{BUCKET}/demo: cannot reach http://127.0.0.1:", "after 3 tries")


@pytest.mark.parametrize("argv", [  # data and checkpoints that are not there: refused before they are looked for
    ["train", "--data", "nothing-here", "--out", "s3://empssl-test/run"],
    ["embed", "--checkpoint", "nothing-here", "--data", "nothing-here", "--out", "gs://bucket/e.npz"],
    ["export", "--checkpoint", "nothing-here", "--out", "s3://empssl-test/backbone.pt"],
    ["shard", "nothing-here", "--out", "s3://empssl-test/demo", "--append"],
])
def test_outputs_in_an_object_store_are_refused(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    _one_line(capsys, argv[argv.index("--out") + 1])
    assert not any(tmp_path.iterdir())  # no local folder named s3: or gs:


def test_train_from_python_refuses_a_run_directory_in_an_object_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="s3://empssl-test/run: this output is written on a local disk"):
        empssl.train(empssl.Config(), "s3://empssl-test/run")
    assert not any(tmp_path.iterdir())


def test_a_shard_that_vanishes_from_the_bucket_while_read_is_named_in_one_line(store, tmp_path):
    url = upload(store[1], "vanish")
    manifest = stream.read_manifest(url, str(tmp_path))
    items = stream.shard_items(manifest, "train")
    assert items.culprit([0]) is None  # all there: the library's own words, on one line
    assert str(stream.read_error(items, [0], "cannot read image 0:\nTimeout")) == "cannot read image 0: Timeout"
    gone = manifest.splits["train"].shards[1].name
    boto3.client("s3").delete_object(Bucket=BUCKET, Key=f"vanish/train/{gone}")
    err = str(stream.read_error(items, [40], "cannot read image 40:\nhung download"))
    assert err.startswith(f"missing shard {url}/train/{gone} (listed in manifest.json); it changed after this "
                          f"command checked it") and "\n" not in err


def test_a_remote_folder_s_record_is_checked_on_resume(store, tmp_path):
    url = f"s3://{BUCKET}/demo"
    record = stream.data_record(100, url, str(tmp_path))
    changed = {**record, "shards": record["shards"][:-1]}
    with pytest.raises(stream.DataError, match=f"{url}/train now lists 4 shards"):
        stream.check_data(changed, record, url, tmp_path / "checkpoint.pt", print)


# --- iterated by LitData's loader over plain http (empssl.litdata_http) ------------------------------------


def _loader(url: str, data_dir: Path, workers: int = 2):
    """(LitData's shuffled loader over the train split of ``url`` in forked workers, as empssl opens it; its shard
    list). Fork is named: a litdata.optimize earlier in the process sets spawn, whose workers would not have the
    adapter. (A loader whose read failed takes 5 s a worker to shut down: torch's join timeout.)"""
    from litdata import StreamingDataLoader, StreamingDataset

    manifest = stream.read_manifest(url, str(data_dir))  # also installs the adapter (read_remote)
    ds = StreamingDataset(manifest.split_source("train"), shuffle=True, seed=7, serializers=reader_serializers(),
                          **remote.litdata_options(manifest, "train"))
    return StreamingDataLoader(ds, batch_size=10, num_workers=workers, multiprocessing_context="fork",
                               collate_fn=_names), stream.shard_items(manifest, "train")


def _read(loader, items) -> list:
    """Every batch of ``loader``; a failed read as the streamed tier says it (one line)."""
    try:
        return list(loader)
    except Exception as e:
        raise stream.failed_read(items, e) from e


def _names(items: list[dict]) -> list[str]:
    return [str(d["name"]) for d in items]


def test_litdata_s_loader_reads_every_item_over_http_and_resumes(store, tmp_path):
    _, local, _ = store
    loader, _ = _loader(f"s3://{BUCKET}/demo", tmp_path)
    epoch = list(loader)
    want = json.loads((local / "manifest.json").read_text())["splits"]["train"]["images"]
    assert sorted(n for b in epoch for n in b) == sorted({n for b in epoch for n in b}) and len(epoch) * 10 == want
    loader, _ = _loader(f"s3://{BUCKET}/demo", tmp_path)
    head = []
    for batch in loader:
        head.append(batch)
        if len(head) == 3:
            break
    state = loader.state_dict()
    resumed, _ = _loader(f"s3://{BUCKET}/demo", tmp_path)
    resumed.load_state_dict(state)
    assert head + list(resumed) == epoch


def test_without_the_adapter_litdata_cannot_read_chunks_over_http(store, tmp_path, monkeypatch):
    # When this fails, LitData reads plain http itself: empssl.litdata_http can go.
    from litdata.streaming import downloader

    loader, items = _loader(f"s3://{BUCKET}/demo", tmp_path, workers=1)
    monkeypatch.setattr(downloader, "_build_obstore_s3_store", downloader._build_obstore_s3_store.litdata_build)
    with pytest.raises(DataError, match="HTTP error: builder error") as e:
        _read(loader, items)
    assert "\n" not in str(e.value)


def test_an_endpoint_gone_while_iterating_is_one_line_after_bounded_tries(store, tmp_path, monkeypatch):
    server, endpoint = _moto_server()  # moto's buckets are the process's: the same bucket, at another endpoint
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    url = f"s3://{BUCKET}/demo"
    loader, items = _loader(url, tmp_path, workers=1)  # index.json read; no chunk yet
    server.stop()
    failed = _read_failing(loader, items)
    err = str(failed)
    assert err.startswith(f"{url}: cannot reach {endpoint} after 3 tries") and "\n" not in err, err
    assert "max_retries: 2," in str(failed.__cause__)  # the workers' obstore reads tried 3 times too


def _read_failing(loader, items) -> BaseException:
    """What :func:`_read` raised, read in a thread under a ceiling (unbounded, obstore retries for up to 180 s)."""
    failed: list[BaseException] = []

    def iterate():
        try:
            _read(loader, items)
        except BaseException as e:
            failed.append(e)

    reader = threading.Thread(target=iterate, daemon=True)
    reader.start()
    reader.join(timeout=150)  # a ceiling, not a timing
    assert failed, "still reading"
    return failed[0]


def test_another_litdata_version_is_named_in_one_line(monkeypatch, capsys):
    import litdata
    from litdata.streaming import downloader

    from empssl import litdata_http

    monkeypatch.setattr(litdata, "__version__", "9.9.9")
    monkeypatch.delattr(downloader, "_build_obstore_s3_store")  # a LitData that builds its store elsewhere
    litdata_http.install.cache_clear()
    try:
        litdata_http.install()
    finally:
        litdata_http.install.cache_clear()
    _one_line(capsys, "empssl: litdata 9.9.9 is not a version the object-store adapter was tested with (0.2.76)",
              "not installed")
