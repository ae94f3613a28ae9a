"""The fast paths give exactly the numbers of the straightforward ones.

* Panoptic inference: the vectorised version against the per-query reference on random small cases
  (a few queries, classes and pixels) drawn so that every branch of the reference occurs in the
  set: queries dropped by the score threshold or as no-object, stuff queries of one class merged
  into one segment, queries rejected by the overlap threshold, images without any segment. The
  test checks that these happen, so that the comparison cannot pass vacuously.
* Panoptic quality: the batched accumulator (many images matched together) against per-image
  matching, itself tested against panopticapi in test_panoptic_quality.py.
* Step-timing sections: a no-op when off, exclusive times when on.
"""

import numpy as np
import pytest
import torch

from comformer.modeling.inference import (
    mask_probabilities,
    panoptic_inference,
    panoptic_inference_reference,
)

NUM_CASES = 50


def _random_case(seed: int):
    rng = np.random.RandomState(seed)
    num_queries = int(rng.randint(1, 13))
    num_classes = int(rng.randint(2, 6))
    h, w = (int(v) for v in rng.randint(3, 12, size=2))
    # Peaked class distributions so that both kept and dropped queries occur; few classes so that
    # several queries often share a stuff class.
    mask_cls = torch.from_numpy(rng.randn(num_queries, num_classes + 1) * 3.0)
    # Blobs: low-resolution noise upsampled, so queries cover contiguous, overlapping regions.
    coarse = torch.from_numpy(rng.randn(num_queries, 1, 3, 3) * 4.0)
    mask_pred = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear")[:, 0]
    mask_pred = mask_pred + torch.from_numpy(rng.randn(num_queries, h, w) * 0.5)
    thing_ids = {int(c) for c in range(num_classes) if rng.rand() < 0.5}
    kwargs = dict(
        thing_ids=thing_ids,
        object_mask_threshold=float(rng.choice([0.0, 0.2, 0.4, 0.8])),
        overlap_threshold=float(rng.choice([0.0, 0.5, 0.8, 1.0])),
        mask_activation=str(rng.choice(["sigmoid", "softmax"])),
    )
    return mask_cls, mask_pred, kwargs


def _branches(mask_cls, mask_pred, kwargs, pan, info):
    """Which branches of the reference the case took (recomputed from inputs and output)."""
    num_classes = mask_cls.shape[-1] - 1
    scores, labels = mask_cls.softmax(-1).max(-1)
    keep = labels.ne(num_classes) & (scores > kwargs["object_mask_threshold"])
    probs = mask_probabilities(mask_pred, kwargs["mask_activation"])[keep]
    found = {"dropped": bool((~keep).any()), "empty": not info, "merged": False, "rejected": False}
    if probs.shape[0] == 0:
        return found
    winner = (scores[keep].view(-1, 1, 1) * probs).argmax(0)
    for k in range(probs.shape[0]):
        won_in_mask = (winner == k) & (probs[k] >= 0.5)
        if won_in_mask.any() and not pan[won_in_mask].any():
            found["rejected"] = True
    stuff_ids = [s["id"] for s in info if not s["isthing"]]
    for segment in stuff_ids:
        if torch.unique(winner[pan == segment]).numel() > 1:
            found["merged"] = True
    return found


def test_vectorised_equals_reference_on_random_cases():
    seen = {"dropped": 0, "empty": 0, "merged": 0, "rejected": 0}
    for seed in range(NUM_CASES):
        mask_cls, mask_pred, kwargs = _random_case(seed)
        ref_pan, ref_info = panoptic_inference_reference(mask_cls, mask_pred, **kwargs)
        pan, info = panoptic_inference(mask_cls, mask_pred, **kwargs)
        assert pan.dtype == torch.int32 and pan.shape == ref_pan.shape, seed
        assert torch.equal(pan, ref_pan), seed
        # Same segments in the same order, with the same Python types (json-serialisable ints).
        assert info == ref_info, seed
        for s in info:
            assert type(s["id"]) is int and type(s["category_id"]) is int
            assert type(s["isthing"]) is bool
        for name, hit in _branches(mask_cls, mask_pred, kwargs, ref_pan, ref_info).items():
            seen[name] += hit
    # Every branch was exercised by several cases (and some cases do produce segments).
    assert all(count >= 3 for count in seen.values()), seen
    assert seen["empty"] < NUM_CASES - 10, seen


