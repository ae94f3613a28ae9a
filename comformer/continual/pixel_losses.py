"""MiB's losses on a per-pixel classifier, as published (Cermelli et al., CVPR 2020, and its code,
fcdl94/MiB ``utils/loss.py`` and ``train.py``).

Shapes: B images, H W pixels. Channels (see ``comformer.modeling.per_pixel``): the student's are
[old classes, new classes] plus, on datasets without a background class, a last no-object channel;
the teacher's are [old classes] plus the same no-object channel. ``num_old`` counts the old
classes (the background class included when the dataset has one: Pascal VOC's background is old
from step 1 on). ``background`` is the student's background channel: the background class
(VOC: 0) or the no-object channel (what MiB's background is on ADE20K).

* Unbiased cross-entropy (:func:`pixel_unbiased_ce`): a pixel labelled background may show an old
  class, so its loss is ``-log(p_bg + sum_{c old} p_c)``; other pixels ``-log p_label``.
* Unbiased distillation (:func:`pixel_distillation`): the teacher never saw the new classes, so
  its background is compared with the student's ``p_bg + sum_{c new} p_c``; each old class with
  itself. Per pixel ``-(1 / C_t) sum_c q_c log p~_c`` (a cross-entropy averaged over the teacher's
  C_t channels, as MiB's code), averaged over all B x H x W pixels.
"""

from typing import List

import torch
from torch import Tensor

__all__ = [
    "teacher_channels_in_student",
    "teacher_background_channel",
    "pixel_unbiased_ce",
    "UnbiasedPixelCE",
    "pixel_distillation",
]


def teacher_channels_in_student(num_teacher: int, num_old: int, num_student: int) -> List[int]:
    """
    The student channel of each teacher channel: old class c is c, the teacher's no-object
    channel (its last, when it has ``num_old + 1`` channels) is the student's last.

    Args:
        num_teacher: C_t, ``num_old`` or ``num_old + 1``.
        num_old: old classes.
        num_student: C_s.
    """
    extra = num_teacher - num_old
    if extra not in (0, 1) or num_student - num_teacher < 0:
        raise ValueError(
            f"a teacher with {num_teacher} channels does not fit {num_old} old classes and a "
            f"student with {num_student} channels"
        )
    return list(range(num_old)) + ([num_student - 1] if extra else [])


def teacher_background_channel(background: int, num_old: int, num_teacher: int) -> int:
    """The teacher's channel of the student's ``background`` channel."""
    if background < num_old:
        return background
    if num_teacher != num_old + 1:
        raise ValueError(
            f"the background is the no-object channel {background}, but the teacher has no "
            f"no-object channel ({num_teacher} channels for {num_old} old classes)"
        )
    return num_old


def pixel_unbiased_ce(
    logits: Tensor, labels: Tensor, *, num_old: int, background: int, ignore_value: int = 255
) -> Tensor:
    """
    MiB's unbiased cross-entropy of each pixel.

    Args:
        logits: (B, C_s, H, W) student logits.
        labels: (B, H, W) int64 channel indices, ``ignore_value`` on ignored pixels. A label that
            is an old class counts as background (MiB's ``labels[targets < old_cl] = 0``).
        num_old: old classes (0: the ordinary cross-entropy).
        background: the background channel.
        ignore_value: label of ignored pixels.

    Returns:
        (B, H, W): ``-log(p_bg + sum_{c < num_old, c != bg} p_c)`` on background pixels,
        ``-log p_label`` on the others, 0 on ignored ones.
    """
    logits = logits.float()
    log_den = torch.logsumexp(logits, dim=1)  # (B, H, W)
    ignored = labels == ignore_value
    safe = torch.where(ignored, torch.zeros_like(labels), labels)
    nll = log_den - logits.gather(1, safe[:, None])[:, 0]
    if num_old > 0:
        absorbing = sorted(set(range(num_old)) | {background})
        index = torch.as_tensor(absorbing, device=logits.device)
        nll_bg = log_den - torch.logsumexp(logits.index_select(1, index), dim=1)
        is_bg = (safe == background) | (safe < num_old)
        nll = torch.where(is_bg, nll_bg, nll)
    return nll.masked_fill(ignored, 0.0)


class UnbiasedPixelCE:
    """:func:`pixel_unbiased_ce` as the per-pixel criterion's loss
    (:data:`~comformer.modeling.per_pixel.PixelLoss`)."""

    def __init__(self, *, num_old: int, background: int, ignore_value: int = 255):
        self.num_old = num_old
        self.background = background
        self.ignore_value = ignore_value

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        return pixel_unbiased_ce(
            logits,
            labels,
            num_old=self.num_old,
            background=self.background,
            ignore_value=self.ignore_value,
        )

    def __repr__(self) -> str:
        return f"UnbiasedPixelCE(num_old={self.num_old}, background={self.background})"


def pixel_distillation(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    num_old: int,
    background: int,
    unbiased: bool = True,
    temperature: float = 1.0,
) -> Tensor:
    """
    MiB's distillation of a per-pixel teacher, per pixel and averaged over all pixels.

    Args:
        student_logits: (B, C_s, H, W).
        teacher_logits: (B, C_t, H, W), at the same resolution.
        num_old: old classes.
        background: the student's background channel.
        unbiased: MiB's unbiased distillation (the student's background absorbs the new
            classes); False: MiB's plain one (the student's softmax over the teacher's channels
            only, ``KnowledgeDistillationLoss``).
        temperature: the teacher's logits are divided by it (MiB's ``alpha`` multiplies them:
            ``alpha = 1 / temperature``).

    Returns:
        scalar ``-mean_{pixels} (1 / C_t) sum_c q_c log p~_c``, q the teacher's softmax.
    """
    if student_logits.shape[0] != teacher_logits.shape[0] or (
        student_logits.shape[-2:] != teacher_logits.shape[-2:]
    ):
        raise ValueError(
            f"distillation: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must agree in batch and size"
        )
    if temperature <= 0:
        raise ValueError(f"KD temperature must be > 0, got {temperature}")
    num_teacher, num_student = teacher_logits.shape[1], student_logits.shape[1]
    to_student = teacher_channels_in_student(num_teacher, num_old, num_student)
    index = torch.as_tensor(to_student, device=student_logits.device)
    student_logits = student_logits.float()
    teacher_probs = (teacher_logits.float() / temperature).softmax(dim=1)
    if unbiased:
        log_den = torch.logsumexp(student_logits, dim=1, keepdim=True)
        log_probs = student_logits.index_select(1, index) - log_den
        t_bg = teacher_background_channel(background, num_old, num_teacher)
        new = [c for c in range(num_student) if c not in set(to_student)]
        absorbing = torch.as_tensor([background] + new, device=student_logits.device)
        log_bg = torch.logsumexp(student_logits.index_select(1, absorbing), dim=1) - log_den[:, 0]
        log_probs = torch.cat(
            [log_probs[:, :t_bg], log_bg[:, None], log_probs[:, t_bg + 1 :]], dim=1
        )
    else:
        log_probs = student_logits.index_select(1, index).log_softmax(dim=1)
    return -(teacher_probs * log_probs).sum(dim=1).mean() / num_teacher
