"""
Panoptic quality (PQ, SQ, RQ) computed in memory, one image at a time, with array operations.

The rules are those of panopticapi's ``pq_compute_single_core`` (the reference implementation used
by detectron2's COCOPanopticEvaluator), so the numbers agree with ``pq_compute`` to float rounding:

- ground-truth id 0 is VOID; so are the segments of ``void_classes`` (classes not yet seen in a
  continual scenario): their pixels are turned into VOID, as if they had never been labelled;
- IoU of a (gt, pred) pair = inter / (pred_area + gt_area - inter - pred∩VOID);
- a pair matches if IoU > 0.5, both have the same category and the gt segment is not crowd;
- every unmatched non-crowd gt segment is a false negative of its category;
- an unmatched predicted segment is a false positive of its category unless more than half of it
  lies on VOID plus the crowd region of its own category (the *last* crowd segment of that
  category in ``segments_info`` when there are several, as panopticapi keeps one per category);
- ground-truth pixels whose id is neither 0 nor listed in ``segments_info`` are neither VOID nor a
  segment: they only enlarge the predictions' areas, as in panopticapi.

Departures, all on input panopticapi handles oddly or refuses: predicted segments listed in
``segments_info`` without any pixel are ignored (they can be neither matched nor counted;
panopticapi raises); a segment listed with id 0 is an error (panopticapi would count its pixels as
both VOID and that segment); areas are always counted from the id maps (panopticapi takes the
ground-truth ``area`` from the json, which is the same number for well-formed data).

Shapes: H W image size, K classes, G ground-truth segments, P predicted segments.
"""

import math
from typing import Dict, Iterable, Mapping, Sequence, Tuple

import cv2
import numpy as np

from detectron2.utils.file_io import PathManager

__all__ = ["PQStats", "pq_from_stats", "match_segments", "read_panoptic_png"]


