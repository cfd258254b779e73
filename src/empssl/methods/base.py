"""What a self-supervised method is to the training loop (:mod:`empssl.train`), which knows nothing else about it.

Per step the loop asks for the views of a batch (:meth:`Method.views`) and their loss terms (:meth:`Method.loss`),
lets the method edit the gradients (:meth:`Method.before_optimizer_step`), steps the optimiser, and lets the
method update its own state (:meth:`Method.after_step`, e.g. BYOL's momentum target). Views of one size are one
(V, b, 3, s, s) tensor; views of several sizes (SwAV-style multi-crop) a list of (V_i, b, 3, s_i, s_i) tensors,
which the loop passes to :meth:`Method.loss` untouched. Adding a method: README.md, "Adding a method".
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeAlias

import torch
from torch import nn

from ..config import Config, ConfigError, MethodSettings
from ..distributed import SINGLE, Dist
from ..patches import Augment

# What Method.views returns: one tensor of same-size views, or a list of tensors of views of different sizes.
Views: TypeAlias = "torch.Tensor | list[torch.Tensor]"


class Method:
    """Base class of the methods: subclasses set the class attributes and implement ``build_model``,
    ``view_augments``, ``views`` and ``loss``; the other hooks do nothing unless overridden.

    Attributes:
        name: the ``--method`` value (set by ``@register``).
        Settings: the method's own settings (a frozen :class:`empssl.config.MethodSettings`), which become flags
            and config.json keys; ``self.settings`` holds their values.
        preset: the preset (src/empssl/presets/NAME.json) a run starts from without --preset; None: the Config
            defaults (EMP-SSL's recipe).
        eval_view: ``"patches"`` (bag of features over augmented patches, as EMP-SSL) or ``"full"`` (the whole
            image, as solo-learn evaluates); eval_feature: ``"pre"`` (EMP-SSL's 4096-d pre-feature) or
            ``"backbone"`` (the 512-d ResNet feature).
        terms: names of the logged loss terms, the minimised loss first.
        chunked: the method implements ``--patch-chunks`` (its :meth:`gradients`); the others refuse a value > 1.
    """

    name: ClassVar[str]
    Settings: ClassVar[type[MethodSettings]] = MethodSettings  # no settings of its own
    preset: ClassVar[str | None] = None
    eval_view: ClassVar[str] = "full"
    eval_feature: ClassVar[str] = "backbone"
    terms: ClassVar[tuple[str, ...]] = ("loss",)
    chunked: ClassVar[bool] = False
    settings: MethodSettings

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        name = getattr(self, "name", type(self).__name__)
        self.settings = self.Settings.from_dict(cfg.method_settings, name)
        if cfg.patch_chunks > 1 and not self.chunked:
            raise ConfigError(f"--patch-chunks splits EMP-SSL's patches of a step into groups; {name} does not "
                              f"take it (leave it at 1)")

    def build_model(self) -> nn.Module:
        """A new model (on the CPU). It has ``.backbone`` (a :class:`empssl.models.ResNet`) and
        ``.features(x, kind)``; its ``state_dict()`` is what checkpoints hold."""
        raise NotImplementedError

    def view_augments(self) -> list[Augment]:
        """The augmentation of every view of an image (one entry per view)."""
        raise NotImplementedError

    @property
    def views_per_image(self) -> int:
        """Views each image gives per step (EMP-SSL: ``num_patches``; the baselines: 2)."""
        return len(self.view_augments())

    def eval_augment(self) -> Augment:
        """The augmentation of ``--eval-view patches``, and the normalisation of ``--eval-view full``."""
        return self.view_augments()[0]

    def views(self, images: torch.Tensor, generator: torch.Generator, dist: Dist = SINGLE,
              memory_format: torch.memory_format = torch.contiguous_format) -> Views:
        """(b, 3, H, W) uint8 images (this rank's slice of the step's batch) -> (V, b, 3, s, s) normalised views
        (or a list of them, of different sizes)."""
        raise NotImplementedError

    def loss(self, net: nn.Module, views: Any, amp: torch.dtype | None, dist: Dist = SINGLE) -> torch.Tensor:
        """The (len(terms),) float32 loss terms of ``views`` (what :meth:`views` returned) through ``net`` (the
        training module: maybe DDP-wrapped or compiled) under autocast to ``amp``."""
        raise NotImplementedError

    def gradients(self, net: nn.Module, images: torch.Tensor, generator: torch.Generator, amp: torch.dtype | None,
                  memory_format: torch.memory_format, dist: Dist = SINGLE) -> torch.Tensor:
        """Accumulate the step's gradients into the (zeroed) parameters; return its detached (len(terms),) loss
        terms. EMP-SSL's ``--patch-chunks`` does it in groups of patches."""
        views = self.views(images, generator, dist, memory_format)
        terms = self.loss(net, views, amp, dist)
        terms[0].backward()
        return terms.detach()

    def before_optimizer_step(self, model: nn.Module) -> None:
        """Between the backward pass and the optimiser step, with the training module: the place to edit
        gradients (e.g. SwAV zeroes its prototypes' gradients in the first iterations)."""

    def after_step(self, model: nn.Module, step: int, total_steps: int, applied: torch.Tensor) -> None:
        """After every optimiser step (``step`` steps done of the schedule's ``total_steps``); ``applied``: a 0-d
        bool device tensor, False when the update was skipped (non-finite loss or gradient)."""
