"""The per-pixel head, MiB as published on it, and PLOP as published: hand-worked values, the
reference code's own outputs (tests/data/perpixel_reference, see its README), and a tiny two-step
per-pixel scenario of each method on a dataset with a background class."""

import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.projects.deeplab import add_deeplab_config
from detectron2.structures import ImageList

from comformer import add_comformer_config
from comformer.continual import (
    Prediction,
    StepData,
    build_continual_model,
    build_method,
    class_embed,
    grow_classifier_state_dict,
)
from comformer.continual.mib import mib_init_classifier
from comformer.continual.pixel_losses import UnbiasedPixelCE, pixel_distillation, pixel_unbiased_ce
from comformer.continual.plop import (
    collapse_new_logits,
    entropy_histograms,
    histogram_median,
    local_pod_embedding,
    plop_entropy,
    plop_histogram_median,
    plop_pseudo_labels,
    pod_loss,
)
from comformer.data.datasets.common import register_sem_seg
from comformer.data.datasets.synthetic import generate
from comformer.data.datasets.synthetic_shapes import VocSpec
from comformer.data.scenario import Scenario, build_scenario
from comformer.engine import run_scenario
from comformer.engine.step_config import step_config
from comformer.engine.step_trainer import check_checkpoint_classes
from comformer.modeling import classifier_extra_rows
from comformer.modeling.per_pixel import PerPixelCriterion
from test_faults import TINY_OPTS, _cfg

REPO = Path(__file__).resolve().parents[1]
PER_PIXEL_CFG = REPO / "configs/synthetic/voc-semantic-segmentation/continual/9-3-perpixel.yaml"
REFERENCE = REPO / "tests/data/perpixel_reference/reference.pt"
TINY_VOC = VocSpec(num_train=12, num_val=4, image_size=48)
# A per-pixel model small enough for CPU tests.
TINY_PP = [
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", 1,
    "MODEL.BACKBONE.FREEZE_AT", 5,
    "DATALOADER.NUM_WORKERS", 0,
]  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _logits(*probs):
    """Logits whose softmax over the first dimension is ``probs``: (C,) -> (1, C, 1, 1)."""
    return torch.tensor(probs).log().view(1, -1, 1, 1)


def _pixels(*columns):
    """Logits of several pixels in a row: each column a probability vector -> (1, C, 1, P)."""
    return torch.cat([_logits(*c) for c in columns], dim=3)


def _config(*opts, path=PER_PIXEL_CFG):
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_comformer_config(cfg)
    cfg.merge_from_file(str(path))
    cfg.merge_from_list([*TINY_PP, *opts])
    cfg.MODEL.DEVICE = "cpu"
    return cfg


# ------------------------------------------------------------------ the head
def test_channels_targets_and_inference_with_and_without_a_background_class():
    torch.manual_seed(0)
    voc = build_model(_config())  # synthetic_voc: background is class 0, a class of the model
    plain = build_model(
        _config(
            "DATASETS.TRAIN", ("synthetic_sem_seg_train",), "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 20
        )
    )
    assert voc.sem_seg_head.predictor.out_channels == 13
    assert plain.sem_seg_head.predictor.out_channels == 21  # 20 classes + no-object
    sem_seg = torch.tensor([[0, 255, 3], [255, 2, 2]])
    inputs = [
        {"image": torch.zeros(3, 2, 3, dtype=torch.uint8), "sem_seg": sem_seg},
        {"image": torch.zeros(3, 4, 2, dtype=torch.uint8), "sem_seg": torch.full((4, 2), 255)},
    ]
    for model, unlabelled in ((voc, 255), (plain, 20)):
        images = model.preprocess_images(inputs)
        labels = model.prepare_targets(inputs, images)["sem_seg"]
        assert labels.shape == (2, 32, 32)
        # void inside the image: ignored with a background class, no-object without one
        assert labels[0, :2, :3].tolist() == [[0, unlabelled, 3], [unlabelled, 2, 2]]
        assert (labels[1, :4, :2] == unlabelled).all()
        # the padding of the batch is always ignored
        assert (labels[0, 2:] == 255).all() and (labels[1, :, 2:] == 255).all()
        model.eval()
        with torch.no_grad():
            out = model(inputs)
        assert [r["sem_seg"].shape for r in out] == [(model.num_classes, 2, 3)] * 1 + [
            (model.num_classes, 4, 2)
        ]
        total = out[0]["sem_seg"].sum(0)
        if model is voc:  # every channel is a class: probabilities sum to 1
            torch.testing.assert_close(total, torch.ones_like(total))
        else:  # the no-object channel is dropped
            assert (total < 1).all()


