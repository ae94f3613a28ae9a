"""The vectorised panoptic inference gives exactly the output of the per-query reference.

Random small cases (a few queries, classes and pixels) are drawn so that every branch of the
reference occurs in the set: queries dropped by the score threshold or as no-object, stuff queries
of one class merged into one segment, queries rejected by the overlap threshold, images without any
segment. The test checks that these happen, so that the comparison cannot pass vacuously.
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
