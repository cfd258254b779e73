"""``--compile`` (auto | on | off): whether the training step runs through torch.compile, and the module it calls.

``auto`` is eager on the CPU; on CUDA it times ``COMPILE_TRIAL_STEPS`` eager steps and compiles only if the rest
of the run saves more than compiling costs (:func:`want_compile`). The plain model is never wrapped in place, so
its state_dict (what checkpoints hold) keeps plain keys.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from . import distributed
from .devices import synchronize
from .distributed import Dist
from .fallbacks import fall_back

T = TypeVar("T")

# --compile auto: after this many eager steps (cudnn autotuning done) the step time is measured and the model
# compiled only if the rest of the run saves more than compiling costs. The two estimates come from one H200
# (torch 2.11, 20 patches x 100 images): eager 59,636 vs compiled 77,069 patches/s, i.e. 23% of the step time;
# the compile time is an assumption until bench/gpu_check.py has measured it.
COMPILE_TRIAL_STEPS = 25
COMPILE_GAIN = 0.2  # fraction of an eager step's time that compiling saves
COMPILE_SECONDS = 60.0  # what compiling the training step costs, once


def want_compile(mode: str, device: torch.device, remaining_steps: int, step_seconds: float | None
                 ) -> tuple[bool, str]:
    """(compile now, a one-line reason). ``auto`` compiles only on CUDA, once measured, and only when
    ``remaining_steps * step_seconds * COMPILE_GAIN`` exceeds ``COMPILE_SECONDS``: a one-epoch CIFAR run (500 steps
    of ~34 ms) saves ~3 s and stays eager."""
    if mode in ("on", "off"):
        return mode == "on", f"--compile {mode}"
    if device.type != "cuda":
        return False, "auto: eager on the CPU"
    if step_seconds is None:
        if remaining_steps < COMPILE_TRIAL_STEPS:
            return False, f"auto: {remaining_steps} steps, too few to win back compiling"
        return False, "auto: eager while the step time is measured"
    saving = remaining_steps * step_seconds * COMPILE_GAIN
    use = saving > COMPILE_SECONDS
    return use, (f"auto: {remaining_steps} steps of {1000 * step_seconds:.1f} ms would save ~{saving:.0f} s "
                 f"against ~{COMPILE_SECONDS:.0f} s of compiling -> {'compile' if use else 'eager'}")


class Compiler:
    """The module the training step calls (``net``: the model, wrapped in DDP under torchrun and/or compiled),
    with ``--compile`` decided for steps ``start_step`` .. ``total_steps``; ``reason`` says why, in one line, and
    ``compile_seconds`` is the time the compiled first step took. The loop runs every step through :meth:`call`,
    then :meth:`after`; :meth:`exclude` leaves time spent outside it (monitoring) out.
    """

    def __init__(self, mode: str, model: nn.Module, device: torch.device, dist: Dist, *, start_step: int,
                 total_steps: int, log: Callable[[str], None]) -> None:
        self.model, self.device, self.dist, self.total_steps, self.log = model, device, dist, total_steps, log
        compiled, self.reason = want_compile(mode, device, total_steps - start_step, None)
        self.net = self._module(compiled)
        self.compile_from = start_step if compiled else None  # the step whose wall time includes compiling
        measured = mode == "auto" and device.type == "cuda" and total_steps - start_step >= COMPILE_TRIAL_STEPS
        self.decide_at = start_step + COMPILE_TRIAL_STEPS if measured else -1
        self.compile_seconds = 0.0
        self._t_compile = self._t_trial = 0.0

    def call(self, run_step: Callable[..., T], *args: Any, generator: torch.Generator, step: int) -> T:
        """``run_step(self.net, *args)``: step ``step``, which draws from ``generator``.

        While compiled, a step that raises (compiling happens at the first call, and at a recompilation) runs
        again eager from the random states it started from, with a note (:mod:`empssl.fallbacks`); an error of
        the step itself raises again from the eager one. Under torchrun the ranks fail, and fall back, together."""
        if self.compile_from is None:
            return run_step(self.net, *args)
        if step == self.compile_from:  # the step that compiles: timed until after() has synchronised
            synchronize(self.device)
            self._t_compile = time.perf_counter()
        states = generator.get_state(), torch.get_rng_state()
        try:
            return run_step(self.net, *args)
        except Exception as e:
            generator.set_state(states[0])
            torch.set_rng_state(states[1])
            fall_back("compiled training step", "the eager step", e)
            self.net, self.compile_from = self._module(False), None
            self.reason += "; compiling failed, eager"
            return run_step(self.net, *args)

    def _module(self, compile: bool) -> nn.Module:
        return distributed.training_module(self.model, self.device, self.dist, compile=compile)

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (e.g. monitoring) out of the step-time measurement."""
        self._t_trial += seconds

    def after(self, step: int) -> None:
        """After ``step`` steps are done: account the compile time, or time the eager steps and decide."""
        if self.compile_from is not None and step == self.compile_from + 1:
            synchronize(self.device)
            self.compile_seconds += time.perf_counter() - self._t_compile
        if step == self.decide_at - COMPILE_TRIAL_STEPS + 5:  # cudnn has autotuned: start timing
            synchronize(self.device)
            self._t_trial = time.perf_counter()
        if step == self.decide_at:
            synchronize(self.device)
            step_s = (time.perf_counter() - self._t_trial) / (COMPILE_TRIAL_STEPS - 5)
            compiled, self.reason = want_compile("auto", self.device, self.total_steps - step, step_s)
            if compiled:
                self.net, self.compile_from = self._module(True), step
            self.log(f"--compile {self.reason}")
