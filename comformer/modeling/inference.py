"""Turning one image's query predictions into semantic, panoptic and instance outputs.

Shapes: Q queries, K classes (no-object excluded, so class logits have K+1 entries), H W the output size.

Masks are normalised in one of two ways, chosen by ``mask_activation``:
- "sigmoid" (Mask2Former): each query's mask is an independent per-pixel probability;
- "softmax" (CoMFormer): a softmax across queries at every pixel, so the queries compete for pixels.
"""

from typing import Dict, List, Tuple

import torch
from torch.nn import functional as F

from detectron2.structures import Boxes, Instances

__all__ = [
    "MASK_ACTIVATIONS",
    "CLASS_ACTIVATIONS",
    "class_probabilities",
    "mask_probabilities",
    "semantic_from_segments",
    "semantic_inference",
    "semantic_inference_with_background",
    "panoptic_inference",
    "panoptic_inference_reference",
    "instance_inference",
]

MASK_ACTIVATIONS = ("sigmoid", "softmax")
CLASS_ACTIVATIONS = ("softmax", "sigmoid")


def class_probabilities(mask_cls: torch.Tensor, activation: str = "softmax") -> torch.Tensor:
    """
    Args:
        mask_cls: (..., K+1) class logits, no-object last.
        activation: "softmax" over the K+1 entries (Mask2Former) or "sigmoid" per entry (a
            classifier trained with per-class binary losses, ECLIPSE's).
    Returns:
        (..., K+1) scores.
    """
    if activation == "softmax":
        return F.softmax(mask_cls, dim=-1)
    if activation == "sigmoid":
        return mask_cls.sigmoid()
    raise ValueError(
        f"MODEL.MASK_FORMER.CLASS_ACTIVATION={activation!r} is not valid; valid values: "
        f"{', '.join(CLASS_ACTIVATIONS)}"
    )


def mask_probabilities(
    mask_logits: torch.Tensor, activation: str, query_dim: int = 0
) -> torch.Tensor:
    """
    Args:
        mask_logits: mask logits with queries along ``query_dim``.
        activation: "sigmoid" or "softmax" (across queries).
        query_dim: the query dimension (used by "softmax" only).
    Returns:
        mask probabilities of the same shape.
    """
    if activation == "sigmoid":
        return mask_logits.sigmoid()
    if activation == "softmax":
        return mask_logits.softmax(dim=query_dim)
    raise ValueError(f"mask activation {activation!r} is not one of {MASK_ACTIVATIONS}")


def semantic_inference(
    mask_cls: torch.Tensor, mask_pred: torch.Tensor, mask_activation: str = "sigmoid"
) -> torch.Tensor:
    """
    Args:
        mask_cls: (Q, K+1) class logits.
        mask_pred: (Q, H, W) mask logits.
    Returns:
        (K, H, W) per-class scores: class probability times mask probability, summed over queries.
    """
    cls_prob = F.softmax(mask_cls, dim=-1)[:, :-1]
    mask_prob = mask_probabilities(mask_pred, mask_activation)
    return torch.einsum("qc,qhw->chw", cls_prob, mask_prob)


