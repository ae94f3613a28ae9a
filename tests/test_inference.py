"""Semantic / panoptic inference on hand-made predictions, sigmoid vs softmax-across-queries masks."""

import math

import pytest
import torch

from comformer.modeling.inference import (
    instance_inference,
    mask_probabilities,
    panoptic_inference,
    semantic_inference,
)


def _logits_from_probs(probs):
    # log-probabilities are logits whose softmax gives back exactly these probabilities
    return torch.tensor(probs, dtype=torch.float64).log()


def test_mask_probabilities_rejects_unknown_activation():
    with pytest.raises(ValueError, match="softmax"):
        mask_probabilities(torch.zeros(2, 1, 1), "relu")


def test_semantic_inference_sigmoid_vs_softmax_hand_case():
    # 3 queries, 2 classes (+ no-object). q0 says class 0 with p=.5, q1 and q2 say class 1 with p=.5.
    mask_cls = _logits_from_probs([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.5, 0.25]])
    # one pixel: q0 is confident (logit 4), q1 and q2 are undecided (logit 0)
    mask_pred = torch.tensor([4.0, 0.0, 0.0], dtype=torch.float64).view(3, 1, 1)

    sig = 1 / (1 + math.exp(-4))
    sem = semantic_inference(mask_cls, mask_pred, "sigmoid")[:, 0, 0]
    # class 0: .5*sig(4) + .25*.5 + .25*.5 ; class 1: .25*sig(4) + .5*.5 + .5*.5
    assert sem[0].item() == pytest.approx(0.5 * sig + 0.25)
    assert sem[1].item() == pytest.approx(0.25 * sig + 0.5)
    assert sem.argmax().item() == 1  # the two undecided queries outvote the confident one

    w0 = math.exp(4) / (math.exp(4) + 2)  # softmax across queries of [4, 0, 0]
    w1 = 1 / (math.exp(4) + 2)
    sem = semantic_inference(mask_cls, mask_pred, "softmax")[:, 0, 0]
    assert sem[0].item() == pytest.approx(0.5 * w0 + 0.25 * 2 * w1)
    assert sem[1].item() == pytest.approx(0.25 * w0 + 0.5 * 2 * w1)
    assert sem.argmax().item() == 0  # under softmax the queries compete: the confident one wins


def _panoptic_case():
    # 2x2 image; classes: 0 = thing, 1 = stuff; 4 queries.
    mask_cls = _logits_from_probs(
        [
            [0.9, 0.05, 0.05],  # q0: thing, left column
            [0.05, 0.9, 0.05],  # q1: stuff, top-right pixel
            [0.05, 0.9, 0.05],  # q2: same stuff, bottom-right pixel -> merged into q1's segment
            [0.05, 0.05, 0.9],  # q3: no-object -> dropped
        ]
    )
    big, small = 10.0, -10.0
    mask_pred = torch.full((4, 2, 2), small, dtype=torch.float64)
    mask_pred[0, :, 0] = big
    mask_pred[1, 0, 1] = big
    mask_pred[2, 1, 1] = big
    # the no-object query claims every pixel, a little less strongly than the others
    mask_pred[3] = big - 2
    return mask_cls, mask_pred


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_panoptic_inference_hand_case(activation):
    mask_cls, mask_pred = _panoptic_case()
    pan, info = panoptic_inference(
        mask_cls,
        mask_pred,
        thing_ids={0},
        object_mask_threshold=0.8,
        overlap_threshold=0.8,
        mask_activation=activation,
    )
    assert pan.dtype == torch.int32
    assert pan.tolist() == [[1, 2], [1, 2]]
    assert info == [
        {"id": 1, "isthing": True, "category_id": 0},
        {"id": 2, "isthing": False, "category_id": 1},
    ]


def test_panoptic_inference_drops_low_scores_and_occluded_segments():
    mask_cls, mask_pred = _panoptic_case()
    # all scores are .9: a threshold above drops everything -> all void, no segments
    pan, info = panoptic_inference(
        mask_cls, mask_pred, thing_ids={0}, object_mask_threshold=0.95, overlap_threshold=0.8
    )
    assert info == [] and pan.abs().sum() == 0

    # q1 now claims the whole image but wins only its top-right pixel against the more confident
    # q0 (left column) and q2 (bottom-right): 1 won pixel of 4 < 0.8 -> q1 dropped.
    mask_cls2 = mask_cls.clone()
    mask_cls2[1] = _logits_from_probs([0.05, 0.85, 0.10])
    mask_pred2 = mask_pred.clone()
    mask_pred2[1] = 10.0
    pan, info = panoptic_inference(
        mask_cls2, mask_pred2, thing_ids={0}, object_mask_threshold=0.8, overlap_threshold=0.8
    )
    assert [s["category_id"] for s in info] == [0, 1]
    assert pan.tolist() == [[1, 0], [1, 2]]  # the pixel only q1 wanted stays void


def test_instance_inference_keeps_things_only_in_panoptic_mode():
    mask_cls, mask_pred = _panoptic_case()
    result = instance_inference(
        mask_cls, mask_pred, image_size=(2, 2), topk=3, thing_ids={0}, panoptic_on=True
    )
    assert set(result.pred_classes.tolist()) == {0}
    assert result.pred_masks.shape[1:] == (2, 2)
    assert torch.all(result.scores <= 1.0)


def test_instance_masks_binarise_logits_like_mask2former():
    # Mask2Former keeps pixels with logit > 0. A logit of 0, and a slightly negative one whose
    # float32 sigmoid rounds to 0.5, are NOT kept, though their "probability" is >= 0.5.
    mask_cls = torch.tensor([[2.0, 0.0]])  # 1 query, 1 class
    mask_pred = torch.tensor([[[0.0, -1e-9, 1e-3, -1.0]]])
    assert (mask_pred.sigmoid() >= 0.5).sum() == 3
    result = instance_inference(
        mask_cls, mask_pred, image_size=(1, 4), topk=1, thing_ids={0}, panoptic_on=False
    )
    assert result.pred_masks.tolist() == [[[0.0, 0.0, 1.0, 0.0]]]
