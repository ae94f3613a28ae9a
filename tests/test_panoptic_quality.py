"""In-memory PQ: hand-made cases worked out by hand, and equality with panopticapi's pq_compute."""

import json
import math
import multiprocessing

import numpy as np
import pytest
from PIL import Image

from comformer.evaluation.panoptic_quality import (
    PQStats,
    match_segments,
    pq_from_stats,
    read_panoptic_png,
)

K = 5  # classes 0, 1, 2 are things, 3, 4 stuff in the random cases
THINGS = (0, 1, 2)


def seg(id, cat, crowd=0):
    return {"id": id, "category_id": cat, "iscrowd": crowd}


def row(*ids):
    """A 1xN id map."""
    return np.array([ids], dtype=np.int64)


def counts(stats, c):
    return (int(stats.tp[c]), int(stats.fp[c]), int(stats.fn[c]), float(stats.iou_sum[c]))


# ----------------------------------------------------------------------------- hand-made cases
def test_exact_match():
    # one segment of class 0 covering the whole 2x2 image, predicted exactly: tp 1, IoU 1, PQ 1
    gt = np.ones((2, 2), dtype=np.int64)
    pred = np.full((2, 2), 5)
    stats = match_segments(gt, [seg(1, 0)], pred, [seg(5, 0)], K)
    assert counts(stats, 0) == (1, 0, 0, 1.0)
    assert stats.tp.sum() == 1 and stats.fp.sum() == 0 and stats.fn.sum() == 0
    assert pq_from_stats(stats, range(K)) == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1}


def test_iou_of_exactly_one_half_is_not_a_match():
    # gt [A A B B], A class 0, B class 1; pred P (class 0) over all 4 pixels.
    # IoU(A, P) = 2 / (4 + 2 - 2) = 0.5, not > 0.5: A is a fn, P a fp (no void under it);
    # B is a fn (P has another class). PQ: class 0 = 0 / (0 + .5 + .5) = 0, class 1 = 0.
    stats = match_segments(row(1, 1, 2, 2), [seg(1, 0), seg(2, 1)], row(7, 7, 7, 7), [seg(7, 0)], K)
    assert counts(stats, 0) == (0, 1, 1, 0.0)
    assert counts(stats, 1) == (0, 0, 1, 0.0)
    assert pq_from_stats(stats, range(K)) == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 2}


def test_iou_just_above_one_half_is_a_match():
    # gt: A (class 0) on 5 pixels, B (class 1) on 4; P (class 0) on all 9.
    # IoU(A, P) = 5 / (9 + 5 - 5) = 5/9 > 0.5: tp of class 0; B is a fn of class 1.
    # class 0: PQ = SQ = 5/9, RQ 1; class 1: PQ = SQ = RQ = 0 (SQ 0 without tp, as panopticapi).
    gt = row(1, 1, 1, 1, 1, 2, 2, 2, 2)
    stats = match_segments(gt, [seg(1, 0), seg(2, 1)], np.full_like(gt, 7), [seg(7, 0)], K)
    assert counts(stats, 0) == (1, 0, 0, pytest.approx(5 / 9))
    assert counts(stats, 1) == (0, 0, 1, 0.0)
    res = pq_from_stats(stats, range(K))
    assert res["pq"] == pytest.approx(5 / 18) and res["sq"] == pytest.approx(5 / 18)
    assert res["rq"] == 0.5 and res["n"] == 2
    # averaged over class 0 alone
    assert pq_from_stats(stats, [0])["pq"] == pytest.approx(5 / 9)


def test_void_pixels_are_left_out_of_the_union():
    # gt [A A A 0 0 0]; P (class 0) covers all 6 pixels.
    # union = 6 + 3 - 3 - 3 (P on void) = 3, IoU = 3/3 = 1 (it would be 0.5, no match, if void
    # counted).
    stats = match_segments(
        row(1, 1, 1, 0, 0, 0), [seg(1, 0)], row(7, 7, 7, 7, 7, 7), [seg(7, 0)], K
    )
    assert counts(stats, 0) == (1, 0, 0, 1.0)


