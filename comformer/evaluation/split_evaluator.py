"""
Evaluation after a step of a continual scenario: PQ and mIoU on the full validation set, where the
classes not seen yet are void, reported for all seen classes and for named class splits (old / new /
each step's classes) as well as per class.

Both metrics are accumulated in memory while the model runs (PQ counts per class with a
:class:`PQAccumulator`, a (K+1)x(K+1) confusion matrix for mIoU), so ``evaluate()`` only sums a
few arrays across workers: no prediction PNGs, no json, no panopticapi pass over the files. The
ground truth is decoded once per evaluator and kept in memory (up to ``gt_cache_bytes``), so a
second evaluation of the same images (after ``reset()``) reads no file.

K is the number of classes of the dataset (``metadata.stuff_classes``); class ids are contiguous.
"""

import json
import logging
import math
import os
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from tabulate import tabulate

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from .panoptic_quality import (
    PanopticGroundTruth,
    PQAccumulator,
    PQStats,
    pq_from_stats,
    read_panoptic_png,
)

__all__ = ["SplitEvaluator"]

logger = logging.getLogger(__name__)

# Result keys PQ_th / PQ_st are detectron2's things/stuff averages; a split may not shadow them.
_RESERVED_SPLIT_NAMES = ("th", "st")
# Default memory for decoded ground truth per evaluator: all of a small validation set, about a
# third of ADE20K's (stored at 1 byte per pixel for images with < 255 segments or classes).
DEFAULT_GT_CACHE_BYTES = 256 << 20


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _read_png(file_name: str) -> np.ndarray:
    with PathManager.open(file_name, "rb") as f:
        return np.asarray(Image.open(f))


def _shape_str(shape) -> str:
    return "x".join(str(s) for s in shape)


def _nan_to_none(x):
    # JSON has no NaN; a metric without a value is written as null.
    return None if isinstance(x, float) and math.isnan(x) else x


