#!/usr/bin/env python
"""Speed of panoptic quality: panopticapi's pq_compute (from files) vs comformer's in-memory PQ.

Ground truth: N synthetic-dataset images rendered at 128 px (``render_image``), with some thing
segments turned into crowd regions. Predictions: the ground truth shifted by a pixel or two, with
segments reclassified, merged or dropped, spurious blobs and void specks, segment ids 1..S as a
model produces them.

Timed, best of ``--repeats``:
  panopticapi            pq_compute on PNG + json files already on disk (its default pool: one
                         worker per CPU)
  panopticapi+write      the detectron2 COCOPanopticEvaluator path: encode and write the prediction
                         PNGs and json, then pq_compute
  hotcoco                hotcoco.panoptic.pq_compute on the same files, if hotcoco is installed
  ours (arrays)          match_segments on in-memory id maps + PQStats.merge + pq_from_stats
  ours (+gt PNG read)    the same, reading and decoding each ground-truth PNG, as
                         ContinualEvaluator.process does

All, Things and Stuff PQ/SQ/RQ of every method are checked against panopticapi (to 1e-9).

    .venv/bin/python bench/pq_speed.py --num-images 500
"""

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from comformer.data.datasets.synthetic import (  # noqa: E402
    SyntheticSpec,
    render_image,
    synthetic_categories,
)
from comformer.evaluation.panoptic_quality import (  # noqa: E402
    PQStats,
    match_segments,
    pq_from_stats,
    read_panoptic_png,
)

GROUPS = (("All", None), ("Things", True), ("Stuff", False))


def id2rgb(ids: np.ndarray) -> np.ndarray:
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def make_case(spec: SyntheticSpec, index: int, num_classes: int, rng: np.random.RandomState):
    """Ground truth (contiguous category ids, some crowd) and a noisy prediction of one image."""
    _, gt_ids, segments = render_image(spec, index, "val")
    gt_segments = [
        {
            "id": s["id"],
            "category_id": s["category_id"] - 1,  # dataset ids are 1-based, contiguous 0-based
            "iscrowd": int(s["category_id"] <= spec.num_thing_classes and rng.rand() < 0.1),
            "area": s["area"],
        }
        for s in segments
    ]
    cat_of = {s["id"]: s["category_id"] for s in gt_segments}

    labels = np.roll(gt_ids, tuple(rng.randint(-2, 3, size=2)), axis=(0, 1)).astype(np.int64)
    pred_cat = dict(cat_of)
    for seg_id in list(pred_cat):
        u = rng.rand()
        if u < 0.1:
            pred_cat[seg_id] = int(rng.randint(num_classes))
        elif u < 0.15:
            labels[labels == seg_id] = rng.choice(list(pred_cat))
        elif u < 0.2:
            labels[labels == seg_id] = 0
    h, w = labels.shape
    yy, xx = np.mgrid[0:h, 0:w]
    next_id = max(pred_cat, default=0) + 1
    for _ in range(rng.randint(0, 4)):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, 15)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = next_id
        pred_cat[next_id] = int(rng.randint(num_classes))
        next_id += 1
    labels[rng.rand(h, w) < 0.01] = 0
    # renumber 1..S: a model's ids; only segments with pixels are listed (panopticapi requires it)
    present = [int(i) for i in np.unique(labels) if i != 0]
    lut = np.zeros(int(labels.max()) + 1, dtype=np.int32)
    lut[present] = np.arange(1, len(present) + 1)
    pred_ids = lut[labels]
    pred_segments = [
        {"id": new, "category_id": pred_cat[old]} for new, old in enumerate(present, start=1)
    ]
    return gt_ids.astype(np.int64), gt_segments, pred_ids, pred_segments


def write_gt(root: Path, cases, categories) -> None:
    (root / "gt").mkdir()
    images, annotations = [], []
    for index, (gt_ids, gt_segments, _, _) in enumerate(cases):
        name = f"{index:06d}.png"
        Image.fromarray(id2rgb(gt_ids)).save(root / "gt" / name)
        images.append({"id": index, "file_name": name})
        annotations.append({"image_id": index, "file_name": name, "segments_info": gt_segments})
    gt_json = {"images": images, "annotations": annotations, "categories": categories}
    (root / "gt.json").write_text(json.dumps(gt_json))


def write_predictions(pred_dir: Path, cases) -> None:
    pred_dir.mkdir(exist_ok=True)
    annotations = []
    for index, (_, _, pred_ids, pred_segments) in enumerate(cases):
        name = f"{index:06d}.png"
        Image.fromarray(id2rgb(pred_ids)).save(pred_dir / name)
        annotations.append({"image_id": index, "file_name": name, "segments_info": pred_segments})
    (pred_dir.parent / "pred.json").write_text(json.dumps({"annotations": annotations}))


def run_panopticapi(root: Path) -> dict:
    from panopticapi.evaluation import pq_compute

    with contextlib.redirect_stdout(io.StringIO()):
        return pq_compute(
            str(root / "gt.json"), str(root / "pred.json"), str(root / "gt"), str(root / "pred")
        )


