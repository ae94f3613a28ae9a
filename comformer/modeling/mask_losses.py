"""Mask losses and their pairwise (matching-cost) forms, shared by the matcher and the criterion.

All functions work on masks already sampled at points: N predicted masks and M target masks, each a
row of P point values. Targets are in [0, 1] (1 = the point belongs to the mask).

The loss forms return a scalar summed over masks and divided by ``num_masks`` (the batch's number of
target masks, so that the loss does not depend on how many masks an image happens to have); the
pairwise forms return an (N, M) matrix with one entry per prediction/target pair.

Two kinds of mask predictions exist:

* sigmoid masks (Mask2Former): each mask is an independent binary classifier, inputs are logits;
* softmax masks (CoMFormer): at every pixel the queries compete, the probabilities of the masks
  of one image sum to 1 over queries; inputs are then probabilities or log-probabilities, already
  normalised across queries by the caller (the normalisation needs all queries, the losses only
  see the matched ones).
"""

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "dice_score",
    "pairwise_dice_score",
    "dice_loss",
    "pairwise_dice_loss",
    "sigmoid_ce_loss",
    "pairwise_sigmoid_ce_loss",
    "softmax_ce_loss",
    "pairwise_softmax_ce_loss",
]


def dice_score(probs: Tensor, targets: Tensor) -> Tensor:
    """
    Smoothed dice coefficient of each prediction with its own target.

    The +1 in numerator and denominator makes an empty prediction of an empty target score 1 and
    keeps the gradient finite when both are (nearly) empty.

    Args:
        probs: (N, P) mask probabilities.
        targets: (N, P) binary targets.

    Returns:
        (N,) ``(2 * sum(p * t) + 1) / (sum(p) + sum(t) + 1)``, in (0, 1].
    """
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return (numerator + 1) / (denominator + 1)


def pairwise_dice_score(probs: Tensor, targets: Tensor) -> Tensor:
    """
    :func:`dice_score` for every prediction/target pair.

    Args:
        probs: (N, P) mask probabilities.
        targets: (M, P) binary targets.

    Returns:
        (N, M) smoothed dice coefficients.
    """
    numerator = 2 * probs @ targets.t()
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return (numerator + 1) / (denominator + 1)


def dice_loss(probs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """
    Dice loss ``1 - dice_score``, summed over masks and divided by ``num_masks``.

    Args:
        probs: (N, P) mask probabilities (``logits.sigmoid()`` for sigmoid masks, the softmax
            across queries for softmax masks).
        targets: (N, P) binary targets.
        num_masks: normaliser.

    Returns:
        scalar loss.
    """
    return (1 - dice_score(probs, targets)).sum() / num_masks


def pairwise_dice_loss(probs: Tensor, targets: Tensor) -> Tensor:
    """
    Args:
        probs: (N, P) mask probabilities.
        targets: (M, P) binary targets.

    Returns:
        (N, M) dice losses ``1 - pairwise_dice_score``.
    """
    return 1 - pairwise_dice_score(probs, targets)


def sigmoid_ce_loss(logits: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """
    Binary cross-entropy of sigmoid masks: mean over points, summed over masks, divided by
    ``num_masks``.

    Args:
        logits: (N, P) mask logits.
        targets: (N, P) binary targets.
        num_masks: normaliser.

    Returns:
        scalar loss.
    """
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def pairwise_sigmoid_ce_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """
    Mean binary cross-entropy over points of every prediction/target pair.

    ``BCE(x, t) = t * softplus(-x) + (1 - t) * softplus(x) = softplus(x) - t * x`` (as
    ``softplus(-x) - softplus(x) = -x``) is linear in ``t``: all pairs come from one matrix product
    and a row sum instead of an (N, M, P) tensor (Mask2Former takes two products and two
    softplus passes; the results agree to float rounding).

    Args:
        logits: (N, P) mask logits.
        targets: (M, P) binary targets.

    Returns:
        (N, M) losses.
    """
    num_points = logits.shape[1]
    # -log(1 - sigmoid(x)), the cost of a point the target does not cover, summed over points
    uncovered = F.softplus(logits).sum(1, keepdim=True)
    return (uncovered - logits @ targets.t()) / num_points


def softmax_ce_loss(log_probs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """
    Pixel-wise cross-entropy of softmax-across-queries masks (CoMFormer).

    A point covered by a target contributes ``-log p`` of the query matched to that target; a point
    no target covers contributes nothing (its term is multiplied by ``t = 0``). As in CoMFormer the
    per-mask sum is divided by the number of points P (not by the covered ones), then masks are
    summed and divided by ``num_masks``.

    Args:
        log_probs: (N, P) log-softmax across queries, at the points, of the matched queries.
        targets: (N, P) binary targets of the matched targets.
        num_masks: normaliser.

    Returns:
        scalar loss.
    """
    return (-log_probs * targets).mean(1).sum() / num_masks


def pairwise_softmax_ce_loss(log_probs: Tensor, targets: Tensor) -> Tensor:
    """
    :func:`softmax_ce_loss` (before the division by ``num_masks``) of every prediction/target pair.

    Args:
        log_probs: (N, P) log-softmax across queries, at the points, of all N queries.
        targets: (M, P) binary targets.

    Returns:
        (N, M) losses ``-sum_p t_jp * log p_ip / P``.
    """
    return -(log_probs @ targets.t()) / log_probs.shape[1]