class _GroundTruthCache:
    """Decoded ground truth by key, kept while the total size stays within ``max_bytes`` (the
    first images evaluated stay; later ones are decoded every time once the budget is spent)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._items: Dict[Any, Any] = {}

    def get(self, key, load: Callable[[], Tuple[Any, int]]):
        """The value of ``key``; ``load()`` returns (value, its size in bytes) on a miss."""
        value = self._items.get(key)
        if value is None:
            value, nbytes = load()
            if self.nbytes + nbytes <= self.max_bytes:
                self._items[key] = value
                self.nbytes += nbytes
        return value


class SplitEvaluator(DatasetEvaluator):
    """
    PQ and mIoU restricted to the classes seen so far, for all of them and per class split.

    Ground-truth segments (panoptic) and pixels (semantic) of unseen classes are void: a prediction
    over them is neither rewarded nor, for PQ, a false positive when most of it lies there. The
    predictions themselves are not filtered: a pixel predicted as an unseen class over a seen
    class's ground truth is an error of that class.

    Conventions are those of detectron2's evaluators, restricted to the seen classes:
    PQ averages the classes with any tp/fp/fn (panopticapi), mIoU the classes with ground-truth
    pixels (``SemSegEvaluator``); per-class values of classes without any are NaN, as is a split
    average over no class. Everything is in percent.
    """

    def __init__(
        self,
        dataset_name: str,
        *,
        seen_classes: Sequence[int],
        splits: Mapping[str, Sequence[int]],
        panoptic: bool,
        semantic: bool,
        distributed: bool = True,
        output_dir: Optional[str] = None,
        gt_cache_bytes: int = DEFAULT_GT_CACHE_BYTES,
    ):
        """
        Args:
            dataset_name: a registered dataset; its records give the ground-truth files
                (``pan_seg_file_name`` + ``segments_info`` for PQ, ``sem_seg_file_name`` for mIoU)
                and its metadata ``stuff_classes`` (all K class names),
                ``thing_dataset_id_to_contiguous_id`` (which classes are things) and
                ``ignore_label``.
            seen_classes: class ids learned so far; all other classes are void.
            splits: split name -> class ids, e.g. {"old": base classes, "new": the others}; each
                split is averaged over its seen classes (unseen ones are left out, so the
                scenario's fixed splits can be passed at every step). Names become key suffixes
                (``PQ_old``, ``mIoU_old``); "th" and "st" are taken by things / stuff.
            panoptic: compute PQ from the model's ``panoptic_seg``.
            semantic: compute mIoU from the model's ``sem_seg``.
            distributed: gather the counts of all workers in ``evaluate``.
            output_dir: if given, ``continual_evaluation.json`` (metrics and raw counts) is
                written there.
            gt_cache_bytes: memory for ground truth decoded by this evaluator and kept for its
                later evaluations (0: decode every time).
        """
        if not (panoptic or semantic):
            raise ValueError(
                f"SplitEvaluator({dataset_name!r}) with panoptic=False and semantic=False "
                "would compute nothing; enable at least one"
            )
        self._dataset_name = dataset_name
        self._panoptic = bool(panoptic)
        self._semantic = bool(semantic)
        self._distributed = distributed
        self._output_dir = output_dir

        meta = MetadataCatalog.get(dataset_name)
        if not meta.get("stuff_classes"):
            raise ValueError(
                f"metadata of {dataset_name!r} has no 'stuff_classes' (the names of all K classes)"
            )
        self._class_names: List[str] = list(meta.stuff_classes)
        num_classes = self._num_classes = len(self._class_names)
        self._ignore_label = int(meta.get("ignore_label", 255))
        self._thing_ids = set(meta.get("thing_dataset_id_to_contiguous_id", {}).values())

        self._seen = self._check_ids(seen_classes, "seen_classes")
        if not self._seen:
            raise ValueError("seen_classes is empty; at least one class must have been learned")
        self._seen_mask = np.zeros(num_classes, dtype=bool)
        self._seen_mask[self._seen] = True
        self._unseen = [c for c in range(num_classes) if not self._seen_mask[c]]
        # semantic ground truth label (K = ignored) -> kept as is, or turned into K
        self._kept_gt = np.append(self._seen_mask, True)
        self._splits: Dict[str, List[int]] = OrderedDict()
        for name, ids in splits.items():
            if not isinstance(name, str) or not name or name in _RESERVED_SPLIT_NAMES:
                raise ValueError(
                    f"split name {name!r} is not allowed: use a non-empty string other than "
                    f"{list(_RESERVED_SPLIT_NAMES)}"
                )
            ids = self._check_ids(ids, f"splits[{name!r}]")
            self._splits[name] = [c for c in ids if self._seen_mask[c]]

        self._records = self._load_records()
        if gt_cache_bytes < 0:
            raise ValueError(f"gt_cache_bytes={gt_cache_bytes} must be >= 0 (0: no cache)")
        self._pan_gt_cache = _GroundTruthCache(gt_cache_bytes)
        self._sem_gt_cache = _GroundTruthCache(gt_cache_bytes)
        self.reset()

    def _check_ids(self, ids: Sequence[int], what: str) -> List[int]:
        ids = sorted({int(c) for c in ids})
        bad = [c for c in ids if not 0 <= c < self._num_classes]
        if bad:
            raise ValueError(
                f"{what} has class id(s) {bad}, not in [0, {self._num_classes}) (the classes of "
                f"{self._dataset_name!r})"
            )
        return ids

    def _load_records(self) -> Dict[str, dict]:
        needed = []
        if self._panoptic:
            needed += ["pan_seg_file_name", "segments_info"]
        if self._semantic:
            needed.append("sem_seg_file_name")
        records = {}
        for record in DatasetCatalog.get(self._dataset_name):
            missing = [k for k in needed if k not in record]
            if missing:
                raise ValueError(
                    f"record {record.get('file_name')!r} of {self._dataset_name!r} lacks {missing} "
                    f"(panoptic={self._panoptic} needs pan_seg_file_name and segments_info, "
                    f"semantic={self._semantic} needs sem_seg_file_name)"
                )
            if record["file_name"] in records:
                raise ValueError(
                    f"dataset {self._dataset_name!r} has two records with file_name "
                    f"{record['file_name']!r}; predictions are matched to records by file_name"
                )
            records[record["file_name"]] = record
        return records

    def reset(self):
        self._pq = PQAccumulator(self._num_classes, void_classes=self._unseen)
        # conf[pred, gt]; row and column K hold ignored ground truth (detectron2's layout)
        self._conf = np.zeros((self._num_classes + 1,) * 2, dtype=np.int64)
        self._num_images = 0

    def process(self, inputs, outputs):
        """
        Args:
            inputs: the model's inputs, each with ``file_name`` (a record of the dataset).
            outputs: the model's outputs, each with ``panoptic_seg`` = ((H, W) int ids with 0 =
                void, list of {``id``, ``category_id``}) if ``panoptic``, and ``sem_seg`` (K, H, W)
                scores if ``semantic``, at the ground truth's resolution.
        """
        for inp, out in zip(inputs, outputs):
            file_name = inp["file_name"]
            record = self._records.get(file_name)
            if record is None:
                raise KeyError(
                    f"{file_name} is not an image of dataset {self._dataset_name!r} "
                    f"({len(self._records)} records)"
                )
            if self._panoptic:
                self._process_panoptic(record, out)
            if self._semantic:
                self._process_semantic(record, out)
            self._num_images += 1

    def _process_panoptic(self, record: dict, output: dict) -> None:
        if "panoptic_seg" not in output:
            raise KeyError(f"output for {record['file_name']} has no 'panoptic_seg'")
        pred_ids, pred_segments = output["panoptic_seg"]
        if pred_segments is None:
            raise ValueError(
                f"panoptic_seg of {record['file_name']} has segments_info None (ids encoding "
                "category * label_divisor); SplitEvaluator needs the list of segments"
            )
        pred_ids = _to_numpy(pred_ids)
        gt_file = record["pan_seg_file_name"]
        try:
            gt = self._pan_gt_cache.get(gt_file, lambda: self._load_panoptic_gt(record))
        except ValueError as e:
            raise ValueError(f"panoptic ground truth of {record['file_name']}: {e}") from e
        if gt.shape != pred_ids.shape:
            raise ValueError(
                f"panoptic prediction for {record['file_name']} is {_shape_str(pred_ids.shape)} "
                f"but its ground truth {gt_file} is {_shape_str(gt.shape)}"
            )
        try:
            self._pq.add(gt, pred_ids, pred_segments)
        except ValueError as e:
            raise ValueError(f"panoptic evaluation of {record['file_name']}: {e}") from e

    def _load_panoptic_gt(self, record: dict) -> Tuple[PanopticGroundTruth, int]:
        gt = PanopticGroundTruth(
            read_panoptic_png(record["pan_seg_file_name"]),
            record["segments_info"],
            self._num_classes,
        )
        return gt, gt.nbytes

    def _process_semantic(self, record: dict, output: dict) -> None:
        if "sem_seg" not in output:
            raise KeyError(f"output for {record['file_name']} has no 'sem_seg'")
        scores = output["sem_seg"]
        k = self._num_classes
        if scores.ndim != 3 or scores.shape[0] != k:
            raise ValueError(
                f"sem_seg for {record['file_name']} has shape {tuple(scores.shape)}; expected "
                f"({k}, H, W), one channel per class of {self._dataset_name!r} in class-id order"
            )
        pred = _to_numpy(scores.argmax(0))
        gt_file = record["sem_seg_file_name"]
        gt = self._sem_gt_cache.get(gt_file, lambda: self._load_semantic_gt(gt_file))
        if gt.shape != pred.shape:
            raise ValueError(
                f"semantic prediction for {record['file_name']} is {_shape_str(pred.shape)} but "
                f"its ground truth {gt_file} is {_shape_str(gt.shape)}"
            )
        self._conf += np.bincount(
            (k + 1) * pred.reshape(-1).astype(np.int64) + gt.reshape(-1),
            minlength=self._conf.size,
        ).reshape(self._conf.shape)

    def _load_semantic_gt(self, gt_file: str) -> Tuple[np.ndarray, int]:
        """(H, W) class ids with ignored and unseen pixels as K, in the smallest integer type."""
        k = self._num_classes
        gt = _read_png(gt_file).astype(np.int64)
        ignored = gt == self._ignore_label
        bad = ~ignored & ((gt < 0) | (gt >= k))
        if bad.any():
            raise ValueError(
                f"semantic ground truth {gt_file} has label {int(gt[bad][0])}, neither a class id "
                f"in [0, {k}) nor the ignore label {self._ignore_label}"
            )
        gt[ignored] = k
        # unseen classes join the ignored pixels: column K, left out of every metric
        gt[~self._kept_gt[gt]] = k
        gt = gt.astype(np.uint8 if k < 256 else np.uint16 if k < 65536 else np.int64)
        return gt, gt.nbytes

    def evaluate(self):
        """
        Returns:
            OrderedDict with ``panoptic_seg`` (PQ, SQ, RQ, PQ_th, SQ_th, RQ_th, PQ_st, SQ_st, RQ_st,
            PQ_<split>, SQ_<split>, RQ_<split>, PQ-<class>) and/or ``sem_seg`` (mIoU, fwIoU, pACC,
            mACC, mIoU_<split>, IoU-<class>), in percent, per-class keys for seen classes only;
            None on workers other than the main one; {} if no image was processed.
        """
        pq_stats, conf, num_images = self._pq.stats(), self._conf, self._num_images
        if self._distributed:
            comm.synchronize()
            gathered = comm.all_gather((pq_stats, conf, num_images))
            if not comm.is_main_process():
                return None
            pq_stats = PQStats.merge(g[0] for g in gathered)
            conf = sum(g[1] for g in gathered)
            num_images = sum(g[2] for g in gathered)
        if num_images == 0:
            logger.warning(f"SplitEvaluator on {self._dataset_name!r} received no predictions")
            return OrderedDict()

        results = OrderedDict()
        if self._panoptic:
            results["panoptic_seg"] = self._panoptic_results(pq_stats)
        if self._semantic:
            results["sem_seg"] = self._semantic_results(conf)
        self._log(results)
        if self._output_dir:
            self._save(results, pq_stats, conf, num_images)
        return results

    def _groups(self) -> List[Tuple[str, str, List[int], bool]]:
        """(table row, key suffix, class ids, panoptic only) of every average reported."""
        things = [c for c in self._seen if c in self._thing_ids]
        stuff = [c for c in self._seen if c not in self._thing_ids]
        return (
            [("all", "", self._seen, False), ("things", "_th", things, True)]
            + [("stuff", "_st", stuff, True)]
            + [(name, f"_{name}", ids, False) for name, ids in self._splits.items()]
        )

    def _panoptic_results(self, stats: PQStats) -> Dict[str, float]:
        res = {}
        for _, suffix, ids, _ in self._groups():
            avg = pq_from_stats(stats, ids)
            for metric in ("pq", "sq", "rq"):
                res[f"{metric.upper()}{suffix}"] = 100 * avg[metric]
        per_class = stats.per_class()
        for c in self._seen:
            res[f"PQ-{self._class_names[c]}"] = 100 * float(per_class["pq"][c])
        return res

    def _semantic_results(self, conf: np.ndarray) -> Dict[str, float]:
        k = self._num_classes
        tp = conf.diagonal()[:-1].astype(np.float64)
        pos_gt = conf[:-1, :-1].sum(axis=0).astype(np.float64)
        pos_pred = conf[:-1, :-1].sum(axis=1).astype(np.float64)
        union = pos_gt + pos_pred - tp
        # unseen classes have no ground truth left (it is ignored), so this also restricts to seen
        acc_valid = (pos_gt > 0) & self._seen_mask
        iou_valid = acc_valid & (union > 0)
        acc = np.full(k, np.nan)
        iou = np.full(k, np.nan)
        acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
        iou[iou_valid] = tp[iou_valid] / union[iou_valid]
        total = pos_gt.sum()

        def mean_iou(ids) -> float:
            ids = [c for c in ids if iou_valid[c]]
            return float(np.mean(iou[ids])) if ids else math.nan

        res = {
            "mIoU": 100 * mean_iou(self._seen),
            "fwIoU": (
                100 * float(np.sum(iou[iou_valid] * pos_gt[iou_valid]) / total)
                if total > 0
                else math.nan
            ),
            "pACC": 100 * float(tp.sum() / total) if total > 0 else math.nan,
            "mACC": 100 * float(np.mean(acc[acc_valid])) if acc_valid.any() else math.nan,
        }
        for name, ids in self._splits.items():
            res[f"mIoU_{name}"] = 100 * mean_iou(ids)
        for c in self._seen:
            res[f"IoU-{self._class_names[c]}"] = 100 * float(iou[c])
        return res

    def _log(self, results: Mapping[str, Mapping[str, float]]) -> None:
        pan, sem = results.get("panoptic_seg"), results.get("sem_seg")
        headers = [""] + (["PQ", "SQ", "RQ"] if pan else []) + (["mIoU"] if sem else [])
        rows = []
        for name, suffix, _, panoptic_only in self._groups():
            if panoptic_only and not pan:
                continue
            row = [name] + ([pan[f"{m}{suffix}"] for m in ("PQ", "SQ", "RQ")] if pan else [])
            if sem:
                row.append(math.nan if panoptic_only else sem[f"mIoU{suffix}"])
            rows.append(row)
        table = tabulate(rows, headers=headers, tablefmt="pipe", floatfmt=".2f")
        logger.info(
            f"Continual evaluation on {self._dataset_name} ({len(self._seen)} of "
            f"{self._num_classes} classes seen):\n{table}"
        )

    def _save(self, results, stats: PQStats, conf: np.ndarray, num_images: int) -> None:
        PathManager.mkdirs(self._output_dir)
        content = {
            "dataset": self._dataset_name,
            "num_images": int(num_images),
            "seen_classes": self._seen,
            "splits": self._splits,
            "metrics": {
                task: {k: _nan_to_none(v) for k, v in res.items()} for task, res in results.items()
            },
            "pq_counts": (
                {
                    "tp": stats.tp.tolist(),
                    "fp": stats.fp.tolist(),
                    "fn": stats.fn.tolist(),
                    "iou_sum": stats.iou_sum.tolist(),
                }
                if self._panoptic
                else None
            ),
            # conf[pred][gt], the last row/column being ignored ground truth
            "confusion_matrix": conf.tolist() if self._semantic else None,
        }
        path = os.path.join(self._output_dir, "continual_evaluation.json")
        with PathManager.open(path, "w") as f:
            json.dump(content, f)
