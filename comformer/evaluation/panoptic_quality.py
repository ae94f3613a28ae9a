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
import sys
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

import cv2
import numpy as np

from detectron2.utils.file_io import PathManager

__all__ = [
    "PQStats",
    "PQAccumulator",
    "PanopticGroundTruth",
    "pq_from_stats",
    "match_segments",
    "read_panoptic_png",
]

_LITTLE_ENDIAN = sys.byteorder == "little"


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


def _ids_from_bgr(bgr: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 BGR -> (H, W) int32 ids R + 256 G + 256^2 B."""
    if _LITTLE_ENDIAN:
        # The bytes R, G, B, A read as one little-endian uint32 are R + 256 G + 256^2 B + 256^3 A:
        # one channel shuffle in OpenCV and a mask replace three casts, two shifts and two ors.
        ids = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGBA).view(np.uint32)[..., 0]
        ids &= 0xFFFFFF
        return ids.view(np.int32)
    return (
        bgr[..., 2].astype(np.int32)
        | (bgr[..., 1].astype(np.int32) << 8)
        | (bgr[..., 0].astype(np.int32) << 16)
    )


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
    return _ids_from_bgr(bgr)


def _segment_table(
    segments: Sequence[Mapping], num_classes: int, what: str
) -> Tuple[List[int], List[int]]:
    """(ids, category ids) of ``segments``, checked."""
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
    return ids, cats


def _labels_of(
    id_map: np.ndarray,
    ids: np.ndarray,
    label_of_index: np.ndarray,
    other: int,
    dtype: type = np.intp,
):
    """
    Map every pixel's segment id to a compact label: ``label_of_index[i]`` where the pixel id is
    ``ids[i]``, 0 where it is 0, ``other`` where it is not listed.

    Args:
        id_map: (H, W) non-negative integer ids.
        ids: (S,) listed ids, positive and distinct.
        label_of_index: (S,) their labels.
        dtype: integer type of the result, large enough for every label.
    Returns:
        (H*W,) labels.
    """
    flat = id_map.reshape(-1)
    if flat.size == 0:
        return np.zeros(0, dtype=dtype)
    max_id = max(int(flat.max()), int(ids.max()) if ids.size else 0)
    # Small ids (model outputs 1..S, many datasets) index a lookup table: one gather per pixel,
    # several times cheaper than a binary search. COCO's colour-coded ids reach 2^24: too large.
    if max_id <= max(2 * flat.size, 1 << 12):
        lut = np.full(max_id + 1, other, dtype=dtype)
        lut[ids] = label_of_index
        lut[0] = 0
        return lut[flat]
    table = np.append(np.asarray(label_of_index, dtype=dtype), np.array([other], dtype=dtype))
    if ids.size == 0:
        labels = np.full(flat.shape, other, dtype=dtype)
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
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise ValueError(
            f"{what} segment id map must be a 2-d integer array (H, W), got {ids.dtype} of shape "
            f"{ids.shape}"
        )
    if ids.dtype.kind == "i" and ids.size and ids.min() < 0:
        raise ValueError(f"{what} segment id map has negative id {int(ids.min())}; 0 is void")
    return ids


class PanopticGroundTruth:
    """
    One image's ground truth in the compact form the matching uses, independent of which classes
    are void (so it can be kept in memory and reused by every evaluation of the image).

    Every pixel holds a *row*: 0 for VOID (id 0), ``i + 1`` for the i-th segment of
    ``segments_info``, ``S + 1`` for an id that ``segments_info`` does not list.

    Attributes:
        shape: (H, W).
        labels: (H*W,) rows, in the smallest unsigned integer type that holds S + 1.
        row_categories: (S + 2,) int64 category of each row; K (no class) for rows 0 and S + 1.
        row_crowd: (S + 2,) bool, whether the row is a crowd segment.
    """

    __slots__ = ("shape", "labels", "row_categories", "row_crowd")

    def __init__(self, id_map, segments: Sequence[Mapping], num_classes: int):
        """
        Args:
            id_map: (H, W) integer segment ids, 0 = void (a numpy array or a tensor).
            segments: one dict per segment: ``id``, ``category_id`` in [0, K), ``iscrowd`` (0
                when absent).
            num_classes: K.
        """
        id_map = _as_id_map(id_map, "ground-truth")
        ids, cats = _segment_table(segments, num_classes, "ground-truth")
        num_segments = len(ids)
        dtype = np.uint8 if num_segments < 255 else np.uint16 if num_segments < 65535 else np.int64
        self.shape = tuple(id_map.shape)
        self.labels = _labels_of(
            id_map,
            np.array(ids, dtype=np.int64),
            np.arange(1, num_segments + 1),
            num_segments + 1,
            dtype=dtype,
        )
        self.row_categories = np.array([num_classes] + cats + [num_classes], dtype=np.int64)
        crowd = [bool(s.get("iscrowd", 0)) for s in segments]
        self.row_crowd = np.array([False] + crowd + [False], dtype=bool)

    @property
    def num_rows(self) -> int:
        return self.row_categories.size

    @property
    def nbytes(self) -> int:
        return self.labels.nbytes + self.row_categories.nbytes + self.row_crowd.nbytes


class PQAccumulator:
    """
    Panoptic counts of many images (see the module docstring for the rules), computed in two parts:

    * :meth:`add`, per image: checks the prediction and counts the pixels of every (predicted
      segment, ground-truth row) pair with one ``bincount`` (pair key ``pred * rows + gt_row``);
      only the non-zero counts are kept;
    * a vectorised pass over the pairs of up to ``chunk_size`` images at a time (areas, void and
      crowd overlaps, IoU, matches, fp / fn) that adds to the running :class:`PQStats`. Per image
      there are then only a few numpy calls, and the per-image Python overhead, not the pixels,
      is what dominates small images.

    Images of any size can be mixed.
    """

    def __init__(self, num_classes: int, void_classes: Iterable[int] = (), chunk_size: int = 256):
        """
        Args:
            num_classes: K.
            void_classes: class ids whose ground-truth segments count as void.
            chunk_size: images whose pairs are matched together.
        """
        self._stats = PQStats(num_classes)
        self.num_classes = int(num_classes)
        void_list = np.asarray(list(void_classes), dtype=np.int64)
        if void_list.size and ((void_list < 0) | (void_list >= num_classes)).any():
            raise ValueError(
                f"void_classes {void_list.tolist()} must be class ids in [0, {num_classes})"
            )
        # Indexed by row category; entry K (rows that are no segment) is False.
        self._void_class = np.zeros(num_classes + 1, dtype=bool)
        self._void_class[void_list] = True
        if chunk_size < 1:
            raise ValueError(f"PQAccumulator chunk_size must be >= 1, got {chunk_size}")
        self._chunk_size = int(chunk_size)
        self._pending: List[tuple] = []

    def add(self, gt: PanopticGroundTruth, pred_ids, pred_segments: Sequence[Mapping]) -> None:
        """
        Count one image.

        Args:
            gt: the image's ground truth.
            pred_ids: (H, W) integer predicted segment ids, 0 = void; a numpy array or a tensor.
            pred_segments: one dict per predicted segment: ``id``, ``category_id`` in [0, K).
        Raises:
            ValueError: shapes differ, the id map is not 2-d integer, a segment id is 0, negative
                or repeated, a category is outside [0, K), or a predicted pixel carries an id that
                ``pred_segments`` does not list.
        """
        k = self.num_classes
        pred_ids = _as_id_map(pred_ids, "predicted")
        if gt.shape != pred_ids.shape:
            raise ValueError(
                f"ground truth is {gt.shape[0]}x{gt.shape[1]} but the prediction is "
                f"{pred_ids.shape[0]}x{pred_ids.shape[1]}"
            )
        ids, cats = _segment_table(pred_segments, k, "predicted")
        num_pred = len(ids)
        num_rows = gt.num_rows
        flat = pred_ids.reshape(-1)
        if flat.dtype.itemsize < 4:  # uint8 / int16 keys would overflow
            flat = flat.astype(np.int32)
        # A model numbers its segments 1..P in order: the ids are then the columns already.
        compact = ids == list(range(1, num_pred + 1)) and (
            flat.size == 0 or int(flat.max()) <= num_pred
        )
        if not compact:
            flat = _labels_of(
                pred_ids, np.array(ids, dtype=np.int64), np.arange(1, num_pred + 1), num_pred + 1
            )
        # Column-major pairs: key = pred column * rows + gt row; column P + 1 (unlisted ids) must
        # stay empty.
        counts = np.bincount(flat * num_rows + gt.labels, minlength=(num_pred + 2) * num_rows)
        if counts[(num_pred + 1) * num_rows :].any():
            missing = np.unique(pred_ids.reshape(-1)[flat == num_pred + 1])
            raise ValueError(
                f"predicted segment id(s) {missing[:10].tolist()} appear in the id map but not in "
                f"segments_info (listed ids: {ids[:20]})"
            )
        keys = np.flatnonzero(counts)
        self._pending.append(
            (keys, counts[keys], num_rows, gt.row_categories, gt.row_crowd, [k] + cats)
        )
        if len(self._pending) >= self._chunk_size:
            self._flush()

    def stats(self) -> PQStats:
        """The counts of every image added so far (a new PQStats)."""
        self._flush()
        return PQStats.merge([self._stats])

    def _flush(self) -> None:
        """Match the pairs of the pending images, all at once, and add them to the stats."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        k = self.num_classes
        stats = self._stats

        # Global rows (ground truth) and columns (predicted segments; column 0 is VOID) of the
        # pending images, one block per image.
        num_rows = np.array([p[2] for p in pending], dtype=np.int64)
        row_start = np.cumsum(num_rows) - num_rows
        row_cat = np.concatenate([p[3] for p in pending])
        row_crowd = np.concatenate([p[4] for p in pending])
        col_cat = np.array([c for p in pending for c in p[5]], dtype=np.int64)
        num_cols = np.array([len(p[5]) for p in pending], dtype=np.int64)
        col_start = np.cumsum(num_cols) - num_cols

        image = np.repeat(np.arange(len(pending)), [p[0].size for p in pending])
        keys = np.concatenate([p[0] for p in pending])
        inter = np.concatenate([p[1] for p in pending])
        local_col = keys // num_rows[image]
        row = keys - local_col * num_rows[image] + row_start[image]
        col = local_col + col_start[image]

        # VOID rows: image void (row 0 of each block) and the segments of void classes.
        void_row = self._void_class[row_cat]
        void_row[row_start] = True
        kept_row = (row_cat < k) & ~void_row
        # Areas from pair counts: float64 sums of integers, exact.
        pred_area = np.bincount(col, weights=inter, minlength=col_cat.size)
        gt_area = np.bincount(row, weights=inter, minlength=row_cat.size)
        on_void = void_row[row]
        pred_void = np.bincount(col[on_void], weights=inter[on_void], minlength=col_cat.size)

        pair = kept_row[row] & (col_cat[col] < k)
        p_row, p_col, p_inter = row[pair], col[pair], inter[pair]
        union = pred_area[p_col] + gt_area[p_row] - p_inter - pred_void[p_col]
        iou = p_inter / union
        # IoU > 0.5 makes a match unique on both sides, so no assignment step is needed.
        matched = (iou > 0.5) & (row_cat[p_row] == col_cat[p_col]) & ~row_crowd[p_row]
        m_row, m_col = p_row[matched], p_col[matched]
        stats.tp += np.bincount(row_cat[m_row], minlength=k)
        stats.iou_sum += np.bincount(row_cat[m_row], weights=iou[matched], minlength=k)

        row_matched = np.zeros(row_cat.size, dtype=bool)
        row_matched[m_row] = True
        stats.fn += np.bincount(row_cat[kept_row & ~row_crowd & ~row_matched], minlength=k)

        # One crowd region per (image, category); the last listed wins, as in panopticapi's dict.
        crowd_overlap = np.zeros(col_cat.size)
        crowd_rows = np.flatnonzero(kept_row & row_crowd)
        if crowd_rows.size:
            row_image = np.repeat(np.arange(len(pending)), num_rows)
            group = row_image[crowd_rows] * k + row_cat[crowd_rows]
            _, last = np.unique(group[::-1], return_index=True)
            region = np.zeros(row_cat.size, dtype=bool)
            region[crowd_rows[::-1][last]] = True
            on_region = region[row] & (row_cat[row] == col_cat[col])
            crowd_overlap = np.bincount(
                col[on_region], weights=inter[on_region], minlength=col_cat.size
            )
        col_matched = np.zeros(col_cat.size, dtype=bool)
        col_matched[m_col] = True
        unmatched = np.flatnonzero((col_cat < k) & ~col_matched & (pred_area > 0))
        ignored = pred_void[unmatched] + crowd_overlap[unmatched]
        false_pos = unmatched[ignored / pred_area[unmatched] <= 0.5]
        stats.fp += np.bincount(col_cat[false_pos], minlength=k)


def match_segments(
    gt_ids,
    gt_segments: Sequence[Mapping],
    pred_ids,
    pred_segments: Sequence[Mapping],
    num_classes: int,
    void_classes: Iterable[int] = (),
) -> PQStats:
    """
    Panoptic counts of one image (see the module docstring for the rules). Many images are
    counted faster with a :class:`PQAccumulator`.

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
    accumulator = PQAccumulator(num_classes, void_classes)
    accumulator.add(PanopticGroundTruth(gt_ids, gt_segments, num_classes), pred_ids, pred_segments)
    return accumulator.stats()
