"""The teacher: the previous step's model, frozen, predicting without a graph.

Its whole life is here: built from the previous step's config and final checkpoint
(:meth:`Teacher.from_checkpoint`), frozen (eval mode, no gradients), and asked for predictions on
the student's batch (:meth:`Teacher.predict`). It is not a submodule of the student or of the
:class:`~comformer.continual.model.ContinualModel`: it has no state-dict entries, no optimizer
parameters, and ``.train()`` calls meant for the student do not reach it.
"""

from typing import Dict

import torch
from torch import nn

from detectron2.modeling import build_model
from detectron2.structures import ImageList

from ..utils.timing import timed
from .method import Prediction

__all__ = ["Teacher", "config_with_classes"]


def config_with_classes(cfg, num_classes: int):
    """A frozen copy of ``cfg`` whose model predicts ``num_classes`` classes."""
    out = cfg.clone()
    out.defrost()
    out.MODEL.SEM_SEG_HEAD.NUM_CLASSES = int(num_classes)
    out.freeze()
    return out


class Teacher:
    """A frozen model that predicts on the student's batches."""

    def __init__(self, model: nn.Module):
        """
        Args:
            model: a ``MaskFormer`` (or any model with ``predict(images)`` and
                ``mask_activation``) holding the previous step's weights; frozen here.
        """
        model.eval()  # batch norms and dropout in inference mode, for good
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model

    @classmethod
    def from_checkpoint(cls, cfg, state: Dict[str, torch.Tensor], num_classes: int) -> "Teacher":
        """
        Args:
            cfg: the student's config (architecture, device).
            state: the previous step's final state dict.
            num_classes: the classes the previous step's model predicts.
        """
        model = build_model(config_with_classes(cfg, num_classes))
        model.load_state_dict(state)
        return cls(model)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def mask_activation(self) -> str:
        return self.model.mask_activation

    def predict(self, images: ImageList) -> Prediction:
        """The teacher's backbone features and prediction dict for the student's normalised,
        padded batch, without autograd."""
        with torch.no_grad(), timed("teacher forward"):
            features, outputs = self.model.predict(images)
        return Prediction(features, outputs, self.mask_activation)

    def __repr__(self) -> str:
        return f"Teacher({type(self.model).__name__}, {self.num_classes} classes)"
