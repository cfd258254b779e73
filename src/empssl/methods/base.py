"""What a self-supervised method is to the training loop: a model, its views, its loss, and its own evaluation.

The loop (:mod:`empssl.train`) knows nothing else about a method. Per step it asks for the views of a batch of
images (:meth:`Method.views`), for the loss terms of those views under the training module
(:meth:`Method.loss`), lets the method touch the gradients (:meth:`Method.before_optimizer_step`), takes one
optimiser step, and lets the method update any extra state (:meth:`Method.after_step`, e.g. BYOL's momentum
target).

Views of several sizes: :meth:`Method.views` returns one (V, b, 3, s, s) tensor when all views share a size
(EMP-SSL's patches, the baselines' two crops), or a list of (V_i, b, 3, s_i, s_i) tensors when they do not
(SwAV-style multi-crop: ``[two 32 px global crops, six 16 px local crops]``). The loop never looks inside: it
passes what ``views`` returned to :meth:`Method.loss` untouched.

Adding a method is one module under ``empssl/methods/`` with a ``@register("name")`` class, its preset and the
tests that the registry already runs over it (README.md, "Adding a method").
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
    """Base class of the methods. Subclasses set the class attributes and implement ``build_model``,
    ``view_augments``, ``views`` and ``loss``; the other hooks do nothing unless overridden.

    Attributes:
        name: the ``--method`` value (set by ``@register``).
        Settings: the method's own settings, a frozen :class:`empssl.config.MethodSettings` dataclass whose fields
            (default, help text, rule) become flags and config.json keys; ``self.settings`` holds their values.
        preset: the preset (src/empssl/presets/NAME.json) a run of this method starts from when no --preset is
            given; None: the Config defaults (EMP-SSL's recipe).
        eval_view: the method's own evaluation view: ``"patches"`` (bag of features over augmented patches, as
            EMP-SSL) or ``"full"`` (one un-augmented view of the whole image, as solo-learn evaluates).
        eval_feature: the method's own evaluated representation: ``"pre"`` (EMP-SSL's 4096-d pre-feature) or
            ``"backbone"`` (the 512-d ResNet feature).
        terms: names of the logged loss terms; the first is the loss that is minimised.
        chunked: the method implements ``--patch-chunks`` (its :meth:`gradients` makes and consumes the views in
            groups); the others refuse a value above 1.
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

    # --- what the method is made of -------------------------------------------------------------------------

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
        """The augmentation of the patches of the bag-of-features evaluation (``--eval-view patches``), and the
        normalisation of the whole-image view (``--eval-view full``)."""
        return self.view_augments()[0]

    # --- one training step ----------------------------------------------------------------------------------

    def views(self, images: torch.Tensor, generator: torch.Generator, dist: Dist = SINGLE,
              memory_format: torch.memory_format = torch.contiguous_format) -> Views:
        """(b, 3, H, W) uint8 images (this rank's slice of the step's batch) -> (V, b, 3, s, s) normalised views,
        or a list of such tensors of different sizes (see the module docstring)."""
        raise NotImplementedError

    def loss(self, net: nn.Module, views: Any, amp: torch.dtype | None, dist: Dist = SINGLE) -> torch.Tensor:
        """Forward ``views`` (what :meth:`views` returned) through ``net`` (the training module: maybe DDP-wrapped
        or compiled) under autocast to ``amp``, and return the (len(terms),) float32 loss terms, the minimised loss
        first."""
        raise NotImplementedError

    def gradients(self, net: nn.Module, images: torch.Tensor, generator: torch.Generator, amp: torch.dtype | None,
                  memory_format: torch.memory_format, dist: Dist = SINGLE) -> torch.Tensor:
        """The step's gradients, accumulated into the parameters (zeroed by the caller), and its detached
        (len(terms),) loss terms: :meth:`views`, :meth:`loss`, one backward pass. A method may do it otherwise
        (EMP-SSL with ``--patch-chunks``: in groups of patches)."""
        views = self.views(images, generator, dist, memory_format)
        terms = self.loss(net, views, amp, dist)
        terms[0].backward()
        return terms.detach()

    def before_optimizer_step(self, model: nn.Module) -> None:
        """Called after the backward pass and before the optimiser step, with the training module (as
        :meth:`loss` gets it): the place to edit gradients (e.g. SwAV zeroes its prototypes' gradients in the
        first iterations). Default: nothing."""

    def after_step(self, model: nn.Module, step: int, total_steps: int, applied: torch.Tensor) -> None:
        """Called after every optimiser step (``step`` counts the steps done, ``total_steps`` is the length of the
        learning-rate schedule). ``applied`` is a 0-d bool device tensor, False when the update was skipped
        (non-finite loss or gradient). Default: nothing."""