def test_per_pixel_cross_entropy_divides_by_all_pixels_as_mib_and_plop():
    criterion = PerPixelCriterion(2, no_object=False)
    outputs = {"sem_logits": _pixels((0.25, 0.75), (0.5, 0.5))}
    labels = torch.tensor([[[1, 255]]])
    # -log 0.75 on the labelled pixel, 0 on the ignored one, divided by the 2 pixels
    loss = criterion(outputs, {"sem_seg": labels})["loss_ce"]
    torch.testing.assert_close(loss, torch.tensor(math.log(4 / 3) / 2))
    weighted = criterion(outputs, {"sem_seg": labels, "pixel_weight": torch.tensor(0.5)})
    torch.testing.assert_close(weighted["loss_ce"], loss / 2)


def test_per_pixel_classifier_grows_before_the_no_object_row_or_at_the_end():
    old = {"sem_seg_head.predictor.weight": torch.arange(3.0).view(3, 1, 1, 1)}
    new = {"sem_seg_head.predictor.weight": torch.full((5, 1, 1, 1), -1.0)}
    # background dataset: [bg, c1, c2] + two new rows at the end
    grown = grow_classifier_state_dict(old, new, num_old=3, extra_rows=0)
    assert grown["sem_seg_head.predictor.weight"].flatten().tolist() == [0, 1, 2, -1, -1]
    # no background class: [c1, c2, no-object] -> [c1, c2, new, new, no-object]
    grown = grow_classifier_state_dict(old, new, num_old=2, extra_rows=1)
    assert grown["sem_seg_head.predictor.weight"].flatten().tolist() == [0, 1, -1, -1, 2]
    with pytest.raises(ValueError, match="another scenario or step"):
        grow_classifier_state_dict(old, new, num_old=3, extra_rows=1)
    check_checkpoint_classes(old, 3, "step0.pth", extra_rows=0)
    with pytest.raises(ValueError, match="predicts 2 classes"):
        check_checkpoint_classes(old, 3, "step0.pth", extra_rows=1)


# ------------------------------------------------------------------ MiB
def test_mib_unbiased_cross_entropy_by_hand():
    # background dataset: channels [bg, old class 1, new class 2]; every pixel p = (0.2, 0.5, 0.3)
    logits = _pixels(*[(0.2, 0.5, 0.3)] * 4)
    labels = torch.tensor([[[0, 1, 2, 255]]])
    loss = pixel_unbiased_ce(logits, labels, num_old=2, background=0)
    # background (and an old label) absorbs the old class: -log(0.2 + 0.5); a new class -log 0.3
    expected = [-math.log(0.7), -math.log(0.7), -math.log(0.3), 0.0]
    torch.testing.assert_close(loss[0, 0], torch.tensor(expected))
    # no background class: channels [old class 0, new class 1, no-object 2], no-object absorbs
    logits = _pixels((0.5, 0.3, 0.2), (0.5, 0.3, 0.2))
    loss = pixel_unbiased_ce(logits, torch.tensor([[[2, 1]]]), num_old=1, background=2)
    torch.testing.assert_close(loss[0, 0], torch.tensor([-math.log(0.7), -math.log(0.3)]))


def test_mib_distillation_by_hand():
    teacher = _logits(0.6, 0.4)  # [bg, old class]
    student = _logits(0.2, 0.5, 0.3)  # [bg, old class, new class]
    # unbiased: the student's background is 0.2 + 0.3; averaged over the 2 teacher channels
    kd = pixel_distillation(student, teacher, num_old=2, background=0)
    torch.testing.assert_close(kd, torch.tensor(-(0.6 * math.log(0.5) + 0.4 * math.log(0.5)) / 2))
    # plain: the student renormalised over the teacher's channels (0.2, 0.5) / 0.7
    kd = pixel_distillation(student, teacher, num_old=2, background=0, unbiased=False)
    expected = -(0.6 * math.log(2 / 7) + 0.4 * math.log(5 / 7)) / 2
    torch.testing.assert_close(kd, torch.tensor(expected))
    # no background class: teacher [old, no-object], student [old, new, no-object]
    kd = pixel_distillation(_logits(0.5, 0.3, 0.2), _logits(0.4, 0.6), num_old=1, background=2)
    torch.testing.assert_close(kd, torch.tensor(-(0.4 * math.log(0.5) + 0.6 * math.log(0.5)) / 2))