def test_crowd_region_absorbs_a_false_positive_of_its_class_only():
    # gt [C C C C B B B B]: C crowd of class 0, B class 1.
    # pred P on [C C C B], Q on the other [B B B] (class 1).
    # Q matches B: IoU = 3 / (3 + 4 - 3) = 3/4. C, being crowd, is no fn.
    gt = row(1, 1, 1, 1, 2, 2, 2, 2)
    pred = row(0, 7, 7, 7, 7, 8, 8, 8)
    gt_segments = [seg(1, 0, crowd=1), seg(2, 1)]
    # P of class 0: 3 of its 4 pixels on the crowd of class 0 -> 3/4 > 0.5, ignored, no fp.
    stats = match_segments(gt, gt_segments, pred, [seg(7, 0), seg(8, 1)], K)
    assert counts(stats, 0) == (0, 0, 0, 0.0)
    assert counts(stats, 1) == (1, 0, 0, 0.75)
    # P of class 1: the crowd of class 0 does not excuse it; IoU(B, P) = 1 / (4 + 4 - 1) < .5 -> fp
    # class 1: PQ = 0.75 / (1 + 0.5) = 0.5
    stats = match_segments(gt, gt_segments, pred, [seg(7, 1), seg(8, 1)], K)
    assert counts(stats, 1) == (1, 1, 0, 0.75)
    assert pq_from_stats(stats, range(K))["pq"] == pytest.approx(0.5)


def test_false_positive_needs_more_than_half_on_void_to_be_ignored():
    # gt [A A 0 0 0], A class 0. P (class 1) on [A 0]: 1/2 on void, not > 1/2 -> fp of class 1
    gt = row(1, 1, 0, 0, 0)
    stats = match_segments(gt, [seg(1, 0)], row(0, 7, 7, 0, 0), [seg(7, 1)], K)
    assert counts(stats, 1) == (0, 1, 0, 0.0)
    # P on [A 0 0]: 2/3 on void -> ignored
    stats = match_segments(gt, [seg(1, 0)], row(0, 7, 7, 7, 0), [seg(7, 1)], K)
    assert counts(stats, 1) == (0, 0, 0, 0.0)


def test_only_the_last_crowd_segment_of_a_class_absorbs():
    # gt [C1 C1 C1 C2]: two crowd segments of class 0; P (class 0) on [C1 C1 C1].
    # panopticapi keeps one crowd region per class, the last listed: with C2 last, P is 0/3 on it
    # -> fp; with C1 last, 3/3 -> ignored.
    gt, pred = row(1, 1, 1, 2), row(7, 7, 7, 0)
    stats = match_segments(gt, [seg(1, 0, 1), seg(2, 0, 1)], pred, [seg(7, 0)], K)
    assert counts(stats, 0) == (0, 1, 0, 0.0)
    stats = match_segments(gt, [seg(2, 0, 1), seg(1, 0, 1)], pred, [seg(7, 0)], K)
    assert counts(stats, 0) == (0, 0, 0, 0.0)


def test_crowd_is_never_matched():
    # a prediction exactly on a crowd segment of its own class: no tp, no fn, and no fp (all of it
    # lies on crowd)
    stats = match_segments(row(1, 1), [seg(1, 0, crowd=1)], row(7, 7), [seg(7, 0)], K)
    assert stats.tp.sum() == stats.fp.sum() == stats.fn.sum() == 0
    assert pq_from_stats(stats, range(K))["n"] == 0
    assert math.isnan(pq_from_stats(stats, range(K))["pq"])


def test_class_mismatch():
    # same pixels, different class: fn of class 0, fp of class 1; PQ 0 over n = 2 classes
    stats = match_segments(row(1, 1, 1, 1), [seg(1, 0)], row(7, 7, 7, 7), [seg(7, 1)], K)
    assert counts(stats, 0) == (0, 0, 1, 0.0)
    assert counts(stats, 1) == (0, 1, 0, 0.0)
    assert pq_from_stats(stats, range(K)) == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 2}


