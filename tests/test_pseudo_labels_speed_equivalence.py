"""comformer's mask pseudo-labels against the official per-query loop, bit for bit.

The official loop (``official_loop``) and comformer's previous vectorised implementation
(``comformer_before``) live in bench/pseudo_labels.py, which times the three. Every path of
``mask_pseudo_labels`` is compared: cells decided by bounds, exact bands (one or several),
whole images (sizes that are not a power-of-two multiple of the masks, ATen's other kernel),
and the fallbacks (large logits, NaNs).
"""

import importlib.util
from pathlib import Path

import pytest
import torch

import comformer.continual.pseudo_labels as pl
from comformer.continual.pseudo_labels import mask_pseudo_labels

_spec = importlib.util.spec_from_file_location(
    "bench_pseudo_labels", Path(__file__).resolve().parents[1] / "bench" / "pseudo_labels.py"
)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

ACTIVATIONS = ("softmax", "sigmoid")


@pytest.fixture(autouse=True)
def one_thread():
    # ATen picks its bilinear kernel by the thread count (3 channels), and computes values at
    # thread boundaries with scalar code: equality is defined with one thread, as in the bench.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same(pseudo, expected):
    assert len(pseudo) == len(expected)
    for b, ((labels, masks), (exp_labels, exp_masks)) in enumerate(zip(pseudo, expected)):
        assert labels.dtype == torch.int64 and masks.dtype == torch.bool
        assert torch.equal(labels, exp_labels), f"image {b}: {labels} != {exp_labels}"
        assert masks.shape == exp_masks.shape, f"image {b}: {masks.shape} != {exp_masks.shape}"
        assert torch.equal(masks, exp_masks), f"image {b}: {(masks != exp_masks).sum()} pixels"


def check(logits, masks, covered, **kwargs):
    """comformer == official loop; returns the official output."""
    expected = bench.official_loop(logits, masks, covered, **kwargs)
    assert_same(mask_pseudo_labels(logits, masks, covered, **kwargs), expected)
    return expected


def teacher(
    images=3, queries=12, classes=4, mask_size=(12, 40), size=(48, 160), objects=(0, 6), seed=0
):
    return bench.make_teacher(images, queries, classes, mask_size, size, objects, seed=seed)


# ------------------------------------------------------------------ random teachers
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("objects", [(0, 0), (1, 4), (12, 12)], ids=["none kept", "some", "all"])
def test_random_teachers(activation, objects):
    for seed in range(2):
        logits, masks, covered = teacher(objects=objects, seed=seed)
        expected = check(logits, masks, covered, mask_activation=activation)
        assert_same(
            bench.comformer_before(logits, masks, covered, mask_activation=activation), expected
        )
        if objects == (0, 0):
            assert all(len(labels) == 0 and segs.shape == (0, 48, 160) for labels, segs in expected)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_many_bands_and_cells_against_whole_images(activation, monkeypatch):
    # Bands of 2 mask rows, factors 2 and 8, a width ratio of 4 and of 2: the cell decisions
    # and the exact bands must give what one whole-image computation gives.
    monkeypatch.setattr(pl, "_BAND_VALUES", 2 * 12 * 4 * 160)
    for mask_size, size in [((12, 40), (48, 160)), ((9, 40), (72, 160)), ((20, 70), (40, 140))]:
        logits, masks, covered = teacher(mask_size=mask_size, size=size, objects=(2, 8), seed=3)
        expected = check(logits, masks, covered, mask_activation=activation)
        with monkeypatch.context() as m:
            m.setattr(pl, "_cell_decisions", lambda *args: None)  # exact bands everywhere
            assert_same(
                mask_pseudo_labels(logits, masks, covered, mask_activation=activation), expected
            )
        with monkeypatch.context() as m:
            m.setattr(pl, "_separable_upsampling_is_exact", lambda: False)  # whole images
            assert_same(
                mask_pseudo_labels(logits, masks, covered, mask_activation=activation), expected
            )


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_padded_images_with_ground_truth(activation):
    # A batch padded to 48 x 160: image 0 fills it, image 1 is 32 x 96 (the teacher sees
    # padding, where its masks are low), image 2 is 48 x 64 and mostly ground truth.
    logits, masks, covered = teacher(objects=(3, 8), seed=5)
    masks[1, :, 8:] = -8.0
    masks[1, :, :, 24:] = -8.0
    covered[2] = False
    covered[2, :, :48] = True
    covered[2, 10:20, 48:64] = True
    check(logits, masks, covered, mask_activation=activation)