def test_mib_init_keeps_old_probabilities_and_splits_the_background():
    torch.manual_seed(0)
    old, new = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 5, 1)  # [bg, class 1] -> + 3 new classes
    with torch.no_grad():
        new.weight[:2], new.bias[:2] = old.weight, old.bias
    mib_init_classifier(new, num_old=2, num_new=3, background=0)
    x = torch.randn(1, 4, 3, 3) * 3
    p_old, p_new = old(x).softmax(1), new(x).softmax(1)
    torch.testing.assert_close(p_new[:, 1], p_old[:, 1])  # the old class keeps its probability
    # the background's probability is shared evenly by the background and the 3 new classes
    for c in (0, 2, 3, 4):
        torch.testing.assert_close(p_new[:, c], p_old[:, 0] / 4)


def test_mib_matches_mibs_own_code():
    ref = torch.load(REFERENCE, weights_only=True)["mib"]
    logits, teacher, labels = ref["logits"], ref["teacher"], ref["labels"]
    uce = pixel_unbiased_ce(logits, labels, num_old=ref["num_old"], background=0)
    torch.testing.assert_close(uce, ref["uce"])
    for key, kwargs in (
        ("ukd", {}),
        ("ukd_alpha2", {"temperature": 0.5}),
        ("kd", {"unbiased": False}),
    ):
        kd = pixel_distillation(logits, teacher, num_old=3, background=0, **kwargs)
        torch.testing.assert_close(kd, ref[key], msg=key)


def test_mib_defaults_on_each_head():
    cfg = _config()
    s = build_scenario(cfg)
    mib = build_method(step_config(cfg, s, 1), s, 1)
    assert mib.kd_weight == 10.0 and mib.background_channel == 0 and mib.background_row == 0
    loss = mib.class_loss()
    assert isinstance(loss, UnbiasedPixelCE) and loss.num_old == 10 and loss.background == 0
    cfg = _config("MODEL.MASK_FORMER.PER_PIXEL", False)
    assert build_method(cfg, build_scenario(cfg), 1).kd_weight == 200.0
    cfg = _config("CONT.MIB.KD_WEIGHT", 3.0)
    assert build_method(cfg, build_scenario(cfg), 1).kd_weight == 3.0
    cfg = _config("CONT.METHOD", "comformer", "MODEL.MASK_FORMER.MASK_ACTIVATION", "softmax")
    with pytest.raises(ValueError, match="needs mask classification"):
        build_method(cfg, build_scenario(cfg), 1)


# ------------------------------------------------------------------ PLOP
def test_pod_squares_the_features_before_pooling():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, None]
    zero = torch.zeros_like(x)
    # squared: [[1, 4], [9, 16]]; scale 1: rows (2.5, 12.5), columns (5, 10); scale 2: the pixels
    # twice; ||.||^2 = 2.5^2 + 12.5^2 + 5^2 + 10^2 + 2 (1 + 16 + 81 + 256) = 995.5
    torch.testing.assert_close(pod_loss([x], [zero], square=True), torch.tensor(math.sqrt(995.5)))
    torch.testing.assert_close(pod_loss([x], [zero]), torch.tensor(math.sqrt(87.5)))
    # per-map weights, summed and divided by the number of maps
    loss = pod_loss([x, x], [zero, zero], square=True, layer_weights=[0.01, 0.0005])
    torch.testing.assert_close(loss, torch.tensor(0.0105 * math.sqrt(995.5) / 2))
    assert local_pod_embedding(x.pow(2), (1,)).tolist() == [[2.5, 12.5, 5.0, 10.0]]