def panoptic_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    *,
    thing_ids: set,
    object_mask_threshold: float,
    overlap_threshold: float,
    mask_activation: str = "sigmoid",
    class_activation: str = "softmax",
) -> Tuple[torch.Tensor, List[Dict]]:
    """
    Panoptic segmentation of one image from its query predictions, with the output of
    :func:`panoptic_inference_reference` (same ids, categories, map and ``segments_info`` order),
    but all queries at once: per-query areas come from counting the per-pixel winners, and the
    segment ids (stuff queries of one class share the first one's) from comparing classes. The
    only host syncs are the final ``tolist`` calls.

    Args:
        mask_cls: (Q, K+1) class logits.
        mask_pred: (Q, H, W) mask logits.
        thing_ids: contiguous class ids that are things; the others are stuff (one segment per class).
        object_mask_threshold: queries whose best class probability is not above this are dropped,
            as are queries whose best class is no-object.
        overlap_threshold: a query keeps its segment only if the pixels it wins are at least this
            fraction of its own binarised mask (prob >= 0.5).
        mask_activation: "sigmoid" or "softmax" (across all Q queries, before any is dropped).
        class_activation: class scores, see :func:`class_probabilities`.
    Returns:
        panoptic_seg: (H, W) int32, 0 = void, segment ids 1..S.
        segments_info: S dicts with ``id``, ``category_id`` (contiguous), ``isthing``.
    """
    device = mask_pred.device
    num_classes = mask_cls.shape[-1] - 1
    scores, labels = class_probabilities(mask_cls, class_activation).max(-1)
    mask_prob = mask_probabilities(mask_pred, mask_activation)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], mask_prob[keep]

    h, w = mask_pred.shape[-2:]
    n = cur_masks.shape[0]
    if n == 0:
        return torch.zeros((h, w), dtype=torch.int32, device=device), []

    # max(0).indices is the reference's argmax(0) (the first maximal index on ties, as both are
    # documented), and on CPU several times faster along a strided dimension.
    winner = (cur_scores.view(-1, 1, 1) * cur_masks).max(0).indices  # (H, W)
    # A pixel joins its winner's segment only inside the winner's binarised mask.
    in_winner_mask = cur_masks.gather(0, winner[None])[0] >= 0.5
    won_area = torch.bincount(winner.flatten(), minlength=n)
    segment_area = torch.bincount(winner[in_winner_mask], minlength=n)
    original_area = (cur_masks >= 0.5).flatten(1).sum(1)
    # Float64 division, as the reference's Python int / int.
    accepted = (
        (won_area > 0)
        & (original_area > 0)
        & (segment_area > 0)
        & (won_area.double() / original_area.clamp(min=1).double() >= overlap_threshold)
    )

    is_thing_class = torch.zeros(num_classes + 1, dtype=torch.bool, device=device)
    thing_list = [int(c) for c in thing_ids if 0 <= int(c) < num_classes]
    if thing_list:
        is_thing_class[torch.as_tensor(thing_list, device=device)] = True
    is_thing = is_thing_class[cur_classes]
    # Accepted stuff queries of one class form one segment, numbered at the first of them; every
    # accepted thing query is a segment of its own. first[i]: the accepted query whose segment
    # query i joins (itself for things and for the first query of a stuff class).
    index = torch.arange(n, device=device)
    same_segment = (
        accepted[None, :]
        & ~is_thing[None, :]
        & ~is_thing[:, None]
        & (cur_classes[None, :] == cur_classes[:, None])
    )
    same_segment |= torch.eye(n, dtype=torch.bool, device=device)
    # argmax returns the first maximal index: the earliest accepted query of the same class.
    first = torch.where(is_thing, index, same_segment.int().argmax(1))
    starts = accepted & (first == index)
    segment_id = torch.cumsum(starts, 0)[first]  # (n,), 1-based for accepted queries
    id_of_query = torch.where(accepted, segment_id, torch.zeros_like(segment_id)).to(torch.int32)
    panoptic_seg = torch.where(in_winner_mask, id_of_query[winner], 0).to(torch.int32)

    new_ids = segment_id[starts].tolist()
    new_classes = cur_classes[starts].tolist()
    new_things = is_thing[starts].tolist()
    segments_info = [
        {"id": i, "isthing": t, "category_id": c}
        for i, c, t in zip(new_ids, new_classes, new_things)
    ]
    return panoptic_seg, segments_info