# ------------------------------------------------------------------ ties and thresholds
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_ties_and_plateaus(activation):
    g = torch.Generator().manual_seed(0)
    logits, masks, covered = teacher(objects=(12, 12), seed=1)
    # Duplicated masks and scores (class logits permuted: another label), every pixel a tie:
    # the first query wins.
    logits[:, 5] = logits[:, 4].roll(1, -1)
    masks[:, 5] = masks[:, 4]
    # Quantised logits: plateaus where a mask sits exactly at the threshold or ties others.
    masks[1] = torch.randint(-2, 3, masks[1].shape, generator=g).float()
    check(logits, masks, covered, mask_activation=activation)
    # Softmax probability exactly 1/2: two queries alike, the others far below; sigmoid
    # probability exactly 1/2: logit 0.
    masks[2] = -40.0
    masks[2, :2] = torch.randint(0, 2, masks[2, :2].shape, generator=g).float() * 2
    masks[2, 0, :6] = masks[2, 1, :6]
    check(logits, masks, covered, mask_activation=activation)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_probabilities_exactly_at_the_threshold(activation):
    # Plateaus of constant logits, and a mask threshold equal to the official code's float
    # probability there: the binarisation hangs on the last bit, which bounds cannot decide.
    logits, masks, covered = teacher(images=2, objects=(4, 4), seed=13)
    masks[:, :, 2:9, 5:30] = torch.tensor([0.1, 0.7, -0.3, 1.9] * 3)[:, None, None]
    upsampled = torch.nn.functional.interpolate(
        masks, size=covered.shape[-2:], mode="bilinear", align_corners=False
    )
    probs = upsampled.sigmoid() if activation == "sigmoid" else upsampled.softmax(1)
    for q in range(4):
        threshold = float(probs[0, q, 20, 60])
        check(logits, masks, covered, mask_activation=activation, mask_threshold=threshold)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("mask_threshold", [0.3, 0.8])
def test_other_thresholds(activation, mask_threshold):
    logits, masks, covered = teacher(objects=(2, 10), seed=2)
    check(
        logits,
        masks,
        covered,
        mask_activation=activation,
        mask_threshold=mask_threshold,
        score_threshold=0.4,
    )


def test_score_threshold_is_strict():
    # Class logits (0, 0, -inf): score exactly 1/2 for class 0. The official code keeps
    # score > threshold: with threshold 1/2 the query is dropped.
    logits, masks, covered = teacher(images=1, objects=(0, 0), seed=4)
    logits[0, 0] = torch.tensor([0.0, 0.0] + [-float("inf")] * (logits.shape[-1] - 2))
    masks[0, 0] = 10.0
    kept = check(logits, masks, covered, mask_activation="sigmoid", score_threshold=0.25)
    assert kept[0][0].tolist() == [0]
    dropped = check(logits, masks, covered, mask_activation="sigmoid", score_threshold=0.5)
    assert dropped[0][0].numel() == 0


# ------------------------------------------------------------------ other paths
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(
    "mask_size, size",
    [((12, 40), (36, 120)), ((12, 40), (48, 161)), ((10, 10), (40, 40)), ((10, 41), (40, 123))],
    ids=["height x3", "width not a multiple", "small image", "width x3"],
)
def test_sizes_upsampled_whole(activation, mask_size, size):
    logits, masks, covered = teacher(mask_size=mask_size, size=size, objects=(1, 8), seed=6)
    check(logits, masks, covered, mask_activation=activation)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_aten_kernel_choices(activation):
    # Channels-last masks and 3 queries under one thread run ATen's other bilinear kernel.
    logits, masks, covered = teacher(objects=(1, 8), seed=7)
    check(
        logits,
        masks.contiguous(memory_format=torch.channels_last),
        covered,
        mask_activation=activation,
    )
    logits, masks, covered = teacher(queries=3, objects=(1, 3), seed=7)
    check(logits, masks, covered, mask_activation=activation)
    # 3 kept queries out of 12 (sigmoid upsamples the kept ones only).
    logits, masks, covered = teacher(objects=(3, 3), seed=8)
    check(logits, masks, covered, mask_activation=activation)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_large_and_non_finite_logits(activation):
    for scale, seed in [(3.0, 9), (15.0, 10)]:  # float64 bounds, then no bounds (|logit| > 300)
        logits, masks, covered = teacher(objects=(2, 8), seed=seed)
        check(logits, masks * scale, covered, mask_activation=activation)
    logits, masks, covered = teacher(objects=(2, 8), seed=11)
    masks[0, 3, 2, 5] = float("nan")
    masks[1, 4, 0, 0] = float("inf")
    check(logits, masks, covered, mask_activation=activation)


def test_separable_rows_equal_aten_bilinear():
    g = torch.Generator().manual_seed(0)
    for (h, w), factor, width in [((7, 33), 4, 132), ((5, 20), 2, 139), ((9, 30), 8, 240)]:
        image = torch.randn(6, h, w, generator=g) * 5
        expected = torch.nn.functional.interpolate(
            image[None], size=(h * factor, width), mode="bilinear", align_corners=False
        )[0]
        got = torch.empty_like(expected)
        for lo, hi in [(0, 2), (2, h - 1), (h - 1, h)]:
            out_lo = lo * factor + factor // 2 if lo > 0 else 0
            out_hi = hi * factor + factor // 2 if hi < h else h * factor
            pl._separable_rows(image, lo, hi, width, factor, got[:, out_lo:out_hi])
        assert torch.equal(got, expected)


def test_memory_below_one_query_stack():
    # Peak memory of the call stays below one image's (Q, H, W) stack of mask logits, the
    # official loop holds the batch's.
    images, queries, size = 2, 40, (256, 512)
    logits, masks, covered = teacher(images, queries, 4, (64, 128), size, (5, 15), seed=12)
    stack_mib = queries * size[0] * size[1] * 4 / 2**20
    for activation in ACTIVATIONS:
        ours = bench.peak_tensor_mib(
            lambda: mask_pseudo_labels(logits, masks, covered, mask_activation=activation)
        )
        official = bench.peak_tensor_mib(
            lambda: bench.official_loop(logits, masks, covered, mask_activation=activation)
        )
        assert ours < stack_mib < official / images