def test_pod_factor_and_weights_of_each_variant():
    cfg = _config("CONT.METHOD", "plop")
    s = build_scenario(cfg)  # 9-3 with a background: step 1 has 10 old + 3 new channels
    plop = build_method(step_config(cfg, s, 1), s, 1)
    assert plop.variant == "plop" and plop.pod_square and plop.adaptive_factor and plop.init
    assert plop.pseudo_labels == "entropy" and plop.entropy_median == "plop"
    assert math.isclose(plop.pod_factor, math.sqrt(13 / 3))  # sqrt(classes seen / new), PLOP's
    assert math.isclose(plop.pod_weight, 0.01 * math.sqrt(13 / 3))
    assert plop.pod_logits_weight == 0.0005 and plop.needs_step_data
    cfg = _config("CONT.METHOD", "plop", "CONT.PLOP.POD_FACTOR", "comformer")
    plop = build_method(cfg, s, 1)
    assert math.isclose(plop.pod_factor, math.sqrt(3 / 13))  # CoMFormer's port: the inverse
    # CoMFormer's port on mask classification, as before; there the background is no-object, so
    # the scenario has 9 old + 3 new classes
    cfg = _config("CONT.METHOD", "plop", "MODEL.MASK_FORMER.PER_PIXEL", False)
    plop = build_method(cfg, build_scenario(cfg), 1)
    assert plop.variant == "comformer" and not plop.pod_square and plop.pseudo_labels == "mask"
    assert math.isclose(plop.pod_weight, 0.001 * math.sqrt(3 / 12)) and not plop.needs_step_data
    with pytest.raises(ValueError, match="CONT.BACKGROUND 'auto' or 'no-object'"):
        build_method(cfg, s, 1)  # a mask model on the per-pixel scenario's background class
    # PLOP's ADE20K weights, by dataset
    steps = (tuple(range(100)), tuple(range(100, 150)))
    ade = Scenario(dataset="ade20k_sem_seg_train", task="100-50", steps=steps, num_classes=150)
    plop = build_method(_config("CONT.METHOD", "plop"), ade, 1)
    assert plop.pod_logits_weight == 0.00001
    assert math.isclose(plop.pod_weight, 0.001 * math.sqrt(151 / 50))  # 150 classes + no-object
    assert plop.background_channel == 150 and plop.background_row == -1
    with pytest.raises(ValueError, match="PSEUDO_LABELS='mask' needs mask classification"):
        build_method(_config("CONT.METHOD", "plop", "CONT.PLOP.PSEUDO_LABELS", "mask"), s, 1)


def test_logits_pod_sums_the_new_logits_into_the_background():
    student = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)  # [bg, old, new, new]
    out = collapse_new_logits(student, num_old=2, num_teacher=2, background=0)
    assert out.flatten().tolist() == [8.0, 2.0]
    # no background class: [old, new, new, no-object] -> [old, no-object + new]
    out = collapse_new_logits(student, num_old=1, num_teacher=2, background=3)
    assert out.flatten().tolist() == [1.0, 9.0]


def test_plop_entropy_and_histogram_median_by_hand():
    probs = torch.tensor([0.5, 0.5]).view(1, 2, 1, 1)
    # -(1 / log 2) mean_c(0.5 log 0.5) / log 4 = 0.5 / log 4
    torch.testing.assert_close(plop_entropy(probs, 4)[0, 0, 0], torch.tensor(0.5 / math.log(4)))
    hist = torch.zeros(3, 100, dtype=torch.long)
    hist[0, 1] = 10  # all in one bin: 0.01 + 5 / 10 x 0.01
    hist[1, :5] = 4  # 20 values in bins 0-4
    medians = plop_histogram_median(hist)
    # PLOP's loop adds each bin's index (0, 1, 2, 3) rather than its count before comparing with
    # half the total (10): it stops at bin 4, 0.04 + (10 - 6) / 4 x 0.01; the median is 0.025
    torch.testing.assert_close(medians, torch.tensor([0.015, 0.05, 0.0]))
    torch.testing.assert_close(histogram_median(hist), torch.tensor([0.015, 0.025, 0.0]))
    # int(29 / 100 * 100) is 28 in floating point: bin 29's values are read from bin 28
    hist = torch.zeros(1, 100, dtype=torch.long)
    hist[0, 29] = 1000
    assert not math.isclose(float(plop_histogram_median(hist)), 0.295)


def _batch(labels, t_logits):
    """(images, targets) of a label map, as StepData gives them (the teacher's logits are served
    by the fake teacher)."""
    images = ImageList(torch.zeros(labels.shape[0], 3, *labels.shape[-2:]), [labels.shape[-2:]])
    return images, {"sem_seg": labels}