def panoptic_inference_reference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    *,
    thing_ids: set,
    object_mask_threshold: float,
    overlap_threshold: float,
    mask_activation: str = "sigmoid",
) -> Tuple[torch.Tensor, List[Dict]]:
    """
    The straightforward form of :func:`panoptic_inference`, one query at a time; it defines the
    output, and the vectorised version is tested against it.

    Args:
        mask_cls: (Q, K+1) class logits.
        mask_pred: (Q, H, W) mask logits.
        thing_ids: contiguous class ids that are things; the others are stuff (one segment per class).
        object_mask_threshold: queries whose best class probability is not above this are dropped,
            as are queries whose best class is no-object.
        overlap_threshold: a query keeps its segment only if the pixels it wins are at least this
            fraction of its own binarised mask (prob >= 0.5).
        mask_activation: "sigmoid" or "softmax" (across all Q queries, before any is dropped).
    Returns:
        panoptic_seg: (H, W) int32, 0 = void, segment ids 1..S.
        segments_info: S dicts with ``id``, ``category_id`` (contiguous), ``isthing``.
    """
    num_classes = mask_cls.shape[-1] - 1
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
    mask_prob = mask_probabilities(mask_pred, mask_activation)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], mask_prob[keep]

    h, w = mask_pred.shape[-2:]
    panoptic_seg = torch.zeros((h, w), dtype=torch.int32, device=mask_pred.device)
    segments_info: List[Dict] = []
    if cur_masks.shape[0] == 0:
        return panoptic_seg, segments_info

    # Each pixel goes to the query with the highest score-weighted mask probability.
    cur_mask_ids = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
    stuff_segment_of_class: Dict[int, int] = {}
    for k, pred_class in enumerate(cur_classes.tolist()):
        isthing = pred_class in thing_ids
        binary = cur_masks[k] >= 0.5
        won = cur_mask_ids == k
        won_area = int(won.sum())
        original_area = int(binary.sum())
        mask = won & binary
        if won_area == 0 or original_area == 0 or not bool(mask.any()):
            continue
        if won_area / original_area < overlap_threshold:
            continue
        if not isthing and pred_class in stuff_segment_of_class:
            # Stuff is amorphous: a second query of the same stuff class extends its segment.
            panoptic_seg[mask] = stuff_segment_of_class[pred_class]
            continue
        segment_id = len(segments_info) + 1
        if not isthing:
            stuff_segment_of_class[pred_class] = segment_id
        panoptic_seg[mask] = segment_id
        segments_info.append(
            {"id": segment_id, "isthing": bool(isthing), "category_id": pred_class}
        )
    return panoptic_seg, segments_info