def test_stuff_queries_of_one_class_share_the_first_ones_id_after_a_thing():
    # 1x4 image; classes 0 (thing) and 1 (stuff). q0 stuff on pixel 0, q1 thing on pixels 1-2,
    # q2 the same stuff on pixel 3: segments 1 (stuff, both q0 and q2) and 2 (thing).
    probs = [[0.05, 0.9, 0.05], [0.9, 0.05, 0.05], [0.05, 0.9, 0.05]]
    mask_cls = torch.tensor(probs, dtype=torch.float64).log()
    mask_pred = torch.full((3, 1, 4), -10.0, dtype=torch.float64)
    mask_pred[0, 0, 0] = mask_pred[1, 0, 1:3] = mask_pred[2, 0, 3] = 10.0
    kwargs = dict(thing_ids={0}, object_mask_threshold=0.5, overlap_threshold=0.8)
    for fn in (panoptic_inference, panoptic_inference_reference):
        pan, info = fn(mask_cls, mask_pred, **kwargs)
        assert pan.tolist() == [[1, 2, 2, 1]]
        assert info == [
            {"id": 1, "isthing": False, "category_id": 1},
            {"id": 2, "isthing": True, "category_id": 0},
        ]


def test_a_rejected_first_stuff_query_does_not_number_the_segment():
    # q0 (stuff 1) wins only half of its mask (q1, a thing, scores higher on the other half):
    # rejected at overlap 0.8. q2 (stuff 1) then opens the stuff segment, numbered after q1's.
    probs = [[0.02, 0.9, 0.08], [0.95, 0.03, 0.02], [0.02, 0.9, 0.08]]
    mask_cls = torch.tensor(probs, dtype=torch.float64).log()
    mask_pred = torch.full((3, 1, 4), -10.0, dtype=torch.float64)
    mask_pred[0, 0, 0:2] = 10.0
    mask_pred[1, 0, 1] = 10.0
    mask_pred[2, 0, 2:4] = 10.0
    kwargs = dict(thing_ids={0}, object_mask_threshold=0.5, overlap_threshold=0.8)
    for fn in (panoptic_inference_reference, panoptic_inference):
        pan, info = fn(mask_cls, mask_pred, **kwargs)
        assert pan.tolist() == [[0, 1, 2, 2]]
        assert info == [
            {"id": 1, "isthing": True, "category_id": 0},
            {"id": 2, "isthing": False, "category_id": 1},
        ]


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_no_kept_query_gives_an_empty_void_map(activation):
    mask_cls = torch.zeros(3, 4)
    mask_cls[:, -1] = 5.0  # every query says no-object
    pan, info = panoptic_inference(
        mask_cls,
        torch.randn(3, 5, 6),
        thing_ids={0},
        object_mask_threshold=0.0,
        overlap_threshold=0.8,
        mask_activation=activation,
    )
    assert info == [] and pan.dtype == torch.int32 and pan.shape == (5, 6) and not pan.any()


def test_ties_between_queries_go_to_the_first_as_in_the_reference():
    # Three identical queries of one thing class: every pixel is a tie, the first query wins all.
    mask_cls = torch.tensor([[4.0, 0.0, 0.0]] * 3)
    mask_pred = torch.full((3, 4, 5), -6.0)
    mask_pred[:, 1:3, 1:4] = 6.0
    kwargs = dict(thing_ids={0}, object_mask_threshold=0.5, overlap_threshold=0.8)
    ref_pan, ref_info = panoptic_inference_reference(mask_cls, mask_pred, **kwargs)
    pan, info = panoptic_inference(mask_cls, mask_pred, **kwargs)
    assert torch.equal(pan, ref_pan) and info == ref_info
    assert info == [{"id": 1, "isthing": True, "category_id": 0}]
    # the first query wins every pixel; its segment is its 2x3 mask; the others win nothing
    assert pan.tolist() == [[0] * 5] + [[0, 1, 1, 1, 0]] * 2 + [[0] * 5]


# ------------------------------------------------------------------ batched panoptic quality
def _seg(id, cat, crowd=0):
    return {"id": id, "category_id": cat, "iscrowd": crowd}


def test_crowd_regions_belong_to_their_own_image_when_images_are_batched():
    # Two 1x4 images, each with a crowd segment of class 0 on pixels 0-2 and a class-1 segment on
    # pixel 3; each prediction puts a class-0 segment on pixels 0-1 (all on the crowd: ignored,
    # no fp) and a class-1 segment on pixel 3 (tp, IoU 1). Batched, image 0's crowd region must
    # not be replaced by image 1's (the "last crowd segment of the class" is per image).
    from comformer.evaluation.panoptic_quality import PanopticGroundTruth, PQAccumulator

    gt = np.array([[4, 4, 4, 9]])
    gt_segments = [_seg(4, 0, crowd=1), _seg(9, 1)]
    pred = np.array([[1, 1, 0, 2]])
    pred_segments = [_seg(1, 0), _seg(2, 1)]
    accumulator = PQAccumulator(3)
    for _ in range(2):
        accumulator.add(PanopticGroundTruth(gt, gt_segments, 3), pred, pred_segments)
    stats = accumulator.stats()
    assert stats.fp.tolist() == [0, 0, 0] and stats.fn.tolist() == [0, 0, 0]
    assert stats.tp.tolist() == [0, 2, 0] and stats.iou_sum.tolist() == [0.0, 2.0, 0.0]