def _teacher_logits(*columns):
    """2-channel teacher logits (class, logit gap) per pixel: the gap sets the uncertainty."""
    out = torch.zeros(1, 2, 1, len(columns))
    for i, (c, gap) in enumerate(columns):
        out[0, c, 0, i] = gap
    return out


def test_thresholds_come_from_a_pass_over_the_steps_training_images():
    # 3 classes: background 0 and class 1 (step 0), class 2 (step 1): teacher 2 channels, student 3
    scenario = Scenario(
        dataset="tiny", task="custom", steps=((0, 1), (2,)), num_classes=3, background=0
    )
    sure, less, unsure = 12.0, 5.8, 5.5
    v = {
        g: float(plop_entropy(_teacher_logits((0, g)).softmax(1), 3)) for g in (sure, less, unsure)
    }
    assert v[sure] < 0.01 <= v[less] < v[unsure] < 0.02  # bins 0, 1, 1
    # batch A: background pixels (0, sure) (0, sure) (1, less) (1, sure); a new-class pixel and a
    # void one, which do not count; batch B: (0, sure) (0, sure) (1, less) (1, unsure)
    batch_a = (
        torch.tensor([[[0, 0, 0, 0, 2, 255]]]),
        _teacher_logits((0, sure), (0, sure), (1, less), (1, sure), (1, sure), (1, sure)),
    )
    batch_b = (
        torch.tensor([[[0, 0, 0, 0]]]),
        _teacher_logits((0, sure), (0, sure), (1, less), (1, unsure)),
    )
    batches = [batch_a, batch_b]

    def teacher(images):
        logits = next(calls)
        return Prediction({}, {"sem_logits": logits}, "sigmoid")

    thresholds = {}
    for median in ("plop", "fine"):
        plop = build_method(
            _config("CONT.METHOD", "plop", "CONT.PLOP.ENTROPY_MEDIAN", median), scenario, 1
        )
        assert plop.needs_step_data
        calls = iter([b[1] for b in batches])
        plop.before_step(StepData(batches=lambda: [_batch(*b) for b in batches], teacher=teacher))
        thresholds[median] = plop.thresholds
    # PLOP's: class 0, 4 values in bin 0: 2 / 4 x 0.01; class 1, 1 in bin 0 and 3 in bin 1:
    # 0.01 + 2 / 3 x 0.01
    torch.testing.assert_close(thresholds["plop"], torch.tensor([0.005, 0.01 + 0.02 / 3]))
    # the median of the values: class 0 all "sure" (below the floor 0.001), class 1 the lower
    # median "less"
    assert v[sure] < 0.001
    torch.testing.assert_close(
        thresholds["fine"], torch.tensor([0.001, v[less]]), atol=1e-4, rtol=0
    )

    # training: a background pixel takes the teacher's class where it is surer than its class's
    # threshold, else it is ignored; other labels stay; each image's loss is scaled by its share
    # of confident background pixels
    labels, t_logits = batch_b[0].clone(), batch_b[1]
    labels[0, 0, 0] = 2
    out, factor = plop_pseudo_labels(
        labels, t_logits, thresholds["plop"], num_old=2, background=0, num_student=3
    )
    assert out.tolist() == [[[2, 0, 1, 255]]]  # v[unsure] > 0.0167 > v[less]
    torch.testing.assert_close(factor, torch.tensor([2 / (3 + 1e-6)]))


def test_plop_matches_plops_own_code():
    ref = torch.load(REFERENCE, weights_only=True)
    p = ref["plop_median"]
    histograms = 0
    for labels, t_logits in zip(p["labels"], p["teacher"]):
        probs = t_logits.softmax(1)
        on_background = labels == 0
        values = plop_entropy(probs, p["num_student"])[on_background]
        histograms = histograms + entropy_histograms(values, probs.max(1).indices[on_background], 4)
    # PLOP's find_median, bit for bit (its thresholds have a row per student channel; the
    # teacher's 4 are used)
    assert torch.equal(plop_histogram_median(histograms).clamp(min=0.001), p["thresholds"][:4])
    assert torch.equal(plop_entropy(p["teacher"][0].softmax(1), 6), p["entropy"])

    d = ref["plop_pod"]
    factor = math.sqrt(6 / 2)
    student = d["feats_new"] + [collapse_new_logits(d["logits_new"], 4, 4, background=0)]
    teacher = d["feats_old"] + [d["logits_old"]]
    weights = [0.01 * factor, 0.01 * factor, 0.0005 * factor]
    loss = pod_loss(student, teacher, square=True, layer_weights=weights)
    torch.testing.assert_close(loss, d["loss"])
    # CoMFormer's port: not squared, one weight
    torch.testing.assert_close(pod_loss(d["feats_new"], d["feats_old"]), d["comformer_loss"])