def instance_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    *,
    image_size: Tuple[int, int],
    topk: int,
    thing_ids: set,
    panoptic_on: bool,
    mask_activation: str = "sigmoid",
    class_activation: str = "softmax",
) -> Instances:
    """
    Args:
        mask_cls: (Q, K+1) class logits.
        mask_pred: (Q, H, W) mask logits.
        image_size: (H, W).
        topk: number of (query, class) pairs kept.
        thing_ids: contiguous ids of thing classes.
        panoptic_on: if True only thing classes are kept (stuff belongs to the panoptic output).
        class_activation: class scores, see :func:`class_probabilities`.
    Returns:
        Instances with pred_masks (N, H, W) float, pred_boxes (zeros: masks only), scores, pred_classes.
    """
    num_queries, num_classes = mask_cls.shape[0], mask_cls.shape[1] - 1
    scores = class_probabilities(mask_cls, class_activation)[:, :-1]
    labels = torch.arange(num_classes, device=mask_cls.device).repeat(num_queries)
    scores_per_image, topk_indices = scores.flatten().topk(min(topk, scores.numel()), sorted=False)
    labels_per_image = labels[topk_indices]
    query_indices = topk_indices // num_classes
    # The activation is applied to all Q masks first: "softmax" normalises across queries.
    mask_prob = mask_probabilities(mask_pred, mask_activation)[query_indices]
    mask_logits = mask_pred[query_indices]
    if panoptic_on:
        is_thing = torch.tensor(
            [int(c) in thing_ids for c in labels_per_image.tolist()],
            dtype=torch.bool,
            device=mask_cls.device,
        )
        scores_per_image = scores_per_image[is_thing]
        labels_per_image = labels_per_image[is_thing]
        mask_prob = mask_prob[is_thing]
        mask_logits = mask_logits[is_thing]

    result = Instances(image_size)
    if mask_activation == "sigmoid":
        # Mask2Former binarises the logits (> 0), which is not quite probability >= 0.5: a logit
        # of exactly 0, or a slightly negative one whose sigmoid rounds to 0.5, is not kept.
        binary = (mask_logits > 0).float()
    else:
        binary = (mask_prob >= 0.5).float()
    result.pred_masks = binary
    result.pred_boxes = Boxes(torch.zeros(binary.shape[0], 4, device=binary.device))
    # Rescore by the mean mask probability inside the binarised mask, as Mask2Former does.
    mask_scores = (mask_prob * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    result.scores = scores_per_image * mask_scores
    result.pred_classes = labels_per_image
    return result


def semantic_inference_with_background(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    *,
    background_class: int,
    object_mask_threshold: float,
    overlap_threshold: float,
    mask_activation: str = "sigmoid",
    class_activation: str = "softmax",
) -> torch.Tensor:
    """
    Semantic segmentation for a dataset with a background class that the model does not predict
    (it is no-object), as CoMFormer's code infers on such datasets: the segments of
    :func:`panoptic_inference` (same thresholds) give their pixels their class; every other pixel
    is background.

    Args:
        mask_cls: (Q, K+1) class logits; entry ``background_class`` is never chosen in practice
            (the model has no such class: its logit is -inf).
        mask_pred: (Q, H, W) mask logits.
        background_class: the class of pixels no segment covers, in [0, K).
        object_mask_threshold, overlap_threshold, mask_activation, class_activation: as
            :func:`panoptic_inference`.

    Returns:
        (K, H, W) one-hot scores.
    """
    num_classes = mask_cls.shape[-1] - 1
    if not 0 <= background_class < num_classes:
        raise ValueError(f"background_class={background_class} is not in [0, {num_classes})")
    return semantic_from_segments(
        mask_cls,
        mask_pred,
        uncovered_class=background_class,
        object_mask_threshold=object_mask_threshold,
        overlap_threshold=overlap_threshold,
        mask_activation=mask_activation,
        class_activation=class_activation,
    )


def semantic_from_segments(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    *,
    uncovered_class: int = -1,
    object_mask_threshold: float,
    overlap_threshold: float,
    mask_activation: str = "sigmoid",
    class_activation: str = "softmax",
) -> torch.Tensor:
    """
    Semantic segmentation from the segments of :func:`panoptic_inference` (same thresholds): each
    pixel of a segment gets the segment's class. With sigmoid class scores this is how
    clovaai/ECLIPSE infers semantic segmentation (``MaskFormer.semantic_inference`` without
    ``MASK_BG``): the no-object score must lose for a query to count, which is what its logit
    manipulation acts on.

    Args:
        mask_cls: (Q, K+1) class logits.
        mask_pred: (Q, H, W) mask logits.
        uncovered_class: the class of pixels no segment covers; -1: none (their scores are all 0).
        object_mask_threshold, overlap_threshold, mask_activation, class_activation: as
            :func:`panoptic_inference`.

    Returns:
        (K, H, W) one-hot scores (all 0 on uncovered pixels when ``uncovered_class`` is -1).
    """
    num_classes = mask_cls.shape[-1] - 1
    segments, infos = panoptic_inference(
        mask_cls,
        mask_pred,
        thing_ids=set(),
        object_mask_threshold=object_mask_threshold,
        overlap_threshold=overlap_threshold,
        mask_activation=mask_activation,
        class_activation=class_activation,
    )
    # class of each segment id (0 = no segment); num_classes stands for "none" and is dropped
    fill = uncovered_class if uncovered_class >= 0 else num_classes
    lut = torch.full((len(infos) + 1,), fill, dtype=torch.int64, device=mask_pred.device)
    for info in infos:
        lut[info["id"]] = info["category_id"]
    labels = lut[segments.long()]
    one_hot = F.one_hot(labels, num_classes + 1)[..., :num_classes]
    return one_hot.permute(2, 0, 1).to(mask_pred.dtype)
