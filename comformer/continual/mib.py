"""MiB (Cermelli et al., CVPR 2020), on either head of the student.

Three components, each with its switch under ``CONT.MIB``:

* ``UNBIASED_CE``: the unbiased cross-entropy: the background absorbs the old classes;
* ``UNBIASED_KD``: the unbiased distillation from the teacher, the student's background absorbing
  the new classes, weighted by ``KD_WEIGHT`` (teacher logits divided by ``KD_TEMPERATURE``);
* ``INIT``: the new classes start from the background (:func:`mib_init_classifier`).

On the per-pixel head (``MODEL.MASK_FORMER.PER_PIXEL``) this is MiB as published, pixel by pixel
(``pixel_losses.py``, from fcdl94/MiB ``utils/loss.py`` and ``train.py``): the background is the
dataset's background class (Pascal VOC) or the no-object channel (datasets without one, MiB's
ADE20K background); the cross-entropy and distillation are computed on the logits upsampled to the
image size and averaged over all its pixels; ``KD_WEIGHT`` defaults to 10, MiB's ``loss_kd`` for
the method MiB on every dataset (``argparser.py``: ``if opts.method == 'MiB': opts.loss_kd = 10``;
PLOP's repository runs MiB with the same value).

On mask classification it is CoMFormer's port (fcdl94/CoMFormer ``continual/method_wrapper``):
no-object plays the background, a query plays a pixel (``losses.py``), the distillation is a KL
averaged over the queries of the last layer (query i from query i, no matching) and ``KD_WEIGHT``
defaults to 200 (CoMFormer's README: MiB ``CONT.DIST.KD_WEIGHT 200.0``).

At step 0 there are no old classes: the unbiased cross-entropy is the ordinary one and there is
no teacher, so MiB trains like fine-tuning.
"""

import math
from typing import Dict

import torch
from torch import nn

from ..modeling.per_pixel import upsample_logits
from .losses import ClassificationLoss, distillation_loss
from .method import METHOD_REGISTRY, ContinualMethod, StepBatch
from .pixel_losses import UnbiasedPixelCE, pixel_distillation

__all__ = ["MiB", "mib_init_classifier", "PER_PIXEL_KD_WEIGHT", "MASK_KD_WEIGHT"]

# CONT.MIB.KD_WEIGHT < 0: MiB's own value on the per-pixel head (fcdl94/MiB argparser.py, the same
# for Pascal VOC and ADE20K), CoMFormer's on mask classification (its README).
PER_PIXEL_KD_WEIGHT = 10.0
MASK_KD_WEIGHT = 200.0


@torch.no_grad()
def mib_init_classifier(
    class_embed: nn.Module, num_old: int, num_new: int, background: int = -1
) -> None:
    """
    MiB's initialisation of the new classes, in place.

    The new rows copy the background row's weights, and the biases of the new classes and of the
    background become ``b_bg - log(num_new + 1)``: for any input, the num_new + 1 logits are equal
    and their probabilities sum to the old background probability, while the old classes keep
    theirs (fcdl94/MiB ``segmentation_module.py``, ``init_new_classifier``).

    Args:
        class_embed: the classifier (``nn.Linear``, or a 1x1 ``nn.Conv2d``) whose rows are laid
            out [old, new] plus an optional extra row, holding the previous step's weights in its
            old (and extra) rows.
        num_old, num_new: class counts.
        background: the background row: -1 the last (no-object), or an old class (Pascal VOC's
            background on the per-pixel head).
    """
    rows = class_embed.weight.shape[0]
    expected = (
        (num_old + num_new + 1,) if background < 0 else (num_old + num_new, num_old + num_new + 1)
    )
    if rows not in expected:
        raise ValueError(
            f"MiB init: the classifier has {rows} rows, expected old {num_old} + new {num_new}"
            + (" + 1 no-object" if background < 0 else " (+ 1 no-object)")
        )
    if class_embed.bias is None:
        raise ValueError("MiB init needs a classifier with a bias")
    if background >= num_old:
        raise ValueError(f"MiB init: background row {background} must be an old class or -1")
    background = background % rows
    new = slice(num_old, num_old + num_new)
    class_embed.weight[new] = class_embed.weight[background]
    bias = class_embed.bias[background] - math.log(num_new + 1)
    class_embed.bias[new] = bias
    class_embed.bias[background] = bias


@METHOD_REGISTRY.register()
class MiB(ContinualMethod):
    """MiB: unbiased cross-entropy and distillation, new classes initialised from the background."""

    needs_teacher = True
    reasons_about_old_classes = True

    def __init__(self, cfg, scenario, step: int):
        super().__init__(cfg, scenario, step)
        mib = cfg.CONT.MIB
        if mib.KD_TEMPERATURE <= 0:
            raise ValueError(f"CONT.MIB.KD_TEMPERATURE={mib.KD_TEMPERATURE} must be > 0")
        self.unbiased_ce = bool(mib.UNBIASED_CE)
        self.unbiased_kd = bool(mib.UNBIASED_KD)
        self.init = bool(mib.INIT)
        if mib.KD_WEIGHT >= 0:
            self.kd_weight = float(mib.KD_WEIGHT)
        else:
            self.kd_weight = PER_PIXEL_KD_WEIGHT if self.per_pixel else MASK_KD_WEIGHT
        self.kd_temperature = float(mib.KD_TEMPERATURE)
        self.ignore_value = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        # Without distillation the teacher would be built for nothing.
        self.needs_teacher = self.kd_weight > 0

    def class_loss(self):
        if not self.unbiased_ce or self.num_old == 0:
            return None
        if self.per_pixel:
            return UnbiasedPixelCE(
                num_old=self.num_old,
                background=self.background_channel,
                ignore_value=self.ignore_value,
            )
        return ClassificationLoss(num_old_absorbed=self.num_old)

    def init_new_classes(self, class_embed: nn.Module) -> None:
        if self.init and self.step > 0:
            mib_init_classifier(class_embed, self.num_old, self.num_new, self.background_row)

    def losses(self, batch: StepBatch) -> Dict[str, torch.Tensor]:
        outputs = batch.student.outputs
        losses = batch.set_losses(outputs, batch.targets)
        if batch.teacher is None:
            return losses
        t_outputs = batch.teacher.outputs
        if self.per_pixel:
            size = batch.images.tensor.shape[-2:]
            kd = pixel_distillation(
                upsample_logits(outputs["sem_logits"], size),
                upsample_logits(t_outputs["sem_logits"], size),
                num_old=self.num_old,
                background=self.background_channel,
                unbiased=self.unbiased_kd,
                temperature=self.kd_temperature,
            )
        else:
            kd = distillation_loss(
                outputs["pred_logits"],
                t_outputs["pred_logits"],
                unbiased=self.unbiased_kd,
                temperature=self.kd_temperature,
            )
        losses["loss_kd"] = self.kd_weight * kd
        return losses

    def extra_repr(self) -> str:
        head = "per-pixel" if self.per_pixel else "mask classification"
        return (
            f"{super().extra_repr()}, {head}, unbiased_ce={self.unbiased_ce}, "
            f"unbiased_kd={self.unbiased_kd}, init={self.init}, kd_weight={self.kd_weight}, "
            f"kd_temperature={self.kd_temperature}"
        )