@pytest.mark.parametrize("method, extra_key", [("mib", "loss_kd"), ("plop", "loss_pod")])
def test_one_training_step_without_a_background_class(method, extra_key):
    """The no-object channel plays the background: it absorbs and initialises the new classes."""
    torch.manual_seed(0)
    cfg = _config(
        "DATASETS.TRAIN", ("synthetic_sem_seg_train",), "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 20,
        "CONT.TASK", "10-10", "CONT.METHOD", method,
    )  # fmt: skip
    s = build_scenario(cfg)
    cfg1 = step_config(cfg, s, 1)
    previous = build_model(step_config(cfg, s, 0)).state_dict()
    m = build_method(cfg1, s, 1)
    assert m.background_channel == 20 and m.background_row == -1
    model = build_continual_model(cfg1, s, 1, m, previous_state=previous)
    student = model.student
    student.load_state_dict(grow_classifier_state_dict(previous, student.state_dict(), 10, 1))
    m.init_new_classes(class_embed(student))
    w = class_embed(student).weight  # [10 old, 10 new, no-object]: new rows copy no-object
    assert w.shape[0] == 21 and torch.equal(w[10], w[20]) and torch.equal(w[19], w[20])
    inputs = []
    for i in range(2):
        sem_seg = torch.full((32, 32), 255)
        sem_seg[4:20, 2 + i : 24] = 10 + 3 * i  # a new class; the rest is unlabelled
        image = torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)
        inputs.append({"image": image, "sem_seg": sem_seg})
    if method == "plop":
        m.before_step(
            StepData(batches=lambda: [model.prepare_batch(inputs)], teacher=model.teacher.predict)
        )
        assert m.thresholds.shape == (11,)  # 10 old classes + no-object
    model.train()
    losses = model(inputs)
    assert extra_key in losses and all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


@pytest.mark.parametrize(
    "name, method, channels, extra",
    [
        ("voc/semantic-segmentation/continual/15-5-perpixel-mib.yaml", "MiB", 21, 0),
        ("voc/semantic-segmentation/continual/15-1-perpixel-plop.yaml", "PLOP", 17, 0),
        ("voc/semantic-segmentation/continual/10-1-perpixel-plop.yaml", "PLOP", 12, 0),
        ("ade20k/semantic-segmentation/continual/100-50-perpixel-mib.yaml", "MiB", 151, 1),
        ("ade20k/semantic-segmentation/continual/100-10-perpixel-plop.yaml", "PLOP", 111, 1),
    ],
)
def test_per_pixel_configs(name, method, channels, extra):
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_comformer_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / name))
    s = build_scenario(cfg)
    cfg1 = step_config(cfg, s, 1)
    m = build_method(cfg1, s, 1)
    assert type(m).__name__ == method and m.per_pixel
    assert classifier_extra_rows(cfg1) == extra
    assert m.num_old + m.num_new + extra == channels  # the student's channels at step 1
    if method == "PLOP":
        assert m.variant == "plop" and m.needs_step_data
        ade = name.startswith("ade20k")
        assert m.pod_logits_weight == (0.00001 if ade else 0.0005)
        assert math.isclose(
            m.pod_weight, (0.001 if ade else 0.01) * math.sqrt(channels / m.num_new)
        )
    else:
        assert m.kd_weight == 10.0
    if extra:  # no background class: the mapper must not pad label maps (padding is unlabelled)
        assert cfg.INPUT.SIZE_DIVISIBILITY == -1


# ------------------------------------------------------------------ two steps, end to end
@pytest.fixture(scope="module")
def tiny_voc(tmp_path_factory):
    root = Path(generate(str(tmp_path_factory.mktemp("data") / "voc"), TINY_VOC))
    meta = MetadataCatalog.get("synthetic_voc_sem_seg_train")
    names = {}
    for split in ("train", "val"):
        names[split] = f"pp_voc_{split}_{os.getpid()}"
        register_sem_seg(
            names[split],
            metadata={
                "stuff_classes": meta.stuff_classes,
                "stuff_colors": meta.stuff_colors,
                "background_class": 0,
            },
            image_root=str(root / "images" / split),
            sem_seg_root=str(root / f"semantic_{split}"),
            image_ext=".png",
            prepare_hint="(test data)",
        )
    return names


