"""Classification and distillation losses shared by the continual methods (MiB, PLOP, CoMFormer).

Shapes: B images, Q queries, K_old classes the teacher knows, K = K_old + K_new classes of the
student. Class logits are laid out [old classes, new classes, no-object] for the student and
[old classes, no-object] for the teacher, so the last entry is always no-object.

Two ideas of MiB (Cermelli et al., CVPR 2020) carry over from pixels to queries:

* at step t the ground truth only shows the new classes, so a query on an old class is trained
  as no-object: the *unbiased cross-entropy* lets no-object stand for "no-object or any old
  class" by summing their probabilities;
* the teacher never saw the new classes, so a query it calls no-object may well be one of them:
  the *unbiased distillation* compares the teacher's no-object with the student's "no-object or
  any new class".
"""

from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "unbiased_ce_log_probs",
    "unbiased_kd_log_probs",
    "old_classes_log_probs",
    "classification_loss",
    "distillation_weights",
    "distillation_loss",
    "ClassificationLoss",
]


def _check_num_old(logits: Tensor, num_old: int) -> None:
    if not 0 <= num_old <= logits.shape[-1] - 1:
        raise ValueError(
            f"num_old={num_old} old classes do not fit logits with {logits.shape[-1] - 1} classes "
            "(+ no-object)"
        )


def unbiased_ce_log_probs(logits: Tensor, num_old: int) -> Tensor:
    """
    MiB's unbiased cross-entropy log-probabilities: no-object absorbs the old classes.

    Args:
        logits: (..., K+1) student logits [old, new, no-object].
        num_old: K_old; 0 gives the ordinary log-softmax.

    Returns:
        (..., K+1) where entry c < K is ``log p_c`` and the no-object entry is
        ``log(p_no-object + sum_{c < K_old} p_c)``. Only the entries of the targets matter: the
        result is no distribution (the old classes are counted twice).
    """
    _check_num_old(logits, num_old)
    log_den = torch.logsumexp(logits, dim=-1, keepdim=True)
    out = logits - log_den
    if num_old == 0:
        return out
    absorbed = torch.cat([logits[..., -1:], logits[..., :num_old]], dim=-1)
    no_object = torch.logsumexp(absorbed, dim=-1, keepdim=True) - log_den
    return torch.cat([out[..., :-1], no_object], dim=-1)


def unbiased_kd_log_probs(logits: Tensor, num_old: int) -> Tensor:
    """
    MiB's unbiased distillation log-probabilities of the student, over the teacher's classes.

    Args:
        logits: (..., K+1) student logits [old, new, no-object].
        num_old: K_old.

    Returns:
        (..., K_old+1): ``log p_c`` for the old classes and ``log(p_no-object + sum_new p_c)``
        for no-object. It is a distribution (the student's mass regrouped).
    """
    _check_num_old(logits, num_old)
    log_den = torch.logsumexp(logits, dim=-1, keepdim=True)
    old = logits[..., :num_old] - log_den
    no_object = torch.logsumexp(logits[..., num_old:], dim=-1, keepdim=True) - log_den
    return torch.cat([old, no_object], dim=-1)


def old_classes_log_probs(logits: Tensor, num_old: int) -> Tensor:
    """
    Plain distillation's student log-probabilities: the new classes are dropped and the softmax
    is taken over [old classes, no-object] only.

    Args:
        logits: (..., K+1) student logits.
        num_old: K_old.

    Returns:
        (..., K_old+1) log-probabilities.
    """
    _check_num_old(logits, num_old)
    kept = torch.cat([logits[..., :num_old], logits[..., -1:]], dim=-1)
    return kept.log_softmax(dim=-1)


def classification_loss(
    logits: Tensor,
    target_classes: Tensor,
    *,
    num_old_absorbed: int = 0,
    class_weight: Optional[Tensor] = None,
    focal_alpha: Optional[float] = None,
    focal_gamma: float = 1.0,
) -> Tensor:
    """
    The criterion's classification loss with the continual options.

    Args:
        logits: (B, Q, K+1) class logits.
        target_classes: (B, Q) int64 targets; unmatched queries target K (no-object).
        num_old_absorbed: > 0: MiB's unbiased cross-entropy with this many old classes absorbed
            into no-object (see :func:`unbiased_ce_log_probs`); 0: the ordinary cross-entropy.
        class_weight: (K+1,) per-class weights of the weighted mean (Mask2Former's
            ``empty_weight``); ignored by the focal loss, which has its own way of discounting
            the many easy no-object queries.
        focal_alpha: not None: the focal loss ``alpha * (1 - p_t)^gamma * CE`` averaged over all
            B*Q queries (CoMFormer); None: the weighted mean ``sum w_t CE / sum w_t``.
        focal_gamma: the focusing exponent.

    Returns:
        scalar loss.
    """
    log_probs = unbiased_ce_log_probs(logits.float(), num_old_absorbed)
    nll = -log_probs.gather(-1, target_classes[..., None])[..., 0]  # (B, Q)
    if focal_alpha is not None:
        p_t = torch.exp(-nll)
        return (focal_alpha * (1 - p_t).pow(focal_gamma) * nll).mean()
    if class_weight is None:
        return nll.mean()
    w = class_weight.to(nll)[target_classes]
    return (w * nll).sum() / w.sum()


