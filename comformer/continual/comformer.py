"""CoMFormer (Cermelli et al., CVPR 2023): continual learning on mask classification.

Components, each with its switch under ``CONT.COMFORMER``:

* ``SOFTMAX_MASKS``: masks normalised by a softmax across queries in matching, mask losses and
  inference. The model is built from ``MODEL.MASK_FORMER.MASK_ACTIVATION``, which a method cannot
  change after the fact, so the method checks that the config asks for "softmax" (the CoMFormer
  configs set it); ``SOFTMAX_MASKS False`` is the ablation with sigmoid masks.
* ``FOCAL``: the focal classification loss ``alpha (1 - p_t)^gamma CE`` averaged over queries, at
  every step including the base one.
* adaptive distillation: the unbiased distillation (``UNBIASED_KD``) of every query of the last
  layer (and of the auxiliary layers with ``KD_AUX``) from the same query of the teacher, each
  query weighted by ``(1 - p_teacher(no-object))^2`` (``KD_REWEIGHT``), weighted by
  ``KD_WEIGHT`` (< 0: by setting, see :mod:`comformer.continual.defaults`).
* ``PSEUDO_LABELS``: the teacher's mask-based pseudo-labels join the ground truth before matching
  (:func:`~comformer.continual.pseudo_labels.mask_pseudo_labels`).
"""

from typing import Dict, Optional

import torch

from .defaults import setting_default
from .losses import ClassificationLoss, distillation_loss
from .method import METHOD_REGISTRY, ContinualMethod, StepBatch
from .pseudo_labels import with_teacher_pseudo_labels

__all__ = ["CoMFormer"]

# Exponent of the adaptive distillation weights (1 - p_no-object)^gamma.
KD_REWEIGHT_GAMMA = 2.0


@METHOD_REGISTRY.register()
class CoMFormer(ContinualMethod):
    """CoMFormer: softmax masks, focal loss, adaptive unbiased distillation, pseudo-labels."""

    needs_teacher = True
    reasons_about_old_classes = True

    def __init__(self, cfg, scenario, step: int):
        super().__init__(cfg, scenario, step)
        c = cfg.CONT.COMFORMER
        if self.per_pixel:
            raise ValueError(
                "CONT.METHOD comformer distils queries and pseudo-labels masks: it needs mask "
                "classification (MODEL.MASK_FORMER.PER_PIXEL False)"
            )
        activation = cfg.MODEL.MASK_FORMER.MASK_ACTIVATION
        if c.SOFTMAX_MASKS and activation != "softmax":
            raise ValueError(
                "CONT.METHOD comformer uses softmax masks (CONT.COMFORMER.SOFTMAX_MASKS True) but "
                f"MODEL.MASK_FORMER.MASK_ACTIVATION={activation!r}: set it to 'softmax' (for every "
                "step, the model is built from it), or set CONT.COMFORMER.SOFTMAX_MASKS False for "
                "the sigmoid-mask ablation"
            )
        if c.FOCAL and (c.FOCAL_ALPHA <= 0 or c.FOCAL_GAMMA < 0):
            raise ValueError(
                f"CONT.COMFORMER.FOCAL_ALPHA={c.FOCAL_ALPHA} must be > 0 and "
                f"CONT.COMFORMER.FOCAL_GAMMA={c.FOCAL_GAMMA} >= 0"
            )
        if c.KD_TEMPERATURE <= 0:
            raise ValueError(f"CONT.COMFORMER.KD_TEMPERATURE={c.KD_TEMPERATURE} must be > 0")
        if not 0 <= c.PSEUDO_THRESHOLD <= 1:
            raise ValueError(
                f"CONT.COMFORMER.PSEUDO_THRESHOLD={c.PSEUDO_THRESHOLD} must be a class "
                "probability in [0, 1]"
            )
        self.focal = bool(c.FOCAL)
        self.focal_alpha = float(c.FOCAL_ALPHA)
        self.focal_gamma = float(c.FOCAL_GAMMA)
        self.unbiased_kd = bool(c.UNBIASED_KD)
        self.kd_weight = setting_default(
            "CONT.COMFORMER.KD_WEIGHT", c.KD_WEIGHT, scenario.dataset, scenario.task
        )
        self.kd_reweight = bool(c.KD_REWEIGHT)
        self.kd_aux = bool(c.KD_AUX)
        self.kd_temperature = float(c.KD_TEMPERATURE)
        self.pseudo_labels = bool(c.PSEUDO_LABELS)
        self.pseudo_threshold = float(c.PSEUDO_THRESHOLD)
        self.needs_teacher = self.kd_weight > 0 or self.pseudo_labels

    def class_loss(self) -> Optional[ClassificationLoss]:
        if not self.focal:
            return None
        return ClassificationLoss(
            focal=True, focal_alpha=self.focal_alpha, focal_gamma=self.focal_gamma
        )

    def losses(self, batch: StepBatch) -> Dict[str, torch.Tensor]:
        teacher = batch.teacher
        if teacher is None:  # the base step, or an ablation without distillation and pseudo-labels
            return batch.set_losses(batch.student.outputs, batch.targets)
        targets = batch.targets
        if self.pseudo_labels:
            targets = with_teacher_pseudo_labels(
                targets,
                teacher.outputs,
                batch.images.tensor.shape[-2:],
                kind="mask",
                mask_activation=teacher.mask_activation,
                threshold=self.pseudo_threshold,
            )
        outputs = batch.student.outputs
        losses = batch.set_losses(outputs, targets)
        if self.kd_weight > 0:
            losses["loss_kd"] = self.kd_weight * self._kd(outputs, teacher.outputs)
            if self.kd_aux:
                pairs = zip(outputs.get("aux_outputs", []), teacher.outputs.get("aux_outputs", []))
                for i, (aux, t_aux) in enumerate(pairs):
                    losses[f"loss_kd_{i}"] = self.kd_weight * self._kd(aux, t_aux)
        return losses

    def _kd(self, outputs: Dict, t_outputs: Dict) -> torch.Tensor:
        return distillation_loss(
            outputs["pred_logits"],
            t_outputs["pred_logits"],
            unbiased=self.unbiased_kd,
            temperature=self.kd_temperature,
            reweight=self.kd_reweight,
            reweight_gamma=KD_REWEIGHT_GAMMA,
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, focal={self.focal} (alpha={self.focal_alpha}, "
            f"gamma={self.focal_gamma}), kd_weight={self.kd_weight}, unbiased_kd="
            f"{self.unbiased_kd}, kd_reweight={self.kd_reweight}, kd_aux={self.kd_aux}, "
            f"kd_temperature={self.kd_temperature}, pseudo_labels={self.pseudo_labels} "
            f"(threshold {self.pseudo_threshold})"
        )
