"""Continual methods MiB, CoMFormer and PLOP: losses on hand-worked tensors, invariants, and one
training forward/backward of each method on a tiny model (teacher = step 0, student = step 1)."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.projects.deeplab import add_deeplab_config
from detectron2.structures import BitMasks, Instances

from comformer import add_comformer_config
from comformer.continual import (
    build_continual_model,
    build_method,
    class_embed,
    grow_classifier_state_dict,
)
from comformer.continual.defaults import setting_default
from comformer.continual.losses import (
    ClassificationLoss,
    classification_loss,
    distillation_loss,
    distillation_weights,
    unbiased_ce_log_probs,
    unbiased_kd_log_probs,
)
from comformer.continual.mib import mib_init_classifier
from comformer.continual.plop import local_pod_embedding, pod_loss
from comformer.continual.pseudo_labels import (
    add_pseudo_labels,
    covered_by_targets,
    entropy_pseudo_labels,
    mask_pseudo_labels,
)
from comformer.data.scenario import build_scenario
from comformer.engine.step_config import step_config
from comformer.modeling.criterion import SetCriterion
from comformer.modeling.head import MaskFormerHead
from comformer.modeling.matcher import HungarianMatcher

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC_CFG = REPO / "configs/synthetic/panoptic-segmentation/maskformer2_R18_cpu.yaml"


def _logits(*probs):
    """Logits whose softmax is ``probs`` (up to normalisation)."""
    return torch.tensor(probs, dtype=torch.float32).log()


# ------------------------------------------------------------------ classification losses
def test_unbiased_ce_log_probs_by_hand():
    # classes [old 0, new 1, new 2, no-object], probabilities 0.1 0.2 0.3 0.4
    logits = _logits(1, 2, 3, 4)
    out = unbiased_ce_log_probs(logits, num_old=1).exp()
    # own probabilities for the classes, no-object absorbs old class 0: 0.4 + 0.1
    torch.testing.assert_close(out, torch.tensor([0.1, 0.2, 0.3, 0.5]))
    # no old classes: the ordinary softmax
    torch.testing.assert_close(
        unbiased_ce_log_probs(logits, 0).exp(), torch.tensor([0.1, 0.2, 0.3, 0.4])
    )


def test_classification_loss_values_by_hand():
    logits = torch.stack([_logits(1, 2, 3, 4), _logits(1, 2, 3, 4)])[None]  # (1, 2, 4)
    targets = torch.tensor([[1, 3]])  # query 0 -> new class 1, query 1 -> no-object
    # unbiased: -log 0.2 = log 5 and -log(0.4 + 0.1) = log 2, plain mean over queries
    loss = classification_loss(logits, targets, num_old_absorbed=1)
    torch.testing.assert_close(loss, torch.tensor((math.log(5) + math.log(2)) / 2))
    # ordinary CE weighted by empty_weight (no-object 0.1): (log 5 + 0.1 log 2.5) / 1.1
    weight = torch.tensor([1.0, 1.0, 1.0, 0.1])
    loss = classification_loss(logits, targets, class_weight=weight)
    torch.testing.assert_close(loss, torch.tensor((math.log(5) + 0.1 * math.log(2.5)) / 1.1))


def test_focal_loss_value_by_hand():
    logits = torch.stack([_logits(1, 1, 1, 1), _logits(1, 2, 3, 4)])[None]
    targets = torch.tensor([[0, 1]])
    # p_t = 0.25 and 0.2: alpha (1 - p_t)^gamma (-log p_t), averaged over the 2 queries
    loss = classification_loss(logits, targets, focal_alpha=5.0, focal_gamma=1.0)
    expected = (5 * 0.75 * math.log(4) + 5 * 0.8 * math.log(5)) / 2
    torch.testing.assert_close(loss, torch.tensor(expected))
    loss = classification_loss(logits, targets, focal_alpha=2.0, focal_gamma=2.0)
    expected = (2 * 0.75**2 * math.log(4) + 2 * 0.8**2 * math.log(5)) / 2
    torch.testing.assert_close(loss, torch.tensor(expected))
    # empty_weight does not enter the focal loss
    weighted = classification_loss(
        logits, targets, focal_alpha=2.0, focal_gamma=2.0, class_weight=torch.tensor([9.0] * 4)
    )
    torch.testing.assert_close(weighted, loss)


# ------------------------------------------------------------------ distillation
def test_unbiased_kd_log_probs_regroup_the_new_classes():
    out = unbiased_kd_log_probs(_logits(1, 2, 3, 4), num_old=1).exp()
    torch.testing.assert_close(out, torch.tensor([0.1, 0.9]))  # 0.9 = 0.2 + 0.3 + 0.4


def test_distillation_values_by_hand():
    student = _logits(1, 2, 3, 4)[None, None]  # [old, new, new, no-object]
    teacher = _logits(1, 1)[None, None]  # [old, no-object] = 0.5 0.5
    # unbiased: student (0.1, 0.9); KL = 0.5 log(0.5/0.1) + 0.5 log(0.5/0.9) = log(5/3)
    kd = distillation_loss(student, teacher, unbiased=True)
    torch.testing.assert_close(kd, torch.tensor(math.log(5 / 3)))
    # plain: the new classes are dropped, student (0.1, 0.4) / 0.5 = (0.2, 0.8);
    # KL = 0.5 log(2.5) + 0.5 log(0.625) = log(1.25)
    kd = distillation_loss(student, teacher, unbiased=False)
    torch.testing.assert_close(kd, torch.tensor(math.log(1.25)))


def test_reweighted_distillation_by_hand():
    # query 0: KL log(5/3) (above), teacher no-object 0.5 -> weight 0.25
    # query 1: teacher (0.25, 0.75) -> weight 0.0625; student (0.25 | 0.75 regrouped) -> KL 0
    student = torch.stack([_logits(1, 2, 3, 4), _logits(1, 1, 1, 1)])[None]
    teacher = torch.stack([_logits(1, 1), _logits(1, 3)])[None]
    kd = distillation_loss(student, teacher, reweight=True)
    torch.testing.assert_close(kd, torch.tensor(0.25 * math.log(5 / 3) / 0.3125))
    # without reweighting: the mean over the 2 queries
    kd = distillation_loss(student, teacher, reweight=False)
    torch.testing.assert_close(kd, torch.tensor(math.log(5 / 3) / 2))


def test_distillation_temperature_divides_teacher_logits():
    student = _logits(1, 1, 1, 1)[None, None]  # regrouped (0.25, 0.75)
    teacher = _logits(1, 9)[
        None, None
    ]  # (0.1, 0.9); at T = 2: logits halved -> (1, 3) -> (0.25, 0.75)
    assert distillation_loss(student, teacher, temperature=2.0).abs() < 1e-6
    expected = 0.1 * math.log(0.1 / 0.25) + 0.9 * math.log(0.9 / 0.75)
    torch.testing.assert_close(distillation_loss(student, teacher), torch.tensor(expected))


def test_unbiased_kd_equals_plain_kd_without_new_classes():
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 7, 6), torch.randn(3, 7, 6)  # K = K_old = 5
    for reweight in (False, True):
        a = distillation_loss(student, teacher, unbiased=True, reweight=reweight)
        b = distillation_loss(student, teacher, unbiased=False, reweight=reweight)
        torch.testing.assert_close(a, b)
        assert a > 0


def test_student_equal_to_teacher_gives_zero_distillation():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 4)
    for unbiased in (False, True):
        for reweight in (False, True):
            kd = distillation_loss(logits, logits.clone(), unbiased=unbiased, reweight=reweight)
            assert kd.abs() < 1e-6


def test_distillation_weights_in_unit_interval_and_certain_no_object_weighs_zero():
    torch.manual_seed(0)
    probs = torch.randn(4, 10, 6).softmax(-1)
    w = distillation_weights(probs)
    assert (w >= 0).all() and (w <= 1).all()
    certain = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(distillation_weights(certain), torch.tensor([0.0, 1.0]))
    # in the loss: the certain no-object query (weight exactly 0 in fp32) does not count, however
    # different the student is; the other query's KL is log(5/3) (see above)
    student = torch.stack([torch.tensor([9.0, -9.0, 9.0, -9.0]), _logits(1, 2, 3, 4)])[None]
    teacher = torch.stack([torch.tensor([-100.0, 100.0]), _logits(1, 1)])[None]
    kd = distillation_loss(student, teacher, reweight=True)
    torch.testing.assert_close(kd, torch.tensor(math.log(5 / 3)))
    # only certain no-object queries: nothing to distil, 0 rather than 0 / 0
    kd = distillation_loss(student[:, :1], teacher[:, :1], reweight=True)
    assert kd == 0


# ------------------------------------------------------------------ MiB init
def test_mib_init_splits_old_no_object_probability():
    torch.manual_seed(0)
    num_old, num_new, dim = 3, 4, 8
    old = nn.Linear(dim, num_old + 1)
    new = nn.Linear(dim, num_old + num_new + 1)
    with torch.no_grad():
        for p_new, p_old in ((new.weight, old.weight), (new.bias, old.bias)):
            p_new[:num_old] = p_old[:num_old]
            p_new[-1] = p_old[-1]
    mib_init_classifier(new, num_old, num_new)
    x = torch.randn(50, dim) * 3
    p_old, p_new = old(x).softmax(-1), new(x).softmax(-1)
    torch.testing.assert_close(p_new[:, num_old:].sum(-1), p_old[:, -1])
    torch.testing.assert_close(p_new[:, :num_old], p_old[:, :num_old])
    # the no-object probability is shared evenly by no-object and the new classes
    torch.testing.assert_close(
        p_new[:, num_old:], p_old[:, -1:].expand(-1, num_new + 1) / (num_new + 1)
    )
    with pytest.raises(ValueError, match="expected old 3 \\+ new 5"):
        mib_init_classifier(new, num_old, 5)


# ------------------------------------------------------------------ pseudo-labels
def _pseudo_case():
    """
    Teacher on 3 images of 4x4 pixels, 3 queries, 2 old classes (+ no-object = index 2):
      query 0: class 0, mask = rows 0-1 (8 px), elsewhere logit -10;
      query 1: class 1, mask = rows 2-3, cols 0-1 (4 px), elsewhere logit -5 (so it wins the
               pixels nobody claims, rows 2-3 cols 2-3, which are outside its binarised mask);
      query 2: no-object, mask = rows 2-3, cols 2-3 (dropped).
    """
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    masks = torch.full((3, 4, 4), -10.0)
    masks[0, :2] = 10
    masks[1] = -5
    masks[1, 2:, :2] = 10
    masks[2, 2:, 2:] = 10
    gt = torch.zeros(3, 1, 4, 4, dtype=torch.bool)
    gt[0, 0, 0] = True  # image 0: the ground truth covers row 0
    gt[1, 0, 0, :2] = True  # image 1: row 0, cols 0-1 only
    # image 2: no ground truth at all
    targets = [
        {"labels": torch.tensor([5]), "masks": gt[0]},
        {"labels": torch.tensor([5]), "masks": gt[1]},
        {
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, 4, 4, dtype=torch.bool),
        },
    ]
    return logits[None].repeat(3, 1, 1), masks[None].repeat(3, 1, 1, 1), targets


def test_mask_pseudo_labels_hand_drawn_case():
    logits, masks, targets = _pseudo_case()
    covered = covered_by_targets(targets, (4, 4))
    pseudo = mask_pseudo_labels(logits, masks, covered, mask_activation="sigmoid")
    query1 = torch.zeros(4, 4, dtype=torch.bool)
    query1[2:, :2] = True

    # image 0: query 0 wins row 1 only (4 px), exactly half its 8 px mask: not more than half,
    # rejected. Query 1 wins 8 px (its 4 + the 4 unclaimed) > 4 / 2: accepted, and its segment is
    # what it won inside its binarised mask. Query 2 is no-object.
    labels, segs = pseudo[0]
    assert labels.tolist() == [1]
    assert torch.equal(segs[0], query1)

    # image 1: query 0 wins 6 px (rows 0-1 minus the 2 ground-truth pixels) > 8 / 2: accepted.
    labels, segs = pseudo[1]
    assert labels.tolist() == [0, 1]
    query0 = torch.zeros(4, 4, dtype=torch.bool)
    query0[:2] = True
    query0[0, :2] = False
    assert torch.equal(segs[0], query0)
    assert torch.equal(segs[1], query1)

    # image 2 (no ground truth): query 0 wins all of its 8 px
    labels, segs = pseudo[2]
    assert labels.tolist() == [0, 1]
    assert int(segs[0].sum()) == 8

    for (labels, segs), cov in zip(pseudo, covered):
        assert not (segs & cov).any(), "a pseudo segment touches ground-truth pixels"
        assert segs.dtype == torch.bool and labels.dtype == torch.int64


def test_mask_pseudo_labels_threshold_and_merge():
    logits, masks, targets = _pseudo_case()
    covered = covered_by_targets(targets, (4, 4))
    # class scores are e^5 / (e^5 + 2) = 0.9867: a 0.99 threshold drops every query
    pseudo = mask_pseudo_labels(
        logits, masks, covered, mask_activation="sigmoid", score_threshold=0.99
    )
    assert all(len(labels) == 0 and segs.shape == (0, 4, 4) for labels, segs in pseudo)
    pseudo = mask_pseudo_labels(logits, masks, covered, mask_activation="sigmoid")
    merged = add_pseudo_labels(targets, pseudo)
    assert [t["labels"].tolist() for t in merged] == [[5, 1], [5, 0, 1], [0, 1]]
    assert all(t["masks"].dtype == torch.bool for t in merged)
    assert targets[0]["labels"].tolist() == [5]  # the inputs are left alone
    with pytest.raises(ValueError, match="padded image size"):
        covered_by_targets(targets, (8, 8))


def test_mask_pseudo_labels_softmax_masks_normalise_over_all_queries():
    # Two queries, a 1x2 image. Query 0 (class 0) has mask logit 1 at both pixels; the no-object
    # query 1 has 1 at pixel 0 and 3 at pixel 1. Softmax across both queries: query 0 has
    # probability 0.5 at pixel 0 and 1 / (1 + e^2) = 0.12 at pixel 1, so its binarised mask is
    # pixel 0. It wins both pixels (the no-object query is dropped): 2 > 1 / 2, and its segment
    # is the won pixels inside its binarised mask: pixel 0 only.
    logits = torch.tensor([[[5.0, 0.0], [0.0, 5.0]]])
    masks = torch.tensor([[[[1.0, 1.0]], [[1.0, 3.0]]]])
    covered = torch.zeros(1, 1, 2, dtype=torch.bool)
    ((labels, segs),) = mask_pseudo_labels(logits, masks, covered, mask_activation="softmax")
    assert labels.tolist() == [0]
    assert segs.tolist() == [[[True, False]]]


def test_entropy_pseudo_labels_hand_drawn_case():
    # One old class (index 0) + no-object (1). Query 0 is class 0 for sure, query 1 no-object for
    # sure. Softmax masks on a 1x4 row: query 0's probability m = 1 (px 0), 0.6 (px 1), 0.9
    # (px 2), 0 (px 3), so the pixel distribution is (m, 1 - m), normalised entropy H(m) / log 2:
    # ~0, 0.971, 0.469, ~0 (px 3 is no-object: no candidate).
    m = torch.tensor([1 - 1e-6, 0.6, 0.9, 1e-6])
    logits = torch.tensor([[[30.0, 0.0], [0.0, 30.0]]])
    masks = torch.stack([torch.log(m / (1 - m)), torch.zeros(4)])[None, :, None]  # (1, 2, 1, 4)
    no_gt = torch.zeros(1, 1, 4, dtype=torch.bool)
    # class-0 median (lower) of (0, 0.469, 0.971) is 0.469: only px 0 is below it
    ((labels, segs),) = entropy_pseudo_labels(logits, masks, no_gt, mask_activation="softmax")
    assert labels.tolist() == [0]
    assert segs.tolist() == [[[True, False, False, False]]]
    # px 0 covered by the ground truth: candidates (0.971, 0.469), lower median 0.469, nothing
    # strictly below: no segment ...
    gt = torch.tensor([[[True, False, False, False]]])
    ((labels, segs),) = entropy_pseudo_labels(logits, masks, gt, mask_activation="softmax")
    assert labels.numel() == 0
    # ... unless the base threshold 0.5 lifts the class threshold: px 2 (0.469) is confident
    ((labels, segs),) = entropy_pseudo_labels(
        logits, masks, gt, mask_activation="softmax", base_threshold=0.5
    )
    assert labels.tolist() == [0]
    assert segs.tolist() == [[[False, False, True, False]]]


# ------------------------------------------------------------------ POD
def test_local_pod_embedding_and_loss_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, None]  # (1, 1, 2, 2)
    emb = local_pod_embedding(x, scales=(1, 2, 4))  # scale 4 does not fit a 2x2 map: skipped
    # scale 1: rows pooled along the width (1.5, 3.5), columns along the height (2, 3);
    # scale 2: 1x1 windows, each pooling gives the pixel itself: (1, 2, 3, 4) twice
    assert sorted(emb[0].tolist()) == sorted([1.5, 3.5, 2, 3] + [1, 2, 3, 4] * 2)
    zero = torch.zeros_like(x)
    # ||emb - 0|| = sqrt(1.5^2 + 3.5^2 + 2^2 + 3^2 + 2 (1 + 4 + 9 + 16)) = sqrt(87.5)
    torch.testing.assert_close(pod_loss([x], [zero]), torch.tensor(math.sqrt(87.5)))
    # averaged over images (a second, identical image adds 0) and over feature maps
    batch = torch.cat([x, zero])
    torch.testing.assert_close(
        pod_loss([batch], [zero.repeat(2, 1, 1, 1)]), torch.tensor(math.sqrt(87.5) / 2)
    )
    torch.testing.assert_close(pod_loss([x, zero], [zero, zero]), torch.tensor(math.sqrt(87.5) / 2))
    # a 2x4 map at scale 2: 2x2 windows of 1x2 cells
    y = torch.arange(8.0).view(1, 1, 2, 4)
    assert local_pod_embedding(y, scales=(2,)).shape == (1, 2 * 2 * 1 + 2 * 2 * 2)
    with pytest.raises(ValueError, match="smaller than every scale"):
        local_pod_embedding(x, scales=(4,))


# ------------------------------------------------------------------ configs and methods
def _cfg(*opts):
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_comformer_config(cfg)
    cfg.merge_from_file(str(SYNTHETIC_CFG))
    cfg.merge_from_list(["CONT.TASK", "10-10", *opts])
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def test_method_defaults_and_config_errors():
    cfg = _cfg("CONT.METHOD", "comformer", "MODEL.MASK_FORMER.MASK_ACTIVATION", "softmax")
    method = build_method(cfg, build_scenario(cfg), 1)
    assert type(method).__name__ == "CoMFormer" and method.kd_weight == 10.0
    key = "CONT.COMFORMER.KD_WEIGHT"
    assert setting_default(key, -1, "ade20k_panoptic_train", "100-50") == 5.0
    assert setting_default(key, -1, "ade20k_semantic_train", "100-50") == 0.5
    assert setting_default(key, -1, "ade20k_semantic_train", "100-5") == 10.0
    assert setting_default(key, -1, "ade20k_panoptic_train", "50-50") == 10.0  # fallback
    assert setting_default(key, 3.0, "ade20k_panoptic_train", "100-50") == 3.0

    cfg = _cfg("CONT.METHOD", "comformer")  # sigmoid masks
    with pytest.raises(ValueError, match="MASK_ACTIVATION='sigmoid'"):
        build_method(cfg, build_scenario(cfg), 0)
    cfg = _cfg("CONT.METHOD", "comformer", "CONT.COMFORMER.SOFTMAX_MASKS", False)
    build_method(cfg, build_scenario(cfg), 0)  # the sigmoid ablation

    cfg = _cfg("CONT.METHOD", "plop")
    plop = build_method(cfg, build_scenario(cfg), 1)
    assert math.isclose(plop.pod_weight, 0.001 * math.sqrt(10 / 20))
    cfg = _cfg("CONT.METHOD", "plop", "CONT.PLOP.PSEUDO_LABELS", "median")
    with pytest.raises(ValueError, match="PSEUDO_LABELS='median'; valid: mask, entropy, none"):
        build_method(cfg, build_scenario(cfg), 1)

    cfg = _cfg("CONT.METHOD", "MiB", "CONT.MIB.KD_WEIGHT", 0.0)
    mib = build_method(cfg, build_scenario(cfg), 1)
    assert mib.kd_weight == 0 and not mib.needs_teacher


def _step(step, *opts):
    """(step config, scenario) of a synthetic 10-10 step."""
    cfg = _cfg(*opts)
    scenario = build_scenario(cfg)
    return step_config(cfg, scenario, step), scenario


def test_method_class_loss_keeps_everything_but_the_class_loss():
    cfg1, scenario = _step(1, "CONT.METHOD", "mib")
    cfg0, _ = _step(0, "CONT.METHOD", "mib")
    plain = build_model(cfg1)
    previous = build_model(cfg0).state_dict()
    model = build_continual_model(cfg1, scenario, 1, build_method(cfg1, scenario, 1), previous)
    after = model.student.criterion
    assert isinstance(after.class_loss, ClassificationLoss)
    assert after.class_loss.num_old_absorbed == 10 and not after.class_loss.focal
    assert repr(after.matcher) == repr(plain.criterion.matcher)
    assert after.weight_dict == plain.criterion.weight_dict
    assert set(model.student.state_dict()) == set(plain.state_dict())
    # step 0: nothing to absorb, the criterion stays Mask2Former's
    model0 = build_continual_model(cfg0, scenario, 0, build_method(cfg0, scenario, 0))
    assert model0.student.criterion.class_loss is None and model0.teacher is None


def test_continual_class_loss_by_hand():
    criterion = SetCriterion(
        3,
        matcher=HungarianMatcher(),
        weight_dict={"loss_ce": 1.0},
        eos_coef=0.1,
        num_points=4,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
        class_loss=ClassificationLoss(num_old_absorbed=1),
    )
    outputs = {"pred_logits": torch.stack([_logits(1, 2, 3, 4), _logits(1, 2, 3, 4)])[None]}
    targets = [{"labels": torch.tensor([1]), "masks": torch.zeros(1, 2, 2)}]
    indices = [(torch.tensor([0]), torch.tensor([0]))]  # query 0 -> class 1, query 1 unmatched
    # query 0: -log 0.2 (weight 1); query 1: no-object absorbs old class 0, -log 0.5 (weight 0.1)
    loss = criterion.loss_labels(outputs, targets, indices, num_masks=1.0)["loss_ce"]
    torch.testing.assert_close(loss, torch.tensor((math.log(5) + 0.1 * math.log(2)) / 1.1))
    criterion.class_loss.focal = True  # alpha 5, gamma 1, no class weights: p_t = 0.2 and 0.5
    loss = criterion.loss_labels(outputs, targets, indices, num_masks=1.0)["loss_ce"]
    expected = (5 * 0.8 * math.log(5) + 5 * 0.5 * math.log(2)) / 2
    torch.testing.assert_close(loss, torch.tensor(expected))


# ------------------------------------------------------------------ integration
@pytest.fixture
def head_returns_mask_features(monkeypatch):
    """PLOP reads outputs["mask_features"]; until the head returns it, the test adds it."""
    original = MaskFormerHead.forward

    def forward(self, features, mask=None):
        out = original(self, features, mask)
        if "mask_features" not in out:
            mask_features, _, multi_scale = self.pixel_decoder.forward_features(features)
            out = self.predictor(multi_scale, mask_features, mask)
            out["mask_features"] = mask_features
        return out

    monkeypatch.setattr(MaskFormerHead, "forward", forward)


def _batch(size=32):
    batch = []
    for i, n in enumerate([2, 1]):
        inst = Instances((size, size))
        inst.gt_classes = torch.tensor([10 + 3 * j + i for j in range(n)])  # new classes 10..19
        masks = torch.zeros((n, size, size), dtype=torch.bool)
        for j in range(n):
            masks[j, 4 + 12 * j : 14 + 12 * j, 2 + i : 24] = True
        inst.gt_masks = BitMasks(masks)
        image = torch.randint(0, 255, (3, size, size), dtype=torch.uint8)
        batch.append({"image": image, "instances": inst})
    return batch


@pytest.mark.parametrize(
    "method, opts, extra_key",
    [
        ("mib", [], "loss_kd"),
        (
            "comformer",
            ["MODEL.MASK_FORMER.MASK_ACTIVATION", "softmax", "CONT.COMFORMER.KD_AUX", True],
            "loss_kd_0",
        ),
        ("plop", [], "loss_pod"),
    ],
)
def test_one_training_step_of_each_method(method, opts, extra_key, head_returns_mask_features):
    torch.manual_seed(0)
    cfg_t, scenario = _step(0, "CONT.METHOD", method, *opts)
    cfg_s, _ = _step(1, "CONT.METHOD", method, *opts)
    previous = build_model(cfg_t).state_dict()
    m = build_method(cfg_s, scenario, 1)
    model = build_continual_model(cfg_s, scenario, 1, m, previous_state=previous)
    student, teacher = model.student, model.teacher.model
    student.load_state_dict(grow_classifier_state_dict(previous, student.state_dict(), 10))
    m.init_new_classes(class_embed(student))
    if method == "mib":
        embed = class_embed(student)
        torch.testing.assert_close(embed.weight[10:], embed.weight[-1:].expand(11, -1))
    model.train()

    losses = model(_batch())
    assert extra_key in losses
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training