def distillation_weights(teacher_probs: Tensor, gamma: float = 2.0) -> Tensor:
    """
    CoMFormer's adaptive weights: a query matters as much as the teacher believes it is an object.

    Args:
        teacher_probs: (..., K_old+1) teacher class probabilities (no-object last).
        gamma: exponent.

    Returns:
        (...) weights ``(1 - p_no-object)^gamma`` in [0, 1].
    """
    return (1 - teacher_probs[..., -1]).clamp(min=0).pow(gamma)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    unbiased: bool = True,
    temperature: float = 1.0,
    reweight: bool = False,
    reweight_gamma: float = 2.0,
) -> Tensor:
    """
    KL divergence from the teacher's class distribution to the student's, query i against query i.

    Args:
        student_logits: (B, Q, K+1) student logits [old, new, no-object].
        teacher_logits: (B, Q, K_old+1) teacher logits [old, no-object].
        unbiased: the student's no-object is "no-object or any new class"
            (:func:`unbiased_kd_log_probs`); otherwise the new classes are dropped and the student
            renormalised over the teacher's classes (:func:`old_classes_log_probs`).
        temperature: the teacher's logits are divided by it before the softmax (> 1 softens its
            distribution; CoMFormer's ``ALPHA`` is ``1 / temperature``). The student is not scaled.
        reweight: weigh each query by :func:`distillation_weights` of the teacher:
            ``sum(w * KL) / sum(w)``; otherwise the mean over all B*Q queries.
        reweight_gamma: the weights' exponent.

    Returns:
        scalar loss; 0 when every weight is 0.
    """
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"distillation: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must agree in every dimension but the classes "
            "(same batch and number of queries)"
        )
    if temperature <= 0:
        raise ValueError(f"KD temperature must be > 0, got {temperature}")
    num_old = teacher_logits.shape[-1] - 1
    if student_logits.shape[-1] - 1 < num_old:
        raise ValueError(
            f"distillation: the student predicts {student_logits.shape[-1] - 1} classes, fewer "
            f"than the teacher's {num_old}"
        )
    student_logits = student_logits.float()
    teacher_log_probs = (teacher_logits.float() / temperature).log_softmax(dim=-1)
    teacher_probs = teacher_log_probs.exp()
    if unbiased:
        student_log_probs = unbiased_kd_log_probs(student_logits, num_old)
    else:
        student_log_probs = old_classes_log_probs(student_logits, num_old)
    kl = (teacher_probs * (teacher_log_probs - student_log_probs)).sum(-1)  # (B, Q)
    if not reweight:
        return kl.mean()
    w = distillation_weights(teacher_probs, reweight_gamma)
    # A batch the teacher calls empty everywhere has nothing to distil: 0, not 0/0.
    return (w * kl).sum() / w.sum().clamp(min=torch.finfo(w.dtype).tiny)


class ClassificationLoss:
    """
    The set criterion's classification loss with the continual options of
    :func:`classification_loss` (MiB's unbiased cross-entropy, CoMFormer's focal loss): passed to
    ``SetCriterion(cfg, class_loss=...)``, which calls it with the logits, the matched target
    classes and its per-class weights. Matching and mask losses stay the criterion's.
    """

    def __init__(
        self,
        *,
        num_old_absorbed: int = 0,
        focal: bool = False,
        focal_alpha: float = 5.0,
        focal_gamma: float = 1.0,
    ):
        """
        Args:
            num_old_absorbed: old classes absorbed into no-object by the unbiased cross-entropy
                (0: ordinary cross-entropy).
            focal: the focal loss instead of the class-weighted cross-entropy.
            focal_alpha, focal_gamma: its factor and exponent.
        """
        if num_old_absorbed < 0:
            raise ValueError(f"num_old_absorbed={num_old_absorbed} must be >= 0")
        if focal and (focal_alpha <= 0 or focal_gamma < 0):
            raise ValueError(
                f"focal loss needs alpha > 0 and gamma >= 0, got alpha={focal_alpha}, "
                f"gamma={focal_gamma}"
            )
        self.num_old_absorbed = num_old_absorbed
        self.focal = focal
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def __call__(self, logits: Tensor, target_classes: Tensor, class_weight: Tensor) -> Tensor:
        return classification_loss(
            logits,
            target_classes,
            num_old_absorbed=self.num_old_absorbed,
            class_weight=class_weight,
            focal_alpha=self.focal_alpha if self.focal else None,
            focal_gamma=self.focal_gamma,
        )

    def __repr__(self) -> str:
        focal = f", focal alpha={self.focal_alpha} gamma={self.focal_gamma}" if self.focal else ""
        return f"ClassificationLoss(num_old_absorbed={self.num_old_absorbed}{focal})"