@pytest.mark.parametrize("chunk_size", [1, 3, 256])
def test_batched_counts_equal_per_image_counts(chunk_size):
    # Images of different sizes, ids and segment counts, crowd, void classes, unlisted gt ids,
    # model-style (1..S) and arbitrary predicted ids: one accumulator over all of them gives the
    # per-image counts summed (tp/fp/fn exactly, IoU sums to rounding), whatever the chunking.
    from test_panoptic_quality import K, _random_case

    from comformer.evaluation.panoptic_quality import (
        PanopticGroundTruth,
        PQAccumulator,
        PQStats,
        match_segments,
    )

    rng = np.random.RandomState(7)
    void_classes = [1, 4]
    accumulator = PQAccumulator(K, void_classes=void_classes, chunk_size=chunk_size)
    per_image = []
    for i in range(12):
        gt_ids, gt_segments, pred_ids, pred_segments, _ = _random_case(rng)
        if i % 2:  # renumber the prediction 1..S, as a model does (the no-lookup path)
            lut = {s["id"]: n for n, s in enumerate(pred_segments, start=1)}
            pred_ids = np.vectorize(lambda v: lut.get(int(v), 0))(pred_ids).astype(np.int32)
            pred_segments = [dict(s, id=lut[s["id"]]) for s in pred_segments]
        per_image.append(
            match_segments(gt_ids, gt_segments, pred_ids, pred_segments, K, void_classes)
        )
        accumulator.add(PanopticGroundTruth(gt_ids, gt_segments, K), pred_ids, pred_segments)
    expected = PQStats.merge(per_image)
    stats = accumulator.stats()
    assert stats.tp.sum() > 0 and stats.fp.sum() > 0 and stats.fn.sum() > 0
    for name in ("tp", "fp", "fn"):
        assert np.array_equal(getattr(stats, name), getattr(expected, name)), name
    np.testing.assert_allclose(stats.iou_sum, expected.iou_sum, rtol=0, atol=1e-12)
    # stats() flushes but does not reset: more images add to the same counts
    assert np.array_equal(accumulator.stats().tp, stats.tp)


def test_accumulator_rejects_bad_predictions_when_added():
    from comformer.evaluation.panoptic_quality import PanopticGroundTruth, PQAccumulator

    gt = PanopticGroundTruth(np.array([[1, 1]]), [_seg(1, 0)], 2)
    accumulator = PQAccumulator(2)
    with pytest.raises(ValueError, match=r"id\(s\) \[3\] appear in the id map but not"):
        accumulator.add(gt, np.array([[1, 3]], dtype=np.int32), [_seg(1, 0)])
    with pytest.raises(ValueError, match="negative id -1"):
        accumulator.add(gt, np.array([[1, -1]], dtype=np.int32), [_seg(1, 0)])
    with pytest.raises(ValueError, match="1x2 but the prediction is 1x3"):
        accumulator.add(gt, np.array([[1, 1, 1]]), [_seg(1, 0)])
    # uint8 ids times the number of gt rows must not overflow: 200 * 3 rows > 255
    pred = np.full((1, 2), 200, dtype=np.uint8)
    accumulator.add(gt, pred, [_seg(200, 0)])
    assert accumulator.stats().tp.tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"void_classes \[2\]"):
        PQAccumulator(2, void_classes=[2])


# ------------------------------------------------------------------ step timing sections
def test_timing_is_a_shared_no_op_when_disabled_and_exclusive_when_enabled(monkeypatch):
    from comformer.utils import timing

    timing.enable_timing(False)
    timing.reset_timing()
    assert timing.timed("a") is timing.timed("b")  # one shared null context, no clock read
    with timing.timed("a"):
        pass
    assert timing.timing_totals() == {}

    clock = iter([0.0, 1.0, 5.0, 5.0, 6.0, 10.0, 20.0, 23.0])
    monkeypatch.setattr(timing, "perf_counter", lambda: next(clock))

    @timing.timed_function("inner")
    def inner():
        return 42

    timing.enable_timing(True)
    try:
        with timing.timed("outer"):  # 0 .. 10
            assert inner() == 42  # 1 .. 5
            with timing.timed("inner"):  # 5 .. 6
                pass
        with timing.timed("inner"):  # 20 .. 23
            pass
    finally:
        timing.enable_timing(False)
    # outer: 10 - (4 + 1) = 5 exclusive; inner: 4 + 1 + 3 = 8
    assert timing.timing_totals() == {"outer": 5.0, "inner": 8.0}
    assert timing.timing_counts() == {"outer": 1, "inner": 3}
    timing.reset_timing()
    assert timing.timing_totals() == {}
