"""The GPU fast paths fall back to their plain twins when they raise: the CUDA-graphed probe, the compiled step and
the second stream of feature extraction. The failures are injected at the same decision points, on the CPU; the
result must equal the plain path's, with one note in the log and in the results."""

import importlib
import json

import pytest
import torch
from torch import nn

from empssl import probe as probe_module
from empssl.config import Config
from empssl.fallbacks import collecting
from empssl.models import EMPSSLModel
from empssl.patches import Augment
from empssl.train import train

evaluate_module = importlib.import_module("empssl.evaluate")


def _probe_data():
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(120, 6, generator=g), torch.randn(40, 6, generator=g)
    y, yt = (x[:, 0] > 0).long() + (x[:, 1] > 0).long(), (xt[:, 0] > 0).long() + (xt[:, 1] > 0).long()
    return x, y, xt, yt


@pytest.mark.parametrize("epochs_run_before_failing", [0, 1])
def test_graphed_probe_that_fails_runs_the_eager_probe(monkeypatch, epochs_run_before_failing):
    x, y, xt, yt = _probe_data()
    kw = dict(epochs=3, val_fraction=0.2, lrs=[0.01, 0.1], seed=1)
    eager = probe_module.linear_probe(x, y, xt, yt, 3, backend="eager", **kw)

    def failing(trainer, epochs, progress):
        for _ in range(epochs_run_before_failing):  # a replay that fails part-way: the state has moved on
            trainer.epoch()
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(probe_module, "_resolve_backend", lambda backend, device: "cuda-graph")
    monkeypatch.setattr(probe_module, "_graphed_epochs", failing)
    lines = []
    with collecting(lines.append) as notes:
        fell = probe_module.linear_probe(x, y, xt, yt, 3, **kw)
    assert fell.backend == "eager"
    assert torch.equal(fell.weight, eager.weight) and torch.equal(fell.bias, eager.bias)
    assert (fell.top1, fell.lr, fell.epoch, fell.sweep) == (eager.top1, eager.lr, eager.epoch, eager.sweep)
    assert notes == [{"path": "CUDA-graphed linear probe", "fallback": "the eager probe",
                      "why": "RuntimeError: CUDA error: operation not permitted when stream is capturing"}]
    assert len(lines) == 1 and "falling back to the eager probe" in lines[0]


@pytest.mark.parametrize("groups_before_failing", [0, 1, 2])
def test_second_stream_that_fails_extracts_the_same_features(monkeypatch, groups_before_failing):
    torch.manual_seed(0)
    model = EMPSSLModel(width=2, hidden_dim=8, z_dim=4)
    images = torch.randint(0, 256, (100, 3, 16, 16), dtype=torch.uint8)
    aug = Augment(size=8)
    # batch_images 32 -> groups of 32 images: four groups for 100
    plain = evaluate_module.extract_features(model, images, aug, 3, batch_images=32)

    def failing(starts, make, device):
        for start in starts[:groups_before_failing]:
            yield start, make(start)
        raise RuntimeError("CUDA error: invalid resource handle")

    monkeypatch.setattr(evaluate_module, "_overlap", lambda device: True)
    monkeypatch.setattr(evaluate_module, "_overlapped", failing)
    with collecting(lambda line: None) as notes:
        fell = evaluate_module.extract_features(model, images, aug, 3, batch_images=32)
    assert torch.equal(fell, plain)
    assert [n["path"] for n in notes] == ["overlapped feature extraction (a second CUDA stream)"]
    assert notes[0]["why"] == "RuntimeError: CUDA error: invalid resource handle"


class _FailsToCompile(nn.Module):
    """What torch.compile returns when its compiler cannot run: the failure comes at the first call."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, *args, **kwargs):
        raise RuntimeError("InductorError: CppCompileError: C++ compile error")


def _tiny(data_dir, **kw):
    return Config(data="demo", data_dir=str(data_dir), width=4, hidden_dim=32, z_dim=16, patch_size=8, num_patches=4,
                  batch_size=20, train_subset=100, test_subset=50, test_patches=2, probe_epochs=2, device="cpu",
                  log_every=2, checkpoint_every=3, epochs=1, **kw)


def test_compiled_step_that_fails_trains_eager_to_the_same_weights(monkeypatch, tmp_path, data_dir):
    eager = train(_tiny(data_dir, compile="off"), tmp_path / "eager", progress=False, log=lambda s: None)
    monkeypatch.setattr(torch, "compile", _FailsToCompile)
    lines = []
    fell = train(_tiny(data_dir, compile="on"), tmp_path / "fell", progress=False, log=lines.append)
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("eager", "fell"))
    assert a["step"] == b["step"] == 5
    for key, value in a["model"].items():  # the failed step was retried from its random states: bitwise
        assert torch.equal(value, b["model"][key]), key
    note = {"path": "compiled training step", "fallback": "the eager step",
            "why": "RuntimeError: InductorError: CppCompileError: C++ compile error"}
    assert fell["fallbacks"] == [note] and eager["fallbacks"] == []
    assert json.loads((tmp_path / "fell" / "results.json").read_text())["fallbacks"] == [note]
    assert fell["compile"] == "--compile on; compiling failed, eager"
    assert sum("falling back to the eager step" in line for line in lines) == 1
    assert fell["linear_top1"] == eager["linear_top1"]


def test_a_note_outside_any_collection_goes_to_stderr(capsys):
    from empssl.fallbacks import fall_back

    fall_back("a fast path", "the plain one", ValueError(""))
    assert capsys.readouterr().err == "empssl: a fast path failed (ValueError); falling back to the plain one\n"