def run_hotcoco(root: Path) -> dict:
    from hotcoco.panoptic import pq_compute

    with contextlib.redirect_stdout(io.StringIO()):
        return pq_compute(
            str(root / "gt.json"), str(root / "pred.json"), str(root / "gt"), str(root / "pred")
        )


def run_ours(cases, num_classes: int, thing_ids, gt_files=None) -> dict:
    stats = PQStats(num_classes)
    for index, (gt_ids, gt_segments, pred_ids, pred_segments) in enumerate(cases):
        if gt_files is not None:
            gt_ids = read_panoptic_png(str(gt_files[index]))
        stats.add(match_segments(gt_ids, gt_segments, pred_ids, pred_segments, num_classes))
    stuff_ids = [c for c in range(num_classes) if c not in thing_ids]
    groups = {"All": range(num_classes), "Things": thing_ids, "Stuff": stuff_ids}
    return {name: pq_from_stats(stats, ids) for name, ids in groups.items()}


def best_time(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def max_difference(result: dict, reference: dict) -> float:
    return max(
        abs(float(result[g][m]) - float(reference[g][m]))
        for g, _ in GROUPS
        for m in ("pq", "sq", "rq")
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(REPO / "bench/results/pq_speed.json"))
    args = parser.parse_args()

    spec = SyntheticSpec(image_size=args.image_size, num_val=args.num_images)
    categories = [
        {"id": i, "name": c["name"], "isthing": c["isthing"]}
        for i, c in enumerate(synthetic_categories(spec))
    ]
    num_classes = len(categories)
    thing_ids = [c["id"] for c in categories if c["isthing"]]
    rng = np.random.RandomState(args.seed)
    print(f"rendering {args.num_images} images of {args.image_size} px ...", flush=True)
    cases = [make_case(spec, i, num_classes, rng) for i in range(args.num_images)]
    num_pixels = sum(c[0].size for c in cases)

    rows = []
    with tempfile.TemporaryDirectory(prefix="pq_speed_") as tmp:
        root = Path(tmp)
        write_gt(root, cases, categories)
        write_predictions(root / "pred", cases)
        t_api, reference = best_time(lambda: run_panopticapi(root), args.repeats)
        rows.append(("panopticapi", t_api, 0.0))

        def write_and_compute():
            write_predictions(root / "pred", cases)
            return run_panopticapi(root)

        t, result = best_time(write_and_compute, args.repeats)
        rows.append(("panopticapi+write", t, max_difference(result, reference)))
        try:
            import hotcoco  # noqa: F401
        except ImportError:
            print("hotcoco is not installed: skipped (pip install hotcoco to include it)")
        else:
            t, result = best_time(lambda: run_hotcoco(root), args.repeats)
            rows.append(("hotcoco", t, max_difference(result, reference)))

        t, result = best_time(lambda: run_ours(cases, num_classes, thing_ids), args.repeats)
        rows.append(("ours (arrays)", t, max_difference(result, reference)))
        gt_files = [root / "gt" / f"{i:06d}.png" for i in range(len(cases))]
        t, result = best_time(
            lambda: run_ours(cases, num_classes, thing_ids, gt_files), args.repeats
        )
        rows.append(("ours (+gt PNG read)", t, max_difference(result, reference)))

    print(
        f"\n{args.num_images} images of {args.image_size}x{args.image_size}, {num_classes} "
        f"classes, {os.cpu_count()} CPUs, best of {args.repeats}"
    )
    print("| method              |  time (s) | ms / image | vs panopticapi | max |diff| |")
    print("|---------------------|-----------|------------|----------------|------------|")
    for name, t, diff in rows:
        print(
            f"| {name:<19} | {t:9.3f} | {1000 * t / len(cases):10.3f} | {t_api / t:13.1f}x "
            f"| {diff:10.1e} |"
        )
    print(
        f"panopticapi runs {os.cpu_count()} worker processes (one per CPU); ours runs in the calling "
        "process, single-threaded; pin with `taskset -c 0` for a one-core comparison"
    )
    print(
        "PQ/SQ/RQ (All): "
        + ", ".join(f"{m}={100 * reference['All'][m]:.3f}" for m in ("pq", "sq", "rq"))
    )
    worst = max(diff for _, _, diff in rows)
    ok = worst <= 1e-9
    print("numbers equal to panopticapi (1e-9):", "yes" if ok else f"NO (max diff {worst:.2e})")

    out = {
        "num_images": args.num_images,
        "image_size": args.image_size,
        "num_pixels": num_pixels,
        "num_classes": num_classes,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "reference": {g: reference[g] for g, _ in GROUPS},
        "methods": {
            name: {"seconds": t, "speedup_vs_panopticapi": t_api / t, "max_abs_diff": diff}
            for name, t, diff in rows
        },
        "equal_to_panopticapi": ok,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1, default=float))
    print(f"wrote {args.output}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