def test_unseen_class_is_void():
    # gt [A A U U U U]: A class 0, U class 2. pred P (class 0) on [A A U U], Q (class 1) on [U U].
    gt, gt_segments = row(1, 1, 2, 2, 2, 2), [seg(1, 0), seg(2, 2)]
    pred, pred_segments = row(7, 7, 7, 7, 8, 8), [seg(7, 0), seg(8, 1)]
    # class 2 seen: IoU(A, P) = 2 / (4 + 2 - 2) = 0.5 -> no match: fn 0, fn 2, fp 0, fp 1.
    stats = match_segments(gt, gt_segments, pred, pred_segments, K)
    assert [counts(stats, c)[:3] for c in range(3)] == [(0, 1, 1), (0, 1, 0), (0, 0, 1)]
    # class 2 unseen (void): IoU(A, P) = 2 / (4 + 2 - 2 - 2) = 1 -> tp; Q lies on void only -> no
    # fp; U is no fn.
    stats = match_segments(gt, gt_segments, pred, pred_segments, K, void_classes=[2])
    assert counts(stats, 0) == (1, 0, 0, 1.0)
    assert stats.fp.sum() == 0 and stats.fn.sum() == 0


def test_empty_images_and_void_predictions():
    gt = np.zeros((3, 3), dtype=np.int64)
    stats = match_segments(gt, [], gt, [], K)
    assert stats.tp.sum() == stats.fp.sum() == stats.fn.sum() == 0
    # a gt segment predicted as void everywhere: one fn
    stats = match_segments(np.ones((3, 3), dtype=np.int64), [seg(1, 3)], gt, [], K)
    assert counts(stats, 3) == (0, 0, 1, 0.0)
    # a prediction on an all-void image is ignored (all of it is void)
    stats = match_segments(gt, [], np.ones((3, 3), dtype=np.int64), [seg(1, 4)], K)
    assert stats.fp.sum() == 0


def test_listed_gt_segment_without_pixels_is_a_false_negative_and_empty_prediction_is_ignored():
    # gt lists B (class 1) but no pixel has id 2 -> fn (panopticapi counts it so too);
    # pred lists Q without pixels -> ignored (panopticapi would refuse the file)
    stats = match_segments(row(1, 1), [seg(1, 0), seg(2, 1)], row(7, 7), [seg(7, 0), seg(9, 3)], K)
    assert counts(stats, 0) == (1, 0, 0, 1.0)
    assert counts(stats, 1) == (0, 0, 1, 0.0)
    assert stats.fp.sum() == 0


def test_unlisted_gt_pixels_count_in_the_union_but_not_as_void():
    # gt [A A X X]: X (id 5) is not in segments_info. P on all 4: IoU(A, P) = 2 / 4 -> no match,
    # and P is a fp (X is not void, so only 0 of its pixels are ignored).
    stats = match_segments(row(1, 1, 5, 5), [seg(1, 0)], row(7, 7, 7, 7), [seg(7, 0)], K)
    assert counts(stats, 0) == (0, 1, 1, 0.0)


def test_large_gt_ids_take_the_binary_search_path():
    # ids of COCO panoptic PNGs reach 2^24; the same case as test_iou_just_above_one_half
    big_a, big_b = 2**24 - 3, 2**23 + 11
    gt = np.where(row(1, 1, 1, 1, 1, 2, 2, 2, 2) == 1, big_a, big_b)
    stats = match_segments(gt, [seg(big_a, 0), seg(big_b, 1)], np.full_like(gt, 7), [seg(7, 0)], K)
    assert counts(stats, 0) == (1, 0, 0, pytest.approx(5 / 9))
    assert counts(stats, 1) == (0, 0, 1, 0.0)


def test_bad_inputs_raise_clear_errors():
    gt = row(1, 1)
    with pytest.raises(ValueError, match="not in segments_info"):
        match_segments(gt, [seg(1, 0)], row(7, 8), [seg(7, 0)], K)
    with pytest.raises(ValueError, match="category_id 5"):
        match_segments(gt, [seg(1, 0)], row(7, 7), [seg(7, 5)], K)
    with pytest.raises(ValueError, match=r"1x2 .* 1x3"):
        match_segments(gt, [seg(1, 0)], row(7, 7, 7), [seg(7, 0)], K)
    with pytest.raises(ValueError, match="0 marks void"):
        match_segments(gt, [seg(1, 0)], row(0, 0), [seg(0, 0)], K)
    with pytest.raises(ValueError, match="more than once"):
        match_segments(gt, [seg(1, 0), seg(1, 2)], row(0, 0), [], K)
    with pytest.raises(ValueError, match=r"class ids \[7\]"):
        pq_from_stats(PQStats(K), [0, 7])


