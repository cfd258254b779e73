"""A user's own batches in ``empssl.train(cfg, out, data=...)``: any iterable of uint8 batches, or a DataLoader, on
the same loop as the in-memory tier; exact resume where the source has ``state_dict()``, a one-line refusal where it
has none or a batch is not what the loop trains on."""

import os
import signal

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import empssl.rundir
from empssl.batches import epoch_permutation
from empssl.checkpoint import read_checkpoint
from empssl.config import Config, ConfigError
from empssl.data import ImageData
from empssl.train import train

B = 8


def cfg(**kw) -> Config:
    base = dict(width=4, hidden_dim=32, z_dim=16, patch_size=8, num_patches=4, batch_size=B, device="cpu",
                log_every=2, checkpoint_every=100)
    return Config(**{**base, **kw})


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def run(config: Config, out, data) -> dict:
    return train(config, out, progress=False, log=lambda s: None, data=data, evaluate_at_end=False)


def weights(out) -> dict[str, torch.Tensor]:
    return read_checkpoint(out)["model"]


def assert_equal_weights(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


class Stateful:
    """A user's own resumable source: a fixed list of batches, its position in ``state_dict()``."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches, self.at = batches, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        while self.at < len(self.batches):
            self.at += 1
            yield self.batches[self.at - 1], torch.zeros(B)  # (images, labels): the labels are left alone
        self.at = 0

    def state_dict(self) -> dict:
        return {"at": self.at}

    def load_state_dict(self, state: dict) -> None:
        self.at = state["at"]


def interrupted_at(step: int, monkeypatch) -> None:
    """Ctrl-C right after ``step`` (the loop's StopFlag saves a checkpoint there and raises KeyboardInterrupt)."""
    real = empssl.rundir.MetricsLog.add

    def add(self, values, applied, at):
        real(self, values, applied, at)
        if at == step:
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(empssl.rundir.MetricsLog, "add", add)


def test_a_list_of_batches_trains_one_pass_per_epoch(tmp_path):
    done = run(cfg(epochs=2), tmp_path / "run", list(images(3 * B).split(B)))
    ckpt = read_checkpoint(tmp_path / "run")
    assert done["steps"] == ckpt["step"] == 6 and ckpt["finished"] and done["images"] == 3 * B


def test_a_dataloader_trains_as_the_in_memory_tier_on_the_same_batches(tmp_path):
    x, config = images(5 * B), cfg(epochs=1)
    labels = torch.arange(5 * B) % 2
    steps = epoch_permutation(5 * B, config.seed, 0).view(5, B).tolist()  # the in-memory tier's first epoch
    loader = DataLoader(TensorDataset(x, labels), batch_sampler=steps)
    run(config, tmp_path / "loader", loader)
    run(config, tmp_path / "memory", (ImageData(x, labels, ["a", "b"]), ImageData(x[:B], labels[:B], ["a", "b"])))
    assert_equal_weights(tmp_path / "loader", tmp_path / "memory")
    assert read_checkpoint(tmp_path / "loader")["step"] == 5


@pytest.mark.parametrize("stop", [3, 4])  # mid-epoch, and at an epoch's end (the source is left at its end)
def test_a_source_with_state_dict_resumes_exactly(stop, tmp_path, monkeypatch):
    batches, config = list(images(4 * B).split(B)), cfg(epochs=2)
    run(config, tmp_path / "ref", Stateful(batches))
    interrupted_at(stop, monkeypatch)
    with pytest.raises(KeyboardInterrupt, match=f"interrupted at step {stop}"):
        run(config, tmp_path / "cut", Stateful(batches))
    monkeypatch.undo()
    assert read_checkpoint(tmp_path / "cut")["step"] == stop
    run(config, tmp_path / "cut", Stateful(batches))  # a new object: its position comes from the checkpoint
    assert_equal_weights(tmp_path / "ref", tmp_path / "cut")


def test_a_source_without_state_dict_is_not_resumed(tmp_path, monkeypatch):
    batches, config = list(images(4 * B).split(B)), cfg(epochs=2)
    interrupted_at(3, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run(config, tmp_path / "cut", batches)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"^cannot resume .*data= \(list\) has no state_dict\(\) / "
                                          r"load_state_dict\(\); give a source that has them[^\n]*$"):
        run(config, tmp_path / "cut", batches)
    assert read_checkpoint(tmp_path / "cut")["step"] == 3  # nothing trained


def _bad(x: torch.Tensor) -> list:
    return [images(B), x]  # a good first batch, then this one


@pytest.mark.parametrize(("data", "message"), [
    (_bad(images(B).float()), r"a batch of torch.float32 \(8, 3, 16, 16\); expected uint8 images \(8, 3, 16, 16\)"),
    (_bad(images(B - 1)), r"a batch of torch.uint8 \(7, 3, 16, 16\); expected uint8 images \(8, 3, 16, 16\)"),
    (_bad(images(B)[:, :, :8]), r"\(8, 3, 8, 16\); expected uint8 images \(8, 3, 16, 16\) \(0-255, not normal"),
    ([images(B)[:, :1]], r"a batch of torch.uint8 \(8, 1, 16, 16\); expected uint8 images \(8, 3, H, W\)"),
    ([[1, 2]], r"a batch of int; expected uint8 images \(8, 3, H, W\)"),
    ((b for b in [images(B)]), r"data= \(generator\) has no len\(\): the number of steps of an epoch sets"),
    ([], r"data= \(list\) holds no batch"),
    (DataLoader(TensorDataset(images(2 * B)), batch_size=4), r"gives batches of 4 images; every step trains on "
                                                              r"batch_size=8: make them agree$"),
    (DataLoader(TensorDataset(images(2 * B + 1)), batch_size=B), r"batches of 8 images, the last one short; .* "
                                                                  r"make them agree and pass drop_last=True$"),
])
def test_a_batch_that_is_not_what_the_loop_trains_on_is_one_line(data, message, tmp_path):
    with pytest.raises(ConfigError, match=message) as error:
        run(cfg(), tmp_path / "run", data)
    assert "\n" not in str(error.value)


def test_images_of_another_size_than_the_image_size_setting_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"expected uint8 images \(8, 3, 32, 32\)"):
        run(cfg(image_size=32), tmp_path / "run", [images(B)])