class PQStats:
    """
    Per-class panoptic counts over K classes, summed over images.

    Attributes:
        tp, fp, fn: (K,) int64 numbers of true positives, false positives, false negatives.
        iou_sum: (K,) float64 sum of the IoUs of the true positives.
    """

    def __init__(self, num_classes: int):
        """
        Args:
            num_classes: K, the number of classes (contiguous ids 0..K-1).
        """
        if num_classes <= 0:
            raise ValueError(f"PQStats needs num_classes >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.tp = np.zeros(num_classes, dtype=np.int64)
        self.fp = np.zeros(num_classes, dtype=np.int64)
        self.fn = np.zeros(num_classes, dtype=np.int64)
        self.iou_sum = np.zeros(num_classes, dtype=np.float64)

    def add(self, other: "PQStats") -> "PQStats":
        """Add the counts of ``other`` (same K) in place; returns self."""
        if not isinstance(other, PQStats):
            raise TypeError(f"can only add PQStats to PQStats, got {type(other).__name__}")
        if other.num_classes != self.num_classes:
            raise ValueError(
                f"cannot add PQStats over {other.num_classes} classes to PQStats over "
                f"{self.num_classes} classes"
            )
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.iou_sum += other.iou_sum
        return self

    __iadd__ = add

    @classmethod
    def merge(cls, stats: Iterable["PQStats"]) -> "PQStats":
        """
        Args:
            stats: one or more PQStats over the same K (e.g. one per worker).
        Returns:
            a new PQStats holding their sum.
        """
        stats = list(stats)
        if not stats:
            raise ValueError("PQStats.merge needs at least one PQStats")
        total = cls(stats[0].num_classes)
        for s in stats:
            total.add(s)
        return total

    def per_class(self) -> Dict[str, np.ndarray]:
        """
        Returns:
            dict with (K,) float64 arrays ``pq``, ``sq``, ``rq`` (NaN for classes without any
            tp, fp or fn: they have no value, and panopticapi leaves them out of averages) and
            the (K,) bool array ``valid`` marking the others.
        """
        valid = (self.tp + self.fp + self.fn) > 0
        denom = self.tp + 0.5 * self.fp + 0.5 * self.fn
        pq = np.full(self.num_classes, np.nan)
        rq = np.full(self.num_classes, np.nan)
        sq = np.full(self.num_classes, np.nan)
        pq[valid] = self.iou_sum[valid] / denom[valid]
        rq[valid] = self.tp[valid] / denom[valid]
        # panopticapi gives SQ 0 (not undefined) to a class with only fp/fn, and averages it so
        sq[valid] = 0.0
        has_tp = self.tp > 0
        sq[has_tp] = self.iou_sum[has_tp] / self.tp[has_tp]
        return {"pq": pq, "sq": sq, "rq": rq, "valid": valid}

    def __repr__(self) -> str:
        return (
            f"PQStats(num_classes={self.num_classes}, tp={int(self.tp.sum())}, "
            f"fp={int(self.fp.sum())}, fn={int(self.fn.sum())})"
        )


def pq_from_stats(stats: PQStats, class_ids: Iterable[int]) -> Dict[str, float]:
    """
    Average PQ, SQ and RQ over the classes of ``class_ids`` that have any tp, fp or fn
    (panopticapi's ``pq_average``).

    Args:
        stats: the accumulated counts.
        class_ids: contiguous class ids to average over, each in [0, K).
    Returns:
        dict with ``pq``, ``sq``, ``rq`` (fractions in [0, 1]; NaN when no class counts) and ``n``,
        the number of classes averaged.
    """
    ids = np.unique(np.asarray(list(class_ids), dtype=np.int64))
    bad = ids[(ids < 0) | (ids >= stats.num_classes)]
    if bad.size:
        raise ValueError(
            f"class ids {bad.tolist()} are not in [0, {stats.num_classes}) (the classes of these "
            "PQStats)"
        )
    per_class = stats.per_class()
    ids = ids[per_class["valid"][ids]]
    n = int(ids.size)
    if n == 0:
        return {"pq": math.nan, "sq": math.nan, "rq": math.nan, "n": 0}
    return {
        "pq": float(per_class["pq"][ids].mean()),
        "sq": float(per_class["sq"][ids].mean()),
        "rq": float(per_class["rq"][ids].mean()),
        "n": n,
    }


def read_panoptic_png(file_name: str) -> np.ndarray:
    """
    Args:
        file_name: a panoptic PNG (any path PathManager opens), segment id = R + 256 G + 256^2 B.
    Returns:
        (H, W) int32 segment ids.
    """
    with PathManager.open(file_name, "rb") as f:
        data = np.frombuffer(f.read(), dtype=np.uint8)
    # OpenCV decodes PNG about twice as fast as PIL, and expands palette images to their colours
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{file_name} could not be decoded as an image")
    return (
        bgr[..., 2].astype(np.int32)
        | (bgr[..., 1].astype(np.int32) << 8)
        | (bgr[..., 0].astype(np.int32) << 16)
    )


def _segment_table(
    segments: Sequence[Mapping], num_classes: int, what: str
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, category ids, crowd flags) of ``segments``, checked."""
    # Checked on Python lists: with tens of segments, numpy calls would cost more than the work.
    ids = [int(s["id"]) for s in segments]
    cats = [int(s["category_id"]) for s in segments]
    if ids:
        if min(ids) <= 0:
            raise ValueError(
                f"{what} segments_info has segment id(s) {[i for i in ids if i <= 0]}; ids must "
                "be positive (0 marks void pixels)"
            )
        if len(set(ids)) != len(ids):
            repeated = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"{what} segments_info lists segment id(s) {repeated} more than once")
        if min(cats) < 0 or max(cats) >= num_classes:
            bad = next(i for i, c in enumerate(cats) if not 0 <= c < num_classes)
            raise ValueError(
                f"{what} segment id {ids[bad]} has category_id {cats[bad]}, which is not a class "
                f"id in [0, {num_classes})"
            )
    crowd = np.array([bool(s.get("iscrowd", 0)) for s in segments], dtype=bool)
    return np.array(ids, dtype=np.int64), np.array(cats, dtype=np.int64), crowd


def _labels_of(id_map: np.ndarray, ids: np.ndarray, label_of_index: np.ndarray, other: int):
    """
    Map every pixel's segment id to a compact label: ``label_of_index[i]`` where the pixel id is
    ``ids[i]``, 0 where it is 0, ``other`` where it is not listed.

    Args:
        id_map: (H, W) non-negative integer ids.
        ids: (S,) listed ids, positive and distinct.
        label_of_index: (S,) their labels.
    Returns:
        (H*W,) intp labels.
    """
    flat = id_map.reshape(-1)
    if flat.size == 0:
        return np.zeros(0, dtype=np.intp)
    max_id = max(int(flat.max()), int(ids.max()) if ids.size else 0)
    # Small ids (model outputs 1..S, many datasets) index a lookup table: one gather per pixel,
    # several times cheaper than a binary search. COCO's colour-coded ids reach 2^24: too large.
    if max_id <= max(2 * flat.size, 1 << 12):
        lut = np.full(max_id + 1, other, dtype=np.intp)
        lut[ids] = label_of_index
        lut[0] = 0
        return lut[flat]
    table = np.append(np.asarray(label_of_index, dtype=np.intp), other)
    if ids.size == 0:
        labels = np.full(flat.shape, other, dtype=np.intp)
    else:
        order = np.argsort(ids)
        sorted_ids = ids[order]
        pos = np.minimum(np.searchsorted(sorted_ids, flat), ids.size - 1)
        labels = table[np.where(sorted_ids[pos] == flat, order[pos], ids.size)]
    labels[flat == 0] = 0
    return labels


def _as_id_map(ids, what: str) -> np.ndarray:
    if hasattr(ids, "detach"):  # a torch tensor, without importing torch here
        ids = ids.detach().cpu().numpy()
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"{what} segment id map must be a 2-d integer array (H, W), got {ids.dtype} of shape "
            f"{ids.shape}"
        )
    if ids.size and ids.min() < 0:
        raise ValueError(f"{what} segment id map has negative id {int(ids.min())}; 0 is void")
    return ids


def match_segments(
    gt_ids,
    gt_segments: Sequence[Mapping],
    pred_ids,
    pred_segments: Sequence[Mapping],
    num_classes: int,
    void_classes: Iterable[int] = (),
) -> PQStats:
    """
    Panoptic counts of one image (see the module docstring for the rules).

    Args:
        gt_ids: (H, W) integer ground-truth segment ids, 0 = void (e.g. panopticapi's ``rgb2id`` of
            the panoptic PNG).
        gt_segments: one dict per ground-truth segment: ``id``, ``category_id`` (contiguous, in
            [0, K)), ``iscrowd`` (0 when absent).
        pred_ids: (H, W) integer predicted segment ids, 0 = void; a numpy array or a tensor.
        pred_segments: one dict per predicted segment: ``id``, ``category_id`` in [0, K).
        num_classes: K.
        void_classes: class ids whose ground-truth segments count as void.
    Returns:
        PQStats of this image.
    Raises:
        ValueError: shapes differ, an id map is not 2-d integer, a segment id is 0, negative or
            repeated, a category is outside [0, K), or a predicted pixel carries an id that
            ``pred_segments`` does not list.
    """
    gt_ids = _as_id_map(gt_ids, "ground-truth")
    pred_ids = _as_id_map(pred_ids, "predicted")
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(
            f"ground truth is {gt_ids.shape[0]}x{gt_ids.shape[1]} but the prediction is "
            f"{pred_ids.shape[0]}x{pred_ids.shape[1]}"
        )
    stats = PQStats(num_classes)
    g_ids, g_cats, g_crowd = _segment_table(gt_segments, num_classes, "ground-truth")
    p_ids, p_cats, _ = _segment_table(pred_segments, num_classes, "predicted")

    void = np.zeros(num_classes, dtype=bool)
    void_list = np.asarray(list(void_classes), dtype=np.int64)
    if void_list.size:
        if ((void_list < 0) | (void_list >= num_classes)).any():
            raise ValueError(
                f"void_classes {void_list.tolist()} must be class ids in [0, {num_classes})"
            )
        void[void_list] = True

    # Ground-truth segments of void classes vanish: their pixels get label 0 (VOID).
    keep = ~void[g_cats] if g_ids.size else np.zeros(0, dtype=bool)
    num_gt = int(keep.sum())
    gt_label_of_index = np.zeros(g_ids.size, dtype=np.intp)
    gt_label_of_index[keep] = np.arange(1, num_gt + 1)
    g_cats, g_crowd = g_cats[keep], g_crowd[keep]
    num_pred = p_ids.size

    # inter[g, p]: pixels with gt label g (0 void, 1..G, G+1 unlisted) and pred label p (0 void,
    # 1..P, P+1 unlisted: an error, detected from its column rather than by another pixel pass).
    # The gt lookup yields g * width directly, so one addition makes the joint label.
    width = num_pred + 2
    gt_joint = _labels_of(gt_ids, g_ids, gt_label_of_index * width, (num_gt + 1) * width)
    pred_labels = _labels_of(pred_ids, p_ids, np.arange(1, num_pred + 1), num_pred + 1)
    inter = np.bincount(gt_joint + pred_labels, minlength=(num_gt + 2) * width)
    inter = inter.reshape(num_gt + 2, width)
    if inter[:, -1].any():
        missing = np.unique(pred_ids.reshape(-1)[pred_labels == num_pred + 1])
        raise ValueError(
            f"predicted segment id(s) {missing[:10].tolist()} appear in the id map but not in "
            f"segments_info (listed ids: {p_ids.tolist()[:20]})"
        )
    inter = inter[:, :-1]
    gt_area = inter.sum(axis=1)[1 : num_gt + 1]
    pred_area = inter.sum(axis=0)[1:]
    pred_void = inter[0, 1:]
    pair_inter = inter[1 : num_gt + 1, 1:]

    union = pred_area[None, :] + gt_area[:, None] - pair_inter - pred_void[None, :]
    iou = np.divide(
        pair_inter, union, out=np.zeros(pair_inter.shape, dtype=np.float64), where=pair_inter > 0
    )
    # IoU > 0.5 makes a match unique on both sides, so no assignment step is needed.
    matched = (iou > 0.5) & (g_cats[:, None] == p_cats[None, :]) & ~g_crowd[:, None]
    gi, pj = np.nonzero(matched)
    stats.tp += np.bincount(g_cats[gi], minlength=num_classes)
    stats.iou_sum += np.bincount(g_cats[gi], weights=iou[gi, pj], minlength=num_classes)

    gt_matched = np.zeros(num_gt, dtype=bool)
    gt_matched[gi] = True
    stats.fn += np.bincount(g_cats[~gt_matched & ~g_crowd], minlength=num_classes)

    # One crowd region per category; the last listed wins, as in panopticapi's dict.
    crowd_label = np.full(num_classes, -1, dtype=np.intp)
    for label in np.flatnonzero(g_crowd):
        crowd_label[g_cats[label]] = label + 1
    pred_matched = np.zeros(num_pred, dtype=bool)
    pred_matched[pj] = True
    unmatched = np.flatnonzero(~pred_matched & (pred_area > 0))
    crowd_row = crowd_label[p_cats[unmatched]]
    ignored = pred_void[unmatched] + np.where(
        crowd_row >= 0, inter[np.maximum(crowd_row, 0), unmatched + 1], 0
    )
    false_pos = unmatched[ignored / pred_area[unmatched] <= 0.5]
    stats.fp += np.bincount(p_cats[false_pos], minlength=num_classes)
    return stats
