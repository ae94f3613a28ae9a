"""Datasets with a background class (Pascal VOC; MiB's setting) under mask classification:
the background is no-object for the model (CoMFormer's convention), so the pixels of old classes
are unlabelled in a later step and the teacher's pseudo-labels can reach them; semantic inference
calls uncovered pixels background; a combination that hides old classes under the background
label is refused."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from comformer.continual import build_method
from comformer.continual.pseudo_labels import with_teacher_pseudo_labels
from comformer.data.scenario import REMOVED, build_scenario
from comformer.engine.step_config import step_config, step_splits
from comformer.engine.trainer import load_config
from comformer.modeling.inference import semantic_inference_with_background

REPO = Path(__file__).resolve().parents[1]
VOC_15_5 = str(REPO / "configs/voc/semantic-segmentation/continual/15-5-comformer.yaml")


def _scenario(*opts):
    cfg = load_config(VOC_15_5, opts)
    return cfg, build_scenario(cfg)


def test_mask_classification_treats_the_background_as_no_object():
    cfg, scenario = _scenario()
    assert scenario.background == 0 and not scenario.background_is_class
    assert scenario.steps[0] == tuple(range(1, 16)) and scenario.num_seen(1) == 20
    label_map = scenario.label_map(1)
    # background and old classes have no target; new classes 16..20 are model indices 15..19
    assert (label_map[:16] == REMOVED).all() and label_map[16:].tolist() == [15, 16, 17, 18, 19]
    # evaluated: the background too, as an old class
    assert scenario.evaluated_classes(1) == tuple(range(21))
    assert step_splits(scenario, 1)["old"] == list(range(16))
    c1 = step_config(cfg, scenario, 1)
    assert c1.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 20
    assert c1.MODEL.MASK_FORMER.TEST.SEMANTIC_BACKGROUND_CLASS == 0


def test_background_as_a_class_is_mibs_convention_and_refused_for_mask_methods():
    cfg, scenario = _scenario("CONT.BACKGROUND", "class", "CONT.METHOD", "ft")
    assert scenario.steps[0][0] == 0 and scenario.label_map(1)[:16].tolist() == [0] * 16
    build_method(cfg, scenario, 1)  # fine-tuning has no view on old classes: allowed
    for method in ("mib", "plop", "comformer"):
        cfg.CONT.METHOD = method
        with pytest.raises(ValueError, match="CONT.BACKGROUND 'auto' or 'no-object'"):
            build_method(cfg, scenario, 1)
    with pytest.raises(ValueError, match="CONT.BACKGROUND='maybe' is not valid"):
        _scenario("CONT.BACKGROUND", "maybe")


def _targets(sem, label_map):
    """Mask-classification targets of a semantic map after the step's label map."""
    labels, masks = [], []
    for c in np.unique(sem):
        index = label_map[c]
        if index >= 0:
            labels.append(int(index))
            masks.append(torch.from_numpy(sem == c))
    return {"labels": torch.tensor(labels, dtype=torch.int64), "masks": torch.stack(masks)}


@pytest.mark.parametrize("background, covered", [("no-object", True), ("class", False)])
def test_pseudo_labels_reach_old_class_pixels_only_when_background_is_no_object(background, covered):
    cfg, scenario = _scenario("CONT.BACKGROUND", background)
    sem = np.zeros((8, 8), dtype=np.int64)  # background
    sem[:, :3] = 3  # an old class (step 0), unlabelled at step 1
    sem[:, 5:] = 17  # a new class
    targets = [_targets(sem, scenario.label_map(1))]
    old_index = scenario.order.index(3)
    num_old = scenario.num_seen(0)
    # teacher: query 0 is class 3 on the left columns, query 1 no-object elsewhere
    logits = torch.full((1, 2, num_old + 1), -10.0)
    logits[0, 0, old_index] = 10.0
    logits[0, 1, -1] = 10.0
    masks = torch.full((1, 2, 8, 8), -10.0)
    masks[0, 0, :, :3] = 10.0
    masks[0, 1, :, 3:] = 10.0
    out = with_teacher_pseudo_labels(
        targets,
        {"pred_logits": logits, "pred_masks": masks},
        (8, 8),
        kind="mask",
        mask_activation="sigmoid",
        threshold=0.0,
    )[0]
    pseudo = out["labels"][len(targets[0]["labels"]) :].tolist()
    if covered:  # CoMFormer's convention: the old class's pixels become its pseudo segment
        assert pseudo == [old_index] and out["masks"][-1].sum() == 24
    else:  # today's VOC labels: the background target covers them; the teacher cannot help
        assert pseudo == []


def test_semantic_inference_with_background_by_hand():
    # 3 dataset classes, class 0 is background (never predicted: logit -inf)
    mask_cls = torch.tensor([[-math.inf, 5.0, -5.0, -5.0], [-math.inf, -5.0, -5.0, 5.0]])
    mask_pred = torch.full((2, 4, 4), -10.0)
    mask_pred[0, :, :2] = 10.0  # query 0: class 1 on the left half
    # query 1 is no-object everywhere: the right half is covered by no segment
    sem = semantic_inference_with_background(
        mask_cls, mask_pred, background_class=0, object_mask_threshold=0.8,
        overlap_threshold=0.8,
    )  # fmt: skip
    assert sem.shape == (3, 4, 4)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[:, :2] = 1
    assert torch.equal(sem.argmax(0), expected) and torch.equal(sem.sum(0), torch.ones(4, 4))