@pytest.mark.parametrize("method, extra_key", [("mib", "loss_kd"), ("plop", "loss_pod")])
def test_two_step_per_pixel_scenario(tiny_voc, tmp_path, monkeypatch, method, extra_key):
    monkeypatch.setenv("COMFORMER_CACHE", str(tmp_path / "cache"))
    seen = {}
    from comformer.continual.plop import PLOP

    original = PLOP.before_step

    def before_step(self, data):
        original(self, data)
        seen["thresholds"] = self.thresholds

    monkeypatch.setattr(PLOP, "before_step", before_step)
    cfg = _cfg(
        *TINY_OPTS,
        "DATASETS.TRAIN", (tiny_voc["train"],), "DATASETS.TEST", (tiny_voc["val"],),
        "INPUT.MIN_SIZE_TRAIN", (48,), "INPUT.MIN_SIZE_TEST", 48, "INPUT.CROP.SIZE", (48, 48),
        "INPUT.SIZE_DIVISIBILITY", 48,
        "OUTPUT_DIR", str(tmp_path / "out"), "CONT.METHOD", method,
        "SOLVER.MAX_ITER", 2, "CONT.INC_ITERS_PER_CLASS", 0, "CONT.INC_MAX_ITER", 2,
        path=PER_PIXEL_CFG,
    )  # fmt: skip
    cfg.freeze()
    rows = run_scenario(cfg)
    assert [r["step"] for r in rows] == [0, 1]
    assert all(0 <= r["mIoU_all"] <= 100 for r in rows)
    metrics = (tmp_path / "out/step1/metrics.json").read_text()
    assert extra_key in metrics
    state = torch.load(tmp_path / "out/step1/model_final.pth", weights_only=True)["model"]
    assert state["sem_seg_head.predictor.weight"].shape[0] == 13  # background + 9 + 3
    if method == "plop":  # computed before the step, one threshold per teacher channel
        assert seen["thresholds"].shape == (10,) and (seen["thresholds"] >= 0.001).all()


@pytest.mark.parametrize(
    "method, opts, extra_key",
    [
        ("comformer", ["MODEL.MASK_FORMER.MASK_ACTIVATION", "softmax"], "loss_kd"),
        ("mib", [], "loss_kd"),
    ],
)
def test_two_step_mask_classification_scenario_on_a_background_dataset(
    tiny_voc, tmp_path, monkeypatch, method, opts, extra_key
):
    """Mask classification on the background set: the background is no-object for the model
    (CoMFormer's convention), still evaluated (as an old class), and the pseudo-labels / unbiased
    losses act on the unlabelled old-class pixels."""
    monkeypatch.setenv("COMFORMER_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(
        *TINY_OPTS,
        "DATASETS.TRAIN", (tiny_voc["train"],), "DATASETS.TEST", (tiny_voc["val"],),
        "INPUT.MIN_SIZE_TRAIN", (48,), "INPUT.MIN_SIZE_TEST", 48, "INPUT.CROP.SIZE", (48, 48),
        "INPUT.SIZE_DIVISIBILITY", 48, "MODEL.MASK_FORMER.PER_PIXEL", False,
        "OUTPUT_DIR", str(tmp_path / "out"), "CONT.METHOD", method, *opts,
        "SOLVER.MAX_ITER", 2, "CONT.INC_ITERS_PER_CLASS", 0, "CONT.INC_MAX_ITER", 2,
        path=PER_PIXEL_CFG,
    )  # fmt: skip
    cfg.freeze()
    scenario = build_scenario(cfg)
    assert not scenario.background_is_class and scenario.steps[0] == tuple(range(1, 10))
    rows = run_scenario(cfg)
    assert [r["step"] for r in rows] == [0, 1]
    assert "IoU-background" in rows[0] and "IoU-background" in rows[1]  # evaluated at every step
    assert extra_key in (tmp_path / "out/step1/metrics.json").read_text()
    state = torch.load(tmp_path / "out/step1/model_final.pth", weights_only=True)["model"]
    # 9 + 3 object classes + no-object: the background is not a class of the model
    assert state["sem_seg_head.predictor.class_embed.weight"].shape[0] == 13