def test_stats_add_and_merge():
    a = match_segments(row(1, 1), [seg(1, 0)], row(7, 7), [seg(7, 0)], K)
    b = match_segments(row(1, 1), [seg(1, 0)], row(7, 7), [seg(7, 1)], K)
    total = PQStats.merge([a, b])
    assert counts(total, 0) == (1, 0, 1, 1.0) and counts(total, 1) == (0, 1, 0, 0.0)
    # class 0: PQ = 1 / (1 + .5) = 2/3, class 1: 0 -> mean 1/3
    assert pq_from_stats(total, range(K))["pq"] == pytest.approx(1 / 3)
    a += b
    assert np.array_equal(a.tp, total.tp) and np.array_equal(a.fn, total.fn)
    with pytest.raises(ValueError, match="3 classes"):
        a.add(PQStats(3))


def test_read_panoptic_png(tmp_path):
    # id = R + 256 G + 256^2 B, up to 2^24 - 1
    ids = np.array([[0, 1, 255, 256], [65535, 65536, 2**24 - 1, 1234567]])
    Image.fromarray(_id2rgb(ids)).save(tmp_path / "pan.png")
    assert np.array_equal(read_panoptic_png(str(tmp_path / "pan.png")), ids)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png"):
        read_panoptic_png(str(tmp_path / "bad.png"))


