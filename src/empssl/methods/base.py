"""What a self-supervised method is to the training loop: a model, its views, its loss, and its own evaluation.

The loop (:mod:`empssl.train`) knows nothing else about a method. Per step it asks for the views of a batch of
images (:meth:`Method.views`), for the loss terms of those views under the training module
(:meth:`Method.loss`), takes one optimiser step, and lets the method update any extra state
(:meth:`Method.after_step`, e.g. BYOL's momentum target). Adding a method is one module under
``empssl/methods/``, its name in :data:`empssl.config.METHOD_NAMES`, a preset and a test.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..config import Config
from ..distributed import SINGLE, Dist
from ..patches import Augment


class Method:
    """Base class of the methods. Subclasses set the class attributes and implement the three hooks.

    Attributes:
        name: the ``--method`` value.
        eval_view: the method's own evaluation view: ``"patches"`` (bag of features over augmented patches, as
            EMP-SSL) or ``"full"`` (one un-augmented view of the whole image, as solo-learn evaluates).
        eval_feature: the method's own evaluated representation: ``"pre"`` (EMP-SSL's 4096-d pre-feature) or
            ``"backbone"`` (the 512-d ResNet feature).
        terms: names of the logged loss terms; the first is the loss that is minimised.
    """

    name: ClassVar[str]
    eval_view: ClassVar[str] = "full"
    eval_feature: ClassVar[str] = "backbone"
    terms: ClassVar[tuple[str, ...]] = ("loss",)

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

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
              memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """(b, 3, H, W) uint8 images (this rank's slice of the step's batch) -> (V, b, 3, s, s) normalised views."""
        raise NotImplementedError

    def loss(self, net: nn.Module, views: torch.Tensor, amp: torch.dtype | None,
             dist: Dist = SINGLE) -> torch.Tensor:
        """Forward ``views`` through ``net`` (the training module: maybe DDP-wrapped or compiled) under autocast
        to ``amp``, and return the (len(terms),) float32 loss terms, the minimised loss first."""
        raise NotImplementedError

    def after_step(self, model: nn.Module, step: int, total_steps: int, applied: torch.Tensor) -> None:
        """Called after every optimiser step (``step`` counts the steps done, ``total_steps`` is the length of the
        learning-rate schedule). ``applied`` is a 0-d bool device tensor, False when the update was skipped
        (non-finite loss or gradient). Default: nothing."""
