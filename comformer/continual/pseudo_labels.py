"""Pseudo-labels of the old classes from the teacher, added to the step's ground truth.

At step t the ground truth only shows the new classes; the old classes in the images are
unlabelled, and without pseudo-labels the student learns to call them no-object. The teacher's
confident segments of old classes, outside the ground-truth pixels, become extra targets that
join the ground truth before matching.

Shapes: B images, Q queries, K_old teacher classes (+1 no-object), (h, w) the mask-prediction
size, (H, W) the padded image size of the targets, n pseudo segments.
"""

import math
from typing import Dict, List, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

from ..modeling.inference import mask_probabilities
from ..utils.timing import timed_function

__all__ = [
    "covered_by_targets",
    "per_class_median",
    "mask_pseudo_labels",
    "entropy_pseudo_labels",
    "add_pseudo_labels",
    "with_teacher_pseudo_labels",
]

PseudoLabels = List[Tuple[Tensor, Tensor]]


@timed_function("pseudo-labels")
def covered_by_targets(targets: List[Dict[str, Tensor]], size: Tuple[int, int]) -> Tensor:
    """
    Pixels of each image covered by some ground-truth segment.

    Args:
        targets: B dicts with "masks" (N_b, H, W).
        size: (H, W), the padded image size the targets must have.

    Returns:
        (B, H, W) bool.
    """
    covered = []
    for i, t in enumerate(targets):
        masks = t["masks"]
        if tuple(masks.shape[-2:]) != tuple(size):
            raise ValueError(
                f"pseudo-labels: targets[{i}]['masks'] is {tuple(masks.shape[-2:])}, expected the "
                f"padded image size {tuple(size)}"
            )
        covered.append(masks.bool().any(0))
    return torch.stack(covered)


def _split_per_image(
    batch_idx: Tensor, labels: Tensor, masks: Tensor, num_images: int
) -> PseudoLabels:
    """Group the n selected segments (sorted by image) into one (labels, masks) pair per image."""
    counts = torch.bincount(batch_idx, minlength=num_images).tolist()  # one host sync
    return list(zip(labels.split(counts), masks.split(counts)))


@torch.no_grad()
@timed_function("pseudo-labels")
def mask_pseudo_labels(
    pred_logits: Tensor,
    pred_masks: Tensor,
    covered: Tensor,
    *,
    mask_activation: str,
    score_threshold: float = 0.0,
    mask_threshold: float = 0.5,
) -> PseudoLabels:
    """
    CoMFormer's mask-based pseudo-labels.

    Per query: score = its highest class probability, label = that class; queries whose label is
    no-object or whose score is below ``score_threshold`` are dropped. The mask logits are
    upsampled to the image size and normalised (a softmax across ALL queries for softmax masks,
    before any is dropped). Each pixel not covered by the ground truth goes to the kept query
    maximising score x mask probability. A query becomes a pseudo segment when the pixels it wins
    that also lie in its binarised mask (probability >= ``mask_threshold``) are not empty, and it
    wins more than half of its binarised area; the segment is those pixels, with the query's label.

    All images and queries are processed at once; the (B, Q, H, W) probabilities are the largest
    tensor (as in inference).

    Args:
        pred_logits: (B, Q, K_old+1) teacher class logits.
        pred_masks: (B, Q, h, w) teacher mask logits.
        covered: (B, H, W) bool, pixels of ground-truth segments (see :func:`covered_by_targets`).
        mask_activation: the teacher's, "sigmoid" or "softmax".
        score_threshold: minimum class score of a query.
        mask_threshold: probability that binarises a mask.

    Returns:
        B pairs (labels (n_b,) int64 teacher class indices, masks (n_b, H, W) bool).
    """
    num_images, num_queries = pred_logits.shape[:2]
    size = covered.shape[-2:]
    masks = F.interpolate(pred_masks.float(), size=size, mode="bilinear", align_corners=False)
    probs = mask_probabilities(masks, mask_activation, query_dim=1)  # (B, Q, H, W)
    del masks
    scores, labels = pred_logits.float().softmax(-1).max(-1)  # (B, Q)
    no_object = pred_logits.shape[-1] - 1
    keep = (labels != no_object) & (scores >= score_threshold)

    binarised = probs >= mask_threshold
    # int32 sums: bool -> int64 conversion of the whole (B, Q, H, W) stack costs more than the sum
    bin_area = binarised.flatten(2).sum(-1, dtype=torch.int32)  # (B, Q)
    # The competition between queries: kept queries score >= 0, dropped ones -1 never win.
    weighted = probs.mul_(scores[:, :, None, None])
    weighted[~keep] = -1.0  # whole (H, W) planes: cheaper than a broadcast masked_fill
    # max(dim).indices is argmax (the first maximal index on ties, as documented for both), and
    # on CPU about 2-3x faster along a strided dimension.
    winner = weighted.max(1).indices  # (B, H, W)
    del weighted, probs
    assignable = keep.any(1)[:, None, None] & ~covered  # (B, H, W)
    winner_bin = binarised.gather(1, winner[:, None])[:, 0] & assignable
    del binarised

    # Per-query areas by counting winners: no (B, Q, H, W) comparison is formed.
    flat_winner = (
        winner + torch.arange(num_images, device=winner.device)[:, None, None] * num_queries
    )
    won_area = torch.bincount(flat_winner[assignable], minlength=num_images * num_queries)
    won_in_bin = torch.bincount(flat_winner[winner_bin], minlength=num_images * num_queries)
    won_area = won_area.view(num_images, num_queries)
    won_in_bin = won_in_bin.view(num_images, num_queries)
    selected = keep & (won_in_bin > 0) & (2 * won_area > bin_area)

    batch_idx, query_idx = selected.nonzero(as_tuple=True)  # sorted by image
    # A query's segment: the pixels it wins inside its own binarised mask (where it wins, its
    # mask is the winner's, so winner_bin already holds that test).
    taken_by = torch.where(winner_bin, winner, torch.full_like(winner, -1))
    seg_masks = taken_by[batch_idx] == query_idx[:, None, None]
    return _split_per_image(batch_idx, labels[batch_idx, query_idx], seg_masks, num_images)


