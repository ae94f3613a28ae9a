"""MiB (Cermelli et al., CVPR 2020) on mask classification.

Three components, each with its switch under ``CONT.MIB``:

* ``UNBIASED_CE``: the unbiased cross-entropy of the class logits (no-object absorbs the old
  classes, see :func:`~comformer.continual.losses.unbiased_ce_log_probs`);
* ``UNBIASED_KD``: the unbiased distillation from the teacher, on every query of the last layer
  (query i from query i, no matching), weighted by ``KD_WEIGHT``;
* ``INIT``: the new classes start from no-object (:func:`mib_init_classifier`).

At step 0 there are no old classes: the unbiased cross-entropy is the ordinary one and there is
no teacher, so MiB trains like fine-tuning.
"""

import math
from typing import Dict, Optional

import torch
from torch import nn

from .losses import ClassificationLoss, distillation_loss
from .method import METHOD_REGISTRY, ContinualMethod, StepBatch

__all__ = ["MiB", "mib_init_classifier"]


@torch.no_grad()
def mib_init_classifier(class_embed: nn.Linear, num_old: int, num_new: int) -> None:
    """
    MiB's initialisation of the new classes, in place.

    The new rows copy the no-object weights, and the biases of the new classes and of no-object
    become ``b_no-object - log(num_new + 1)``: for any query, the num_new + 1 logits are equal and
    their probabilities sum to the old no-object probability, while the old classes keep theirs.

    Args:
        class_embed: the classifier with ``num_old + num_new + 1`` outputs, laid out [old, new,
            no-object], holding the previous step's weights in its old and no-object rows.
        num_old, num_new: class counts.
    """
    rows = class_embed.weight.shape[0]
    if rows != num_old + num_new + 1:
        raise ValueError(
            f"MiB init: class_embed has {rows} rows, expected old {num_old} + new {num_new} + 1"
        )
    if class_embed.bias is None:
        raise ValueError("MiB init needs a classifier with a bias (class_embed.bias is None)")
    new = slice(num_old, num_old + num_new)
    class_embed.weight[new] = class_embed.weight[-1]
    bias = class_embed.bias[-1] - math.log(num_new + 1)
    class_embed.bias[new] = bias
    class_embed.bias[-1] = bias


@METHOD_REGISTRY.register()
class MiB(ContinualMethod):
    """MiB: unbiased cross-entropy and distillation, new classes initialised from no-object."""

    needs_teacher = True
    reasons_about_old_classes = True

    def __init__(self, cfg, scenario, step: int):
        super().__init__(cfg, scenario, step)
        mib = cfg.CONT.MIB
        if mib.KD_WEIGHT < 0:
            raise ValueError(
                f"CONT.MIB.KD_WEIGHT={mib.KD_WEIGHT} must be >= 0 (0: no distillation)"
            )
        if mib.KD_TEMPERATURE <= 0:
            raise ValueError(f"CONT.MIB.KD_TEMPERATURE={mib.KD_TEMPERATURE} must be > 0")
        self.unbiased_ce = bool(mib.UNBIASED_CE)
        self.unbiased_kd = bool(mib.UNBIASED_KD)
        self.init = bool(mib.INIT)
        self.kd_weight = float(mib.KD_WEIGHT)
        self.kd_temperature = float(mib.KD_TEMPERATURE)
        # Without distillation the teacher would be built for nothing.
        self.needs_teacher = self.kd_weight > 0

    def class_loss(self) -> Optional[ClassificationLoss]:
        if self.unbiased_ce and self.num_old > 0:
            return ClassificationLoss(num_old_absorbed=self.num_old)
        return None

    def init_new_classes(self, class_embed: nn.Linear) -> None:
        if self.init and self.step > 0:
            mib_init_classifier(class_embed, self.num_old, self.num_new)

    def losses(self, batch: StepBatch) -> Dict[str, torch.Tensor]:
        outputs = batch.student.outputs
        losses = batch.set_losses(outputs, batch.targets)
        if batch.teacher is not None:
            losses["loss_kd"] = self.kd_weight * distillation_loss(
                outputs["pred_logits"],
                batch.teacher.outputs["pred_logits"],
                unbiased=self.unbiased_kd,
                temperature=self.kd_temperature,
            )
        return losses

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, unbiased_ce={self.unbiased_ce}, "
            f"unbiased_kd={self.unbiased_kd}, init={self.init}, kd_weight={self.kd_weight}, "
            f"kd_temperature={self.kd_temperature}"
        )