# ------------------------------------------------------------------- equality with panopticapi
def _random_case(rng):
    """
    Returns:
        gt ids (with unique random ids), gt segments (some crowd, one maybe unlisted), pred ids,
        pred segments, void classes.
    """
    h, w = rng.randint(24, 48, size=2)
    yy, xx = np.mgrid[0:h, 0:w]
    # stuff: both stuff classes, split by a random line, a third region of either
    labels = np.where(
        (yy - rng.uniform(0, h)) * rng.uniform(-1, 1) + (xx - rng.uniform(0, w)) > 0, 0, 1
    )
    cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, 10)
    labels[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 2
    classes = [3, 4, rng.choice([3, 4])]
    # things: at least one of each class, as ellipses drawn over each other
    thing_classes = [0, 1, 2] + list(rng.randint(0, 3, size=rng.randint(0, 5)))
    for cat in thing_classes:
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(2, 9, size=2)
        labels[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = len(classes)
        classes.append(cat)
    present = np.unique(labels)
    gt_ids = np.zeros((h, w), dtype=np.int64)
    ids = rng.randint(1, 2**24, size=len(present))
    while np.unique(ids).size < ids.size:
        ids = rng.randint(1, 2**24, size=len(present))
    if rng.rand() < 0.5:
        ids = np.arange(1, len(present) + 1) * rng.randint(1, 50)
    segments = []
    for seg_index, new_id in zip(present, ids):
        gt_ids[labels == seg_index] = new_id
        cat = classes[seg_index]
        crowd = int(cat in THINGS and seg_index >= 6 and rng.rand() < 0.4)
        segments.append({"id": int(new_id), "category_id": int(cat), "iscrowd": crowd})
    # random void: a rectangle and salt
    y0, x0 = rng.randint(0, h), rng.randint(0, w)
    gt_ids[y0 : y0 + rng.randint(0, h // 2), x0 : x0 + rng.randint(0, w // 2)] = 0
    gt_ids[rng.rand(h, w) < 0.05] = 0
    if rng.rand() < 0.3:
        segments.pop(rng.randint(len(segments)))  # its pixels stay, unlisted

    # prediction: the gt labels shifted, some segments merged, reclassified or dropped, plus blobs
    dy, dx = rng.randint(-2, 3, size=2)
    pred_labels = np.roll(labels, (dy, dx), axis=(0, 1))
    pred_classes = list(classes)
    for i in range(len(pred_classes)):
        u = rng.rand()
        if u < 0.1:
            pred_classes[i] = int(rng.randint(K))
        elif u < 0.15:
            pred_labels[pred_labels == i] = rng.choice(present)
        elif u < 0.2:
            pred_labels[pred_labels == i] = -1
    for _ in range(rng.randint(0, 4)):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1, 7)
        pred_labels[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = len(pred_classes)
        pred_classes.append(int(rng.randint(K)))
    pred_labels[rng.rand(h, w) < 0.03] = -1
    pred_ids = np.zeros((h, w), dtype=np.int64)
    pred_segments = []
    for i in np.unique(pred_labels):
        if i < 0:
            continue
        new_id = int(rng.randint(1, 2**24))
        while new_id in pred_ids:
            new_id = int(rng.randint(1, 2**24))
        pred_ids[pred_labels == i] = new_id
        pred_segments.append({"id": new_id, "category_id": int(pred_classes[i])})
    void_classes = []
    if rng.rand() < 0.5:
        void_classes = [int(rng.choice(THINGS))] + ([int(rng.choice([3, 4]))] * (rng.rand() < 0.5))
    return gt_ids, segments, pred_ids, pred_segments, void_classes


def _id2rgb(ids):
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def _write_panopticapi_files(root, cases):
    """gt and prediction folders + jsons; void classes are applied by erasing their gt segments."""
    categories = [{"id": c, "name": f"c{c}", "isthing": int(c in THINGS)} for c in range(K)]
    gt_json = {"images": [], "annotations": [], "categories": categories}
    pred_json = {"annotations": []}
    (root / "gt").mkdir()
    (root / "pred").mkdir()
    for index, (gt_ids, segments, pred_ids, pred_segments, void_classes) in enumerate(cases):
        gt_ids = gt_ids.copy()
        kept = []
        for s in segments:
            if s["category_id"] in void_classes:
                gt_ids[gt_ids == s["id"]] = 0
            else:
                kept.append(dict(s, area=int((gt_ids == s["id"]).sum())))
        name = f"{index:04d}.png"
        Image.fromarray(_id2rgb(gt_ids)).save(root / "gt" / name)
        Image.fromarray(_id2rgb(pred_ids)).save(root / "pred" / name)
        gt_json["images"].append({"id": index, "file_name": name})
        gt_json["annotations"].append({"image_id": index, "file_name": name, "segments_info": kept})
        pred_json["annotations"].append(
            {"image_id": index, "file_name": name, "segments_info": pred_segments}
        )
    (root / "gt.json").write_text(json.dumps(gt_json))
    (root / "pred.json").write_text(json.dumps(pred_json))


def _panopticapi(root):
    from panopticapi.evaluation import pq_compute

    return pq_compute(
        str(root / "gt.json"), str(root / "pred.json"), str(root / "gt"), str(root / "pred")
    )


def _assert_equal_to_panopticapi(stats, ref):
    for name, ids in (("All", range(K)), ("Things", THINGS), ("Stuff", (3, 4))):
        ours = pq_from_stats(stats, ids)
        assert ours["n"] == ref[name]["n"], name
        for m in ("pq", "sq", "rq"):
            assert abs(ours[m] - ref[name][m]) <= 1e-9, (name, m, ours, ref[name])
    per_class = stats.per_class()
    for c in range(K):
        for m in ("pq", "sq", "rq"):
            expected = ref["per_class"][c][m]
            if per_class["valid"][c]:
                assert abs(per_class[m][c] - expected) <= 1e-9, (c, m)
            else:
                assert math.isnan(per_class[m][c]) and expected == 0.0


@pytest.fixture
def one_panopticapi_process(monkeypatch):
    # pq_compute starts one worker per cpu; one is enough for these tiny cases
    monkeypatch.setattr(multiprocessing, "cpu_count", lambda: 1)


@pytest.mark.parametrize("seed", range(20))
def test_equal_to_panopticapi_on_random_cases(seed, tmp_path, one_panopticapi_process):
    rng = np.random.RandomState(seed)
    case = _random_case(rng)
    gt_ids, segments, pred_ids, pred_segments, void_classes = case
    stats = match_segments(gt_ids, segments, pred_ids, pred_segments, K, void_classes)
    # the cases exercise what they are meant to
    assert stats.tp.sum() + stats.fp.sum() + stats.fn.sum() > 0
    _write_panopticapi_files(tmp_path, [case])
    _assert_equal_to_panopticapi(stats, _panopticapi(tmp_path))


def test_equal_to_panopticapi_summed_over_images(tmp_path, one_panopticapi_process):
    rng = np.random.RandomState(1000)
    cases = [_random_case(rng) for _ in range(20)]
    stats = PQStats.merge(match_segments(*c[:4], K, c[4]) for c in cases)
    assert (stats.tp > 0).all() and (stats.fp > 0).any() and (stats.fn > 0).any()
    _write_panopticapi_files(tmp_path, cases)
    _assert_equal_to_panopticapi(stats, _panopticapi(tmp_path))