def per_class_median(values: Tensor, classes: Tensor, num_classes: int) -> Tensor:
    """
    Lower median of ``values`` (in [0, 1]) within each class, vectorised by one sort.

    Args:
        values: (n,) values in [0, 1].
        classes: (n,) int64 class of each value, in [0, num_classes).

    Returns:
        (num_classes,) medians; +inf for classes without values.
    """
    medians = values.new_full((num_classes,), float("inf"))
    if values.numel() == 0:
        return medians
    # Sorting class + value/2 orders by class, then by value within the class.
    order = torch.argsort(classes.double() + values.double().clamp(0, 1) / 2)
    sorted_values = values[order]
    counts = torch.bincount(classes, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    present = counts > 0
    medians[present] = sorted_values[(starts + (counts - 1) // 2)[present]]
    return medians


@torch.no_grad()
@timed_function("pseudo-labels")
def entropy_pseudo_labels(
    pred_logits: Tensor,
    pred_masks: Tensor,
    covered: Tensor,
    *,
    mask_activation: str,
    base_threshold: float = 0.001,
) -> PseudoLabels:
    """
    PLOP's entropy-based pseudo-labels, on the teacher's per-pixel class distribution.

    The teacher's per-pixel distribution over [old classes, no-object] is
    ``p(c | x) = sum_q p_q(c) m_q(x)`` (normalised over classes; exact for softmax masks). A pixel
    outside the ground truth whose most likely class c is an old class is pseudo-labelled c when
    its normalised entropy ``H(p) / log(K_old + 1)`` is below the threshold of c: the median
    normalised entropy of the batch's candidate pixels of class c, but at least
    ``base_threshold`` (PLOP computes the medians once over the step's dataset; here they come
    from the batch, which needs no pass over the data before training). Uncertain pixels stay
    unlabelled. Each image gets one pseudo segment per old class with confident pixels.

    Args:
        pred_logits: (B, Q, K_old+1) teacher class logits.
        pred_masks: (B, Q, h, w) teacher mask logits.
        covered: (B, H, W) bool, pixels of ground-truth segments.
        mask_activation: the teacher's, "sigmoid" or "softmax".
        base_threshold: the lowest per-class entropy threshold.

    Returns:
        B pairs (labels (n_b,) int64, masks (n_b, H, W) bool).
    """
    num_images = pred_logits.shape[0]
    num_labels = pred_logits.shape[-1]  # K_old + 1, no-object last
    size = covered.shape[-2:]
    masks = F.interpolate(pred_masks.float(), size=size, mode="bilinear", align_corners=False)
    probs = mask_probabilities(masks, mask_activation, query_dim=1)
    del masks
    cls_probs = pred_logits.float().softmax(-1)
    pixel_probs = torch.einsum("bqc,bqhw->bchw", cls_probs, probs)
    del probs
    pixel_probs = pixel_probs / pixel_probs.sum(1, keepdim=True).clamp(min=1e-12)
    entropy = -(pixel_probs * pixel_probs.clamp(min=1e-12).log()).sum(1)
    entropy = entropy / math.log(num_labels)  # (B, H, W) in [0, 1]
    pixel_label = pixel_probs.max(1).indices  # (B, H, W), = argmax(1), faster (see above)
    del pixel_probs

    candidate = ~covered & (pixel_label != num_labels - 1)
    thresholds = per_class_median(entropy[candidate], pixel_label[candidate], num_labels)
    thresholds = thresholds.clamp(min=base_threshold)
    confident = candidate & (entropy < thresholds[pixel_label])

    # One segment per (image, class) with confident pixels.
    label_map = torch.where(confident, pixel_label, torch.full_like(pixel_label, num_labels - 1))
    flat = label_map + torch.arange(num_images, device=label_map.device)[:, None, None] * num_labels
    present = torch.bincount(flat[confident], minlength=num_images * num_labels)
    present = present.view(num_images, num_labels) > 0
    batch_idx, class_idx = present.nonzero(as_tuple=True)
    seg_masks = (label_map[batch_idx] == class_idx[:, None, None]) & confident[batch_idx]
    return _split_per_image(batch_idx, class_idx, seg_masks, num_images)


@timed_function("pseudo-labels")
def add_pseudo_labels(
    targets: List[Dict[str, Tensor]], pseudo: PseudoLabels
) -> List[Dict[str, Tensor]]:
    """
    Ground truth plus pseudo segments, as new target dicts (the inputs are not modified).

    Args:
        targets: B dicts {"labels" (N_b,), "masks" (N_b, H, W)}.
        pseudo: B pairs (labels (n_b,), masks (n_b, H, W)).

    Returns:
        B dicts {"labels" (N_b + n_b,), "masks" (N_b + n_b, H, W)} with the targets' dtypes.
    """
    if len(targets) != len(pseudo):
        raise ValueError(f"{len(pseudo)} pseudo-label sets for {len(targets)} images")
    out = []
    for t, (labels, masks) in zip(targets, pseudo):
        merged = dict(t)
        merged["labels"] = torch.cat([t["labels"], labels.to(t["labels"])])
        merged["masks"] = torch.cat([t["masks"], masks.to(t["masks"])])
        out.append(merged)
    return out


def with_teacher_pseudo_labels(
    targets: List[Dict[str, Tensor]],
    t_outputs: Dict,
    image_size: Tuple[int, int],
    *,
    kind: str,
    mask_activation: str,
    threshold: float,
) -> List[Dict[str, Tensor]]:
    """
    Ground truth plus the teacher's pseudo segments on the pixels no target covers.

    Args:
        targets: B dicts {"labels", "masks"} of the step's ground truth.
        t_outputs: the teacher's predictions ("pred_logits", "pred_masks").
        image_size: (H, W) of the padded batch.
        kind: "mask" (:func:`mask_pseudo_labels`, ``threshold`` is the score threshold) or
            "entropy" (:func:`entropy_pseudo_labels`, ``threshold`` is the base threshold).
        mask_activation: the teacher's mask activation.
        threshold: see ``kind``.

    Returns:
        the targets with the pseudo segments appended (:func:`add_pseudo_labels`).
    """
    covered = covered_by_targets(targets, image_size)
    args = (t_outputs["pred_logits"], t_outputs["pred_masks"], covered)
    if kind == "mask":
        pseudo = mask_pseudo_labels(
            *args, mask_activation=mask_activation, score_threshold=threshold
        )
    elif kind == "entropy":
        pseudo = entropy_pseudo_labels(
            *args, mask_activation=mask_activation, base_threshold=threshold
        )
    else:
        raise ValueError(f"pseudo-label kind {kind!r}; valid: mask, entropy")
    return add_pseudo_labels(targets, pseudo)
