"""The continual-method registry and the base method (fine-tuning).

A method decides three things for an incremental step: how the new classifier rows start
(``init_new_classes``), which classes the step's targets keep (``trains_on_all_seen``), and the
training losses given the student's and, when it asks for one, the teacher's predictions
(``losses``). Shapes follow ``comformer.modeling``: B images, Q queries, K classes.
"""
from typing import Dict, List

import torch
from torch import nn

from detectron2.structures import ImageList
from detectron2.utils.registry import Registry

__all__ = ["METHOD_REGISTRY", "ContinualMethod", "build_method"]

METHOD_REGISTRY = Registry("CONTINUAL_METHOD")
METHOD_REGISTRY.__doc__ = """
Continual methods. A member is a ``ContinualMethod`` subclass constructed as
``Method(cfg, scenario, step)``; ``CONT.METHOD`` names it case-insensitively (``FT`` is "ft").
"""


class ContinualMethod:
    """
    Fine-tuning: train the step's classes with the ordinary Mask2Former losses, no teacher.

    Subclasses override the class attributes and hooks below.
    """

    # Whether the step needs the previous step's model at training time.
    needs_teacher: bool = False
    # Whether targets keep every class seen so far (joint training) or only the step's classes.
    trains_on_all_seen: bool = False

    def __init__(self, cfg, scenario, step: int):
        """
        Args:
            cfg: the step's config.
            scenario: the ``Scenario`` being run.
            step: the step trained with this method.
        """
        self.cfg = cfg
        self.scenario = scenario
        self.step = step
        self.num_old = scenario.num_seen(step - 1) if step > 0 else 0
        self.num_new = len(scenario.steps[step])

    def configure_model(self, model: nn.Module) -> None:
        """Adapt the freshly built student before any weights are loaded (e.g. swap its criterion
        for one with the method's classification loss). Default: nothing to change."""

    def init_new_classes(self, model: nn.Module) -> None:
        """Initialise the classifier rows of the new classes after the old weights were loaded.
        Default: keep the fresh random initialisation (Mask2Former's)."""

    def losses(
        self,
        model: nn.Module,
        images: ImageList,
        features: Dict[str, torch.Tensor],
        outputs: Dict,
        targets: List[Dict[str, torch.Tensor]],
    ) -> Dict[str, torch.Tensor]:
        """
        Weighted training losses of one batch.

        Args:
            model: the student (``MaskFormer``); ``model.teacher`` is the frozen previous-step model.
            images: the normalised, padded batch.
            features: the student's backbone features.
            outputs: the student's predictions: "pred_logits" (B, Q, K+1), "pred_masks"
                (B, Q, h, w), "aux_outputs".
            targets: per image {"labels" (N,), "masks" (N, H, W)} in model indices.
        """
        return model.weighted_losses(model.criterion(outputs, targets))

    def extra_repr(self) -> str:
        return f"step={self.step}, old={self.num_old}, new={self.num_new}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


@METHOD_REGISTRY.register()
class FT(ContinualMethod):
    """Plain fine-tuning on the new classes: the lower bound (forgets the old classes)."""


@METHOD_REGISTRY.register()
class Joint(ContinualMethod):
    """Joint training: every step trains on all images and labels of every class seen so far
    (the upper bound; it sees the old data, which continual methods may not)."""

    trains_on_all_seen = True


def build_method(cfg, scenario, step: int) -> ContinualMethod:
    """The method named by ``cfg.CONT.METHOD`` for ``step`` of ``scenario``."""
    by_lower = {name.lower(): name for name, _ in METHOD_REGISTRY}
    name = by_lower.get(cfg.CONT.METHOD.lower())
    if name is None:
        raise KeyError(
            f"CONT.METHOD={cfg.CONT.METHOD!r} is not a registered method; valid: "
            f"{', '.join(sorted(by_lower))}"
        )
    return METHOD_REGISTRY.get(name)(cfg, scenario, step)
