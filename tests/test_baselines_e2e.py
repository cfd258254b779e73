"""Every method trains and evaluates end to end through ``train()`` on the bundled CIFAR-10 subset (CPU, toy size),
and a baseline's encoder beats its own random initialisation under its own evaluation (whole image, backbone)."""

import json

import pytest
import torch

from empssl.config import Config, load_preset, method_preset, method_recipe, settings_for
from empssl.methods import method_class, method_names
from empssl.train import train

# The protocol each built-in method is evaluated under by default: EMP-SSL's bag of patches on its pre-feature,
# the baselines' whole image on the backbone feature (solo-learn's); any other method: what its class declares.
PROTOCOL = {"emp-ssl": ("patches", "pre"), "simclr": ("full", "backbone"), "vicreg": ("full", "backbone"),
            "byol": ("full", "backbone")}


def recipe(method: str, data_dir, **kw) -> Config:
    """The method's own recipe (its preset; EMP-SSL's is the defaults) on the demo data on the CPU, with ``kw``."""
    cfg = Config.from_dict({**method_recipe(method), "method": method})
    return cfg.replace(data="demo", data_dir=str(data_dir), device="cpu", **kw)


@pytest.mark.parametrize("method", method_names())
def test_two_steps_train_and_evaluate(tmp_path, data_dir, method):
    cls = method_class(method)
    small = settings_for(method, {"pred_hidden_dim": 32})  # BYOL's predictor, shrunk with the rest
    cfg = recipe(method, data_dir, width=4, hidden_dim=32, z_dim=16, patch_size=8, num_patches=4, train_subset=40,
                 test_subset=20, batch_size=20, epochs=1, warmup_epochs=0, test_patches=2, probe_epochs=2, **small)
    out = tmp_path / "run"
    results = train(cfg, out, progress=False, log=lambda s: None)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert on_disk["method"] == method and on_disk["steps"] == 2
    assert (on_disk["eval_view"], on_disk["feature"]) == PROTOCOL.get(method, (cls.eval_view, cls.eval_feature))
    assert on_disk["n_train"] == 40 and on_disk["n_test"] == 20
    for key in ("linear_top1", "knn_top1"):  # a share of the 20 test images: a whole number of 5 % steps
        correct = on_disk[key] * 20 / 100
        assert 0 <= on_disk[key] <= 100 and abs(correct - round(correct)) < 1e-6, (key, on_disk[key])
    timing = on_disk["timing"]
    # "startup" is there only for the first run of a process, so it is not asked for here
    assert {"data", "train", "features", "knn", "probe", "total"} <= set(timing)
    # each figure is rounded to the millisecond: the parts' sum may exceed the total by half a unit each
    parts = sum(v for k, v in timing.items() if k != "total")
    assert timing["train"] > 0 and timing["total"] >= parts - 5e-4 * len(timing)


BATCH = 50
# Measured (torch 2.14.1, OMP_NUM_THREADS=2 on 2 CPU cores shared with other jobs, load average ~2): the linear
# probe's top-1 (30 epochs, whole 32 px image, 64-d backbone feature, 1,000 test images), trained vs the same random
# initialisation, for seeds 0 / 1 / 2 / 3 / 4, and the seconds of one case:
#   simclr  33.8 vs 23.4, 32.8 vs 26.0, 29.7 vs 24.4, 32.3 vs 27.6, 34.7 vs 24.2  (gap >= 4.7)   40-48 s
#   vicreg  33.4 vs 23.4, 33.4 vs 26.0, 33.5 vs 24.4, 35.4 vs 27.6, 32.9 vs 24.2  (gap >= 7.4)   39-50 s
#   byol    24.2 vs 23.4, 23.5 vs 26.0 (seeds 0, 1; 20 epochs, as the others)               55-60 s
# BYOL learns more slowly: at 800 steps it does not beat its initialisation (above; in a 400-step run its kNN
# accuracy dips from 22.9 to ~20 before it recovers), so its case trains twice as long (40 epochs, 1,600 steps,
# warm-up 2 epochs): 32.2 vs 23.4, 32.7 vs 26.0, 32.5 vs 24.4, 33.5 vs 27.6 for seeds 0-3 (one thread, ~140 s
# each under load), and with two threads 29.5 vs 23.4 (seed 0, 113 s) but 22.8 vs 24.2 (seed 4, 104 s): at this
# size BYOL beats its initialisation in 5 of the 6 measured runs. With the official stem init (a fresh nn.Conv2d,
# std 0.111) and torchvision's crops, one thread: seed 0 25.9 vs 23.5, seed 1 31.4 vs 21.2, seed 3 20.5 vs 19.2
# (seed 0 with the former kaiming stem: 30.5 vs 24.5): margins of +2.4, +10.2 and +1.3 points. The case keeps
# seed 0 and asks for more than 1 point, below every measured margin of the current code rather than a seed picked
# because it passes; a BYOL that stays at its initialisation fails it. It runs on one thread, as measured: with
# two threads (CI's default) seed 0 gave 23.8 vs 23.5 (CI, 2026-12-01).
MARGIN = {"simclr": 2.0, "vicreg": 3.5, "byol": 1.0}
LONGER = {"byol": {"epochs": 40, "warmup_epochs": 2}}
ONE_THREAD = {"byol"}  # with two threads the summation order differs, and BYOL at this size with it


@pytest.mark.slow
@pytest.mark.parametrize("method", list(MARGIN))  # the methods with a measured margin
def test_baseline_beats_its_random_init(tmp_path, data_dir, method):
    """A short run of the method's own recipe (its preset, shrunk to CPU size) must beat the untrained encoder,
    both evaluated with the method's own protocol (linear probe on the whole image's backbone feature)."""
    # The preset's lr is at batch 256; solo-learn scales it by batch/256 (docs/RECIPE.md). Unscaled, VICReg's 0.3
    # diverges on this width-8 network at batch 100 (non-finite loss at step 101 of 200).
    lr = load_preset(method_preset(method))["lr"] * BATCH / 256
    # 16 px views (an 8-100 % crop resized to 16 px) make a step 1.5-2x cheaper than 32 px ones: 800 steps fit in
    # ~50 s, where 400 steps of 32 px views gave smaller and less regular gaps (SimCLR +8.1 and +3.9 for seeds 0, 1;
    # VICReg +11.2 and +0.8 at batch 100). Evaluation stays on the whole 32 px image.
    cfg = recipe(method, data_dir, width=8, hidden_dim=256, z_dim=64, patch_size=16, train_subset=2000,
                 test_subset=1000, batch_size=BATCH, lr=lr, epochs=20, warmup_epochs=1, probe_epochs=30,
                 compare_random_init=True, **settings_for(method, {"pred_hidden_dim": 256}))
    cfg = cfg.replace(**LONGER.get(method, {}))
    threads = torch.get_num_threads()
    if method in ONE_THREAD:  # its measured numbers (above) are one thread's: the CPU result is then reproducible
        torch.set_num_threads(1)
    try:
        results = train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    assert (results["eval_view"], results["feature"]) == PROTOCOL[method]
    trained, random_init = results["linear_top1"], results["random_init"]["linear_top1"]
    assert trained > random_init + MARGIN[method], (trained, random_init)
