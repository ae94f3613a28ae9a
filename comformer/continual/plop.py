"""PLOP (Douillard et al., CVPR 2021) on Mask2Former, as the CoMFormer paper ran it.

* Local POD: the student's intermediate features are kept close to the teacher's after pooling
  over windows (:func:`local_pod_embedding`), on the backbone stages and the pixel decoder's mask
  features (``CONT.PLOP.POD_FEATURES``), weighted by ``POD_WEIGHT * sqrt(new / all classes)``.
* Pseudo-labels of the old classes from the teacher (``CONT.PLOP.PSEUDO_LABELS``): CoMFormer's
  mask-based ones ("mask", the default), or PLOP's own entropy-based ones ("entropy"), or none.

The classification and mask losses are the model's criterion, unchanged.
"""

import math
from typing import Dict, List, Sequence

import torch
from torch import Tensor

from .method import METHOD_REGISTRY, ContinualMethod, Prediction, StepBatch
from .pseudo_labels import with_teacher_pseudo_labels

__all__ = ["PLOP", "local_pod_embedding", "pod_loss", "PSEUDO_LABEL_KINDS", "MASK_FEATURES"]

PSEUDO_LABEL_KINDS = ("mask", "entropy", "none")
# Name of the pixel decoder's per-pixel embeddings in POD_FEATURES; read from the prediction dict
# (the head returns them as outputs["mask_features"]), the other names from the backbone features.
MASK_FEATURES = "mask_features"


def local_pod_embedding(x: Tensor, scales: Sequence[int] = (1, 2, 4)) -> Tensor:
    """
    Local POD embedding of a feature map.

    At scale s the map is cut into s x s windows of ``H // s`` x ``W // s`` cells (the last rows
    and columns that do not fill a window are left out, as in PLOP); each window is averaged
    along its width (one value per channel and row) and along its height (one per channel and
    column). A scale whose windows would be empty (H < s or W < s) is skipped.

    Args:
        x: (B, C, H, W) features.
        scales: window grid sizes.

    Returns:
        (B, D) with ``D = C * sum_s s * s * (H // s + W // s)`` over the scales used.
    """
    b, c, height, width = x.shape
    parts = []
    for s in scales:
        kh, kw = height // s, width // s
        if kh == 0 or kw == 0:
            continue
        windows = x[:, :, : s * kh, : s * kw].reshape(b, c, s, kh, s, kw)
        parts.append(windows.mean(dim=5).flatten(1))  # (B, C, s, kh, s): pooled along width
        parts.append(windows.mean(dim=3).flatten(1))  # (B, C, s, s, kw): pooled along height
    if not parts:
        raise ValueError(
            f"local POD: a {height}x{width} feature map is smaller than every scale {list(scales)}"
        )
    return torch.cat(parts, dim=1)


def pod_loss(
    student: Sequence[Tensor], teacher: Sequence[Tensor], scales: Sequence[int] = (1, 2, 4)
) -> Tensor:
    """
    Local POD distillation: the L2 norm of the difference between the student's and the teacher's
    embeddings, per image, averaged over images and feature maps.

    Args:
        student: F feature maps (B, C_f, H_f, W_f).
        teacher: the teacher's F feature maps of the same shapes.
        scales: window grid sizes of :func:`local_pod_embedding`.

    Returns:
        scalar loss.
    """
    if len(student) != len(teacher) or not student:
        raise ValueError(
            f"POD needs the same non-zero number of student and teacher feature maps, got "
            f"{len(student)} and {len(teacher)}"
        )
    per_map = []
    for s, t in zip(student, teacher):
        if s.shape != t.shape:
            raise ValueError(f"POD: student {tuple(s.shape)} and teacher {tuple(t.shape)} differ")
        diff = local_pod_embedding(s.float(), scales) - local_pod_embedding(t.float(), scales)
        per_map.append(diff.norm(dim=1))  # (B,)
    return torch.stack(per_map).mean()


@METHOD_REGISTRY.register()
class PLOP(ContinualMethod):
    """PLOP: local POD on backbone and pixel-decoder features, plus pseudo-labels."""

    needs_teacher = True
    reasons_about_old_classes = True

    def __init__(self, cfg, scenario, step: int):
        super().__init__(cfg, scenario, step)
        p = cfg.CONT.PLOP
        if p.POD_WEIGHT < 0:
            raise ValueError(f"CONT.PLOP.POD_WEIGHT={p.POD_WEIGHT} must be >= 0 (0: no POD)")
        if p.PSEUDO_LABELS not in PSEUDO_LABEL_KINDS:
            raise ValueError(
                f"CONT.PLOP.PSEUDO_LABELS={p.PSEUDO_LABELS!r}; valid: "
                f"{', '.join(PSEUDO_LABEL_KINDS)}"
            )
        if not p.POD_SCALES or any(int(s) < 1 for s in p.POD_SCALES):
            raise ValueError(f"CONT.PLOP.POD_SCALES={list(p.POD_SCALES)} must be integers >= 1")
        if p.POD_WEIGHT > 0 and not p.POD_FEATURES:
            raise ValueError("CONT.PLOP.POD_FEATURES is empty while CONT.PLOP.POD_WEIGHT > 0")
        if not 0 <= p.PSEUDO_THRESHOLD <= 1:
            raise ValueError(f"CONT.PLOP.PSEUDO_THRESHOLD={p.PSEUDO_THRESHOLD} must be in [0, 1]")
        if not 0 <= p.ENTROPY_THRESHOLD <= 1:
            raise ValueError(
                f"CONT.PLOP.ENTROPY_THRESHOLD={p.ENTROPY_THRESHOLD} must be a normalised entropy "
                "in [0, 1]"
            )
        self.pod_features = list(p.POD_FEATURES)
        self.pod_scales = [int(s) for s in p.POD_SCALES]
        self.pseudo_labels = p.PSEUDO_LABELS
        self.pseudo_threshold = float(p.PSEUDO_THRESHOLD)
        self.entropy_threshold = float(p.ENTROPY_THRESHOLD)
        num_all = self.num_old + self.num_new
        # PLOP scales POD by the share of new classes: small steps perturb the features less.
        self.pod_weight = float(p.POD_WEIGHT) * math.sqrt(self.num_new / num_all)
        self.needs_teacher = self.pod_weight > 0 or self.pseudo_labels != "none"

    def losses(self, batch: StepBatch) -> Dict[str, torch.Tensor]:
        teacher = batch.teacher
        if teacher is None:  # the base step, or an ablation without POD and pseudo-labels
            return batch.set_losses(batch.student.outputs, batch.targets)
        targets = batch.targets
        if self.pseudo_labels != "none":
            targets = with_teacher_pseudo_labels(
                targets,
                teacher.outputs,
                batch.images.tensor.shape[-2:],
                kind=self.pseudo_labels,
                mask_activation=teacher.mask_activation,
                threshold=(
                    self.pseudo_threshold
                    if self.pseudo_labels == "mask"
                    else self.entropy_threshold
                ),
            )
        losses = batch.set_losses(batch.student.outputs, targets)
        if self.pod_weight > 0:
            student = self._pod_inputs(batch.student, "student")
            teacher_maps = self._pod_inputs(teacher, "teacher")
            losses["loss_pod"] = self.pod_weight * pod_loss(student, teacher_maps, self.pod_scales)
        return losses

    def _pod_inputs(self, prediction: Prediction, who: str) -> List[Tensor]:
        features, outputs = prediction.features, prediction.outputs
        maps = []
        for name in self.pod_features:
            source = outputs if name == MASK_FEATURES else features
            if name not in source:
                where = (
                    "the prediction dict (the head must return outputs['mask_features'])"
                    if name == MASK_FEATURES
                    else f"the backbone features ({', '.join(sorted(features))})"
                )
                raise KeyError(f"CONT.PLOP.POD_FEATURES: {name!r} is not in the {who}'s {where}")
            maps.append(source[name])
        return maps

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, pod_weight={self.pod_weight:.3g} on {self.pod_features} "
            f"(scales {self.pod_scales}), pseudo_labels={self.pseudo_labels!r}"
        )
