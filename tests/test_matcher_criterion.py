"""Mask losses, Hungarian matcher and set criterion on tiny hand-worked cases.

Many cases use 2x2 masks compared at the four pixel centres, so that point sampling returns the
pixel values exactly; pixels are listed row-major: [top-left, top-right, bottom-left, bottom-right].
"""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import get_cfg

from comformer.config import add_comformer_config
from comformer.modeling import criterion as criterion_module
from comformer.modeling.criterion import SetCriterion, build_loss_weight_dict
from comformer.modeling.mask_losses import (
    dice_loss,
    pairwise_dice_loss,
    pairwise_dice_score,
    pairwise_sigmoid_ce_loss,
    pairwise_softmax_ce_loss,
    sigmoid_ce_loss,
    softmax_ce_loss,
)
from comformer.modeling.matcher import HungarianMatcher

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)
# (x, y) of the 4 pixel centres of a 2x2 map, in the row-major pixel order above.
CENTRES_2X2 = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])


def _map2x2(values):
    return torch.tensor(values, dtype=torch.float32).view(-1, 2, 2)


def _matcher(mask_activation="sigmoid", num_points=4):
    return HungarianMatcher(
        cost_class=2.0,
        cost_mask=5.0,
        cost_dice=5.0,
        num_points=num_points,
        mask_activation=mask_activation,
    )


class FixedMatcher(nn.Module):
    """Returns preset indices: ``main`` for the final prediction, ``aux`` for the others."""

    def __init__(self, main, aux=None):
        super().__init__()
        self.main, self.aux, self.final_logits = main, aux, None

    def forward(self, outputs, targets):
        if self.aux is None or outputs["pred_logits"] is self.final_logits:
            return self.main
        return self.aux


def _criterion(matcher, mask_activation="sigmoid", num_classes=2, eos_coef=0.1, num_points=4):
    return SetCriterion(
        num_classes,
        matcher=matcher,
        weight_dict=build_loss_weight_dict(2.0, 5.0, 5.0, num_aux=0),
        eos_coef=eos_coef,
        losses=["labels", "masks"],
        num_points=num_points,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
        mask_activation=mask_activation,
    )


def _idx(rows, cols):
    return (torch.tensor(rows, dtype=torch.int64), torch.tensor(cols, dtype=torch.int64))


# --------------------------------------------------------------------------- mask losses
def test_dice_loss_by_hand():
    probs = torch.tensor([[0.5, 0.5, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    # row 0: sum(p*t) = 1.5, sum p = 2, sum t = 2 -> dice (3 + 1) / (4 + 1) = 0.8, loss 0.2
    # row 1: empty prediction of an empty target -> dice (0 + 1) / (0 + 1) = 1, loss 0
    # summed and divided by num_masks = 2 -> 0.1
    assert dice_loss(probs, targets, num_masks=2).item() == pytest.approx(0.1, abs=1e-6)
    assert dice_loss(probs, targets, num_masks=1).item() == pytest.approx(0.2, abs=1e-6)


def test_sigmoid_ce_loss_by_hand():
    logits = torch.tensor([[0.0, LN3], [LN3, -LN3]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # row 0: BCE(0, 1) = ln 2; BCE(ln 3, 0) = -ln(1 - 3/4) = ln 4 -> mean 1.5 ln 2 = 1.0397208
    # row 1: BCE(ln 3, 1) = -ln(3/4) = 0.2876821; BCE(-ln 3, 1) = -ln(1/4) = 1.3862944
    #        -> mean 0.8369882
    # (1.0397208 + 0.8369882) / num_masks 2 = 0.9383545
    assert sigmoid_ce_loss(logits, targets, num_masks=2).item() == pytest.approx(0.9383545, 1e-6)
    assert sigmoid_ce_loss(logits[:1], targets[:1], 1).item() == pytest.approx(1.0397208, 1e-6)


def test_softmax_ce_loss_by_hand():
    probs = torch.tensor([[0.5, 0.25, 1.0, 0.2]])
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    # covered points: -(ln 0.5 + ln 0.25) = 3 ln 2 = 2.0794415; uncovered add 0; / P = 4
    # -> 0.5198604, / num_masks 1
    loss = softmax_ce_loss(probs.log(), targets, num_masks=1)
    assert loss.item() == pytest.approx(0.5198604, 1e-6)
    assert softmax_ce_loss(probs.log(), targets, num_masks=4).item() == pytest.approx(0.1299651)


def test_pairwise_dice_by_hand():
    probs = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    # [0,0]: (2*2 + 1) / (2 + 2 + 1) = 1        [0,1]: (0 + 1) / (2 + 2 + 1) = 0.2
    # [1,0]: (2*1 + 1) / (2 + 2 + 1) = 0.6      [1,1]: same as [1,0] = 0.6
    expected = torch.tensor([[1.0, 0.2], [0.6, 0.6]])
    torch.testing.assert_close(pairwise_dice_score(probs, targets), expected)
    torch.testing.assert_close(pairwise_dice_loss(probs, targets), 1 - expected)


def test_pairwise_forms_equal_elementwise_ones():
    torch.manual_seed(0)
    logits = torch.randn(5, 30) * 3
    targets = (torch.rand(4, 30) > 0.5).float()
    probs = logits.sigmoid()
    log_probs = logits.log_softmax(0)
    bce = pairwise_sigmoid_ce_loss(logits, targets)
    dice = pairwise_dice_loss(probs, targets)
    sce = pairwise_softmax_ce_loss(log_probs, targets)
    assert bce.shape == dice.shape == sce.shape == (5, 4)
    for i in range(5):
        for j in range(4):
            p, t = slice(i, i + 1), slice(j, j + 1)
            assert bce[i, j] == pytest.approx(
                sigmoid_ce_loss(logits[p], targets[t], 1).item(), 1e-5
            )
            assert dice[i, j] == pytest.approx(dice_loss(probs[p], targets[t], 1).item(), 1e-5)
            expected = softmax_ce_loss(log_probs[p], targets[t], 1).item()
            assert sce[i, j] == pytest.approx(expected, 1e-5)


# --------------------------------------------------------------------------- matcher
# Two queries and two targets on 2x2 maps:
#   q0 mask logits 0 everywhere, class logits [0, 0, 0]      -> class probs [1/3, 1/3, 1/3]
#   q1 mask logits [ln3, ln3, -ln3, -ln3], class [ln2, 0, 0] -> class probs [1/2, 1/4, 1/4]
#   t0 = top row, label 0;  t1 = bottom row, label 1
Q_LOGITS = torch.tensor([[0.0, 0.0, 0.0], [LN2, 0.0, 0.0]])
Q_MASKS = _map2x2([[0, 0, 0, 0], [LN3, LN3, -LN3, -LN3]])
TARGET = {"labels": torch.tensor([0, 1]), "masks": _map2x2([[1, 1, 0, 0], [0, 0, 1, 1]])}


def test_matcher_cost_sigmoid_by_hand():
    # q0: p = 0.5 -> BCE ln2 = 0.6931472 for both targets; dice (2*1 + 1) / (2 + 2 + 1) = 0.6
    # q1: p = [.75, .75, .25, .25]
    #   vs t0: every point costs -ln 0.75 -> BCE 0.2876821; dice (3 + 1) / 5 = 0.8
    #   vs t1: every point costs -ln 0.25 -> BCE 1.3862944; dice (1 + 1) / 5 = 0.4
    # C = 2 * (-p_class) + 5 * BCE + 5 * (1 - dice):
    #   [0,0] = [0,1] = -0.6666667 + 3.4657359 + 2 = 4.7990692
    #   [1,0] = -1 + 1.4384104 + 1 = 1.4384104;   [1,1] = -0.5 + 6.9314718 + 3 = 9.4314718
    cost = _matcher("sigmoid").cost_matrix(Q_LOGITS, Q_MASKS, TARGET, CENTRES_2X2)
    expected = torch.tensor([[4.7990692, 4.7990692], [1.4384104, 9.4314718]])
    torch.testing.assert_close(cost, expected)


def test_matcher_cost_softmax_by_hand():
    # softmax across the 2 queries at each point: top pixels (0 vs ln3) -> q0 .25, q1 .75;
    # bottom pixels (0 vs -ln3) -> q0 .75, q1 .25.
    # CE = -mean_p t log p:  [0,0] = 2 ln4 / 4 = 0.6931472;  [0,1] = 2 ln(4/3) / 4 = 0.1438410
    #                        [1,0] = 0.1438410;                [1,1] = 0.6931472
    # dice: [0,0] (1 + 1) / 5 = 0.4; [0,1] (3 + 1) / 5 = 0.8; [1,0] 0.8; [1,1] 0.4
    # C: [0,0] = -0.6666667 + 3.4657359 + 3 = 5.7990692;  [0,1] = -0.6666667 + 0.7192052 + 1
    #    [1,0] = -1 + 0.7192052 + 1;                      [1,1] = -0.5 + 3.4657359 + 3
    cost = _matcher("softmax").cost_matrix(Q_LOGITS, Q_MASKS, TARGET, CENTRES_2X2)
    expected = torch.tensor([[5.7990692, 1.0525385], [0.7192052, 5.9657359]])
    torch.testing.assert_close(cost, expected)


def test_matcher_softmax_normalises_across_all_queries():
    matcher = _matcher("softmax")
    cost = matcher.cost_matrix(Q_LOGITS, Q_MASKS, TARGET, CENTRES_2X2)
    # The softmax sees only differences between queries: a shift common to all is invisible...
    shifted = matcher.cost_matrix(Q_LOGITS, Q_MASKS + 7.0, TARGET, CENTRES_2X2)
    torch.testing.assert_close(shifted, cost)
    # ...but raising q1 alone lowers q0's probabilities, so q0's costs change although q0's own
    # logits did not (a per-query sigmoid would leave row 0 unchanged).
    raised = Q_MASKS.clone()
    raised[1] += 1.0
    assert not torch.allclose(
        matcher.cost_matrix(Q_LOGITS, raised, TARGET, CENTRES_2X2)[0], cost[0]
    )
    sigmoid = _matcher("sigmoid")
    torch.testing.assert_close(
        sigmoid.cost_matrix(Q_LOGITS, raised, TARGET, CENTRES_2X2)[0],
        sigmoid.cost_matrix(Q_LOGITS, Q_MASKS, TARGET, CENTRES_2X2)[0],
    )


def _three_query_case(class_logits_scale=8.0):
    """3 queries, 2 targets on 16x16 maps; q2's mask is t0 (left half, label 1), q0's is t1
    (top-right quadrant, label 0), q1 covers the rest and predicts no-object. The pixels are
    split between the queries, so softmax and sigmoid masks agree on the optimum."""
    left = torch.zeros(16, 16)
    left[:, :8] = 1
    top_right = torch.zeros(16, 16)
    top_right[:8, 8:] = 1
    rest = 1 - left - top_right
    masks = torch.stack([top_right, rest, left]) * 20 - 10  # logits +-10
    logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]) * class_logits_scale
    outputs = {"pred_logits": logits[None], "pred_masks": masks[None]}
    targets = [{"labels": torch.tensor([1, 0]), "masks": torch.stack([left, top_right]).bool()}]
    return outputs, targets


@pytest.mark.parametrize("mask_activation", ["sigmoid", "softmax"])
@pytest.mark.parametrize("class_logits_scale", [8.0, 0.0])  # 0: uniform classes, masks decide
def test_matcher_finds_known_permutation(mask_activation, class_logits_scale):
    torch.manual_seed(0)
    outputs, targets = _three_query_case(class_logits_scale)
    [(rows, cols)] = _matcher(mask_activation, num_points=2000)(outputs, targets)
    assert rows.dtype == cols.dtype == torch.int64
    assert rows.tolist() == [0, 2] and cols.tolist() == [1, 0]


@pytest.mark.parametrize("mask_activation", ["sigmoid", "softmax"])
def test_matcher_zero_target_image_gives_empty_indices(mask_activation):
    outputs, targets = _three_query_case()
    outputs = {k: torch.cat([v, v]) for k, v in outputs.items()}
    targets.append({"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 16, 16)})
    indices = _matcher(mask_activation, num_points=500)(outputs, targets)
    assert len(indices) == 2
    assert indices[0][0].tolist() == [0, 2]
    assert indices[1][0].shape == indices[1][1].shape == (0,)
    assert indices[1][0].dtype == torch.int64


def test_matcher_rejects_bad_arguments():
    with pytest.raises(ValueError, match="MASK_ACTIVATION='tanh'.*sigmoid, softmax"):
        _matcher("tanh")
    with pytest.raises(ValueError, match="TRAIN_NUM_POINTS=0"):
        _matcher(num_points=0)
    outputs, targets = _three_query_case()
    with pytest.raises(ValueError, match="2 targets for a batch of 1"):
        _matcher()(outputs, targets * 2)
    targets[0]["labels"] = torch.tensor([1])
    with pytest.raises(ValueError, match="1 labels but 2 masks"):
        _matcher()(outputs, targets)


# --------------------------------------------------------------------------- criterion
@pytest.fixture
def centre_points(monkeypatch):
    """Make the criterion's importance sampling return the 4 pixel centres of a 2x2 map."""

    def fake(pred, *args, **kwargs):  # grid_sample's [-1, 1] coordinates
        return (2 * CENTRES_2X2 - 1)[None].expand(pred.shape[0], -1, -1).clone()

    monkeypatch.setattr(criterion_module, "uncertain_point_grid", fake)


def _hand_outputs():
    return {"pred_logits": Q_LOGITS[None].clone(), "pred_masks": Q_MASKS[None].clone()}


def _hand_targets():
    return [{"labels": torch.tensor([0]), "masks": _map2x2([[1, 1, 0, 0]])}]


def test_criterion_sigmoid_mask_losses_by_hand(centre_points):
    criterion = _criterion(FixedMatcher([_idx([1], [0])]), "sigmoid")
    losses = criterion(_hand_outputs(), _hand_targets())
    # q1 sigmoid [.75, .75, .25, .25] vs top row: every point -ln .75 -> BCE 0.2876821
    # dice (2 * 1.5 + 1) / (2 + 2 + 1) = 0.8 -> 0.2;  num_masks = 1
    assert losses["loss_mask"].item() == pytest.approx(0.2876821, 1e-6)
    assert losses["loss_dice"].item() == pytest.approx(0.2, 1e-6)


def test_criterion_softmax_mask_losses_by_hand(centre_points):
    criterion = _criterion(FixedMatcher([_idx([1], [0])]), "softmax")
    losses = criterion(_hand_outputs(), _hand_targets())
    # softmax over queries: q1 = [.75, .75, .25, .25] (see the matcher case)
    # CE: -(2 ln .75) / 4 = 0.1438410; dice (3 + 1) / 5 = 0.8 -> 0.2
    assert losses["loss_mask"].item() == pytest.approx(0.1438410, 1e-6)
    assert losses["loss_dice"].item() == pytest.approx(0.2, 1e-6)
    # The unmatched q0 takes part in the softmax: raising it to ln3 everywhere gives q1
    # top: softmax(ln3, ln3) = .5; bottom: (1/3) / (3 + 1/3) = .1
    # CE: -(2 ln .5) / 4 = 0.3465736; dice: (2 * 1 + 1) / (1.2 + 2 + 1) = 0.7142857 -> 0.2857143
    outputs = _hand_outputs()
    outputs["pred_masks"][0, 0] = LN3
    losses = criterion(outputs, _hand_targets())
    assert losses["loss_mask"].item() == pytest.approx(0.3465736, 1e-6)
    assert losses["loss_dice"].item() == pytest.approx(0.2857143, 1e-6)


def test_criterion_eos_weighting_by_hand():
    # two images of one query each, K = 2:
    #   image 0: logits [ln2, 0, 0] matched to a class-0 target: CE -ln(1/2) = ln2, weight 1
    #   image 1: logits [0, 0, 0], no target -> no-object: CE ln3, weight eos 0.1
    # weighted mean (ln2 + 0.1 ln3) / (1 + 0.1) = 0.8030084 / 1.1 = 0.7300076
    outputs = {
        "pred_logits": torch.tensor([[[LN2, 0.0, 0.0]], [[0.0, 0.0, 0.0]]]),
        "pred_masks": torch.zeros(2, 1, 2, 2),
    }
    targets = [
        {"labels": torch.tensor([0]), "masks": torch.ones(1, 2, 2)},
        {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 2, 2)},
    ]
    criterion = _criterion(FixedMatcher([_idx([0], [0]), _idx([], [])]), eos_coef=0.1)
    assert criterion(outputs, targets)["loss_ce"].item() == pytest.approx(0.7300076, 1e-6)
    torch.testing.assert_close(criterion.state_dict()["empty_weight"], torch.tensor([1, 1, 0.1]))
    # with eos 1 it is the plain mean (ln2 + ln3) / 2
    criterion = _criterion(FixedMatcher([_idx([0], [0]), _idx([], [])]), eos_coef=1.0)
    assert criterion(outputs, targets)["loss_ce"].item() == pytest.approx((LN2 + LN3) / 2, 1e-6)


def test_criterion_keeps_configured_eos_weight_when_loading_a_checkpoint():
    # A checkpoint trained with eos 0.1 carries empty_weight [1, 1, 0.1]; a run configured with
    # eos 1.0 that loads it must keep weighting no-object by 1.0 (the config decides).
    trained = _criterion(FixedMatcher([]), eos_coef=0.1)
    criterion = _criterion(FixedMatcher([]), eos_coef=1.0)
    result = criterion.load_state_dict(trained.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(criterion.empty_weight, torch.tensor([1.0, 1.0, 1.0]))
    # a checkpoint with another number of classes is still refused
    with pytest.raises(RuntimeError, match="empty_weight"):
        criterion.load_state_dict(_criterion(FixedMatcher([]), num_classes=3).state_dict())


def test_criterion_normalises_by_target_count_not_matched_count():
    # Mask logits 0 and empty targets: p = .5 everywhere, even where points fall near the border
    # (sampling blends with zero padding, which leaves both 0-maps unchanged), so every matched
    # mask has BCE ln2 whatever points are drawn.
    # Image 0 has 2 targets for 1 query (1 matched), image 1 has 1 target (matched):
    # num_masks = 3, loss_mask = 2 ln2 / 3 = 0.4620981
    outputs = {"pred_logits": torch.zeros(2, 1, 3), "pred_masks": torch.zeros(2, 1, 4, 4)}
    targets = [
        {"labels": torch.tensor([0, 1]), "masks": torch.zeros(2, 4, 4)},
        {"labels": torch.tensor([1]), "masks": torch.zeros(1, 4, 4)},
    ]
    criterion = _criterion(_matcher(num_points=16), num_points=16)
    losses = criterion(outputs, targets)
    assert losses["loss_mask"].item() == pytest.approx(2 * LN2 / 3, 1e-6)
    # dice per mask: (0 + 1) / (0.5 * 16 + 0 + 1) = 1/9 -> loss 8/9; 2 * 8/9 / 3 = 0.5925926
    assert losses["loss_dice"].item() == pytest.approx(16 / 27, 1e-6)


def test_get_num_masks(monkeypatch):
    criterion = _criterion(_matcher())
    two = [{"labels": torch.tensor([0, 1])}, {"labels": torch.zeros(0, dtype=torch.int64)}]
    assert criterion.get_num_masks(two, torch.device("cpu")) == 2.0
    none = [{"labels": torch.zeros(0, dtype=torch.int64)}]
    assert criterion.get_num_masks(none, torch.device("cpu")) == 1.0  # clamped
    # Two workers, the other one holding 4 masks: (2 + 4) / 2 = 3 per worker.
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.add_(4))
    monkeypatch.setattr(criterion_module, "get_world_size", lambda: 2)
    assert criterion.get_num_masks(two, torch.device("cpu")) == 3.0


def _random_outputs(num_images, num_aux, q=4, k=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)

    def pred():
        return {
            "pred_logits": torch.randn(num_images, q, k + 1, generator=g).requires_grad_(),
            "pred_masks": torch.randn(num_images, q, size, size, generator=g).requires_grad_(),
        }

    out = pred()
    out["aux_outputs"] = [pred() for _ in range(num_aux)]
    return out


def _random_targets(counts, k=3, size=16):
    g = torch.Generator().manual_seed(1)
    return [
        {
            "labels": torch.randint(0, k, (n,), generator=g),
            "masks": torch.rand(n, size, size, generator=g) > 0.5,
        }
        for n in counts
    ]


@pytest.mark.parametrize("mask_activation", ["sigmoid", "softmax"])
def test_criterion_deep_supervision_keys(mask_activation):
    outputs = _random_outputs(2, num_aux=2)
    criterion = _criterion(_matcher(mask_activation, 50), mask_activation, num_classes=3)
    losses = criterion(outputs, _random_targets([2, 1]))
    expected = set(build_loss_weight_dict(1.0, 1.0, 1.0, num_aux=2))
    assert set(losses) == expected
    assert len(expected) == 9  # 3 keys for the final prediction and each of 2 aux ones
    assert "loss_dice_1" in expected and "loss_dice_2" not in expected
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())


@pytest.mark.parametrize("mask_activation", ["sigmoid", "softmax"])
def test_criterion_empty_batch_is_finite_with_zero_mask_gradient(mask_activation):
    outputs = _random_outputs(2, num_aux=1)
    criterion = _criterion(_matcher(mask_activation, 50), mask_activation, num_classes=3)
    losses = criterion(outputs, _random_targets([0, 0]))
    assert all(torch.isfinite(v) for v in losses.values())
    for key in ("loss_mask", "loss_dice", "loss_mask_0", "loss_dice_0"):
        assert losses[key].item() == 0.0 and losses[key].requires_grad
    sum(losses.values()).backward()
    # the masks get a zero gradient (they are in the graph), the logits a real one
    assert torch.equal(outputs["pred_masks"].grad, torch.zeros_like(outputs["pred_masks"]))
    assert outputs["pred_logits"].grad.abs().sum() > 0


@pytest.mark.parametrize("mask_activation", ["sigmoid", "softmax"])
def test_criterion_half_empty_batch(mask_activation):
    outputs = _random_outputs(2, num_aux=1)
    criterion = _criterion(_matcher(mask_activation, 50), mask_activation, num_classes=3)
    losses = criterion(outputs, _random_targets([2, 0]))
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"].item() > 0 and losses["loss_dice"].item() > 0
    sum(losses.values()).backward()
    grad = outputs["pred_masks"].grad
    assert torch.isfinite(grad).all()
    assert grad[0].abs().sum() > 0
    # the empty image's masks are never matched, so mask losses do not reach them
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))


def test_criterion_returns_final_layer_indices():
    outputs = _random_outputs(1, num_aux=1)
    final, aux = [_idx([2], [0])], [_idx([0], [0])]
    matcher = FixedMatcher(final, aux)
    matcher.final_logits = outputs["pred_logits"]
    losses, indices = _criterion(matcher, num_classes=3)(
        outputs, _random_targets([1]), return_indices=True
    )
    assert indices is final
    assert "loss_ce_0" in losses


def test_criterion_rejects_bad_input():
    outputs = _random_outputs(1, num_aux=0)
    criterion = _criterion(_matcher(num_points=10), num_classes=3)
    targets = _random_targets([1])
    targets[0]["labels"] = torch.tensor([3])  # 3 is no-object for K = 3
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\].*max 3"):
        criterion(outputs, targets)
    with pytest.raises(KeyError, match="masks"):
        criterion(outputs, [{"labels": torch.tensor([0])}])
    with pytest.raises(ValueError, match="IMPORTANCE_SAMPLE_RATIO=1.5"):
        SetCriterion(
            3,
            matcher=criterion.matcher,
            weight_dict={},
            eos_coef=0.1,
            num_points=4,
            oversample_ratio=3.0,
            importance_sample_ratio=1.5,
        )
    with pytest.raises(ValueError, match="unknown losses"):
        SetCriterion(
            3,
            matcher=criterion.matcher,
            weight_dict={},
            eos_coef=0.1,
            losses=["boxes"],
            num_points=4,
            oversample_ratio=3.0,
            importance_sample_ratio=0.75,
        )


def test_criterion_from_config():
    cfg = get_cfg()
    add_comformer_config(cfg)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 150
    cfg.MODEL.MASK_FORMER.MASK_ACTIVATION = "softmax"
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 10  # Mask2Former's models (the default is 6)
    cfg.MODEL.MASK_FORMER.CLASS_WEIGHT = 2.0
    criterion = SetCriterion(cfg)
    # DEC_LAYERS = 10 counts the initial prediction: 9 aux predictions + the final one
    assert len(criterion.weight_dict) == 3 * 10
    assert criterion.weight_dict["loss_ce_8"] == 2.0 and "loss_ce_9" not in criterion.weight_dict
    assert criterion.empty_weight.shape == (151,)
    assert criterion.matcher.mask_activation == criterion.mask_activation == "softmax"
    assert criterion.num_points == criterion.matcher.num_points == 112 * 112


@pytest.mark.parametrize("num_masks,ratio,importance", [(5, 3.0, 0.75), (3, 2.0, 1.0), (4, 1.0, 0.0)])
def test_uncertain_point_coords_are_detectron2s_points(num_masks, ratio, importance):
    """Same random draws, same chosen points as detectron2's function (Mask2Former's); only the
    order of the uncertain points within a mask may differ."""
    from detectron2.projects.point_rend.point_features import (
        get_uncertain_point_coords_with_randomness,
    )

    pred = torch.randn(num_masks, 1, 9, 11, generator=torch.Generator().manual_seed(3))
    args = (lambda x: -x.abs(), 50, ratio, importance)
    torch.manual_seed(0)
    ours = criterion_module.uncertain_point_coords(pred, *args)
    after_ours = torch.rand(3)
    torch.manual_seed(0)
    ref = get_uncertain_point_coords_with_randomness(pred, *args)
    after_ref = torch.rand(3)
    assert ours.shape == ref.shape == (num_masks, 50, 2)
    assert torch.equal(after_ours, after_ref)  # the generator is left in the same state
    k = int(importance * 50)
    assert torch.equal(ours[:, k:], ref[:, k:])  # the uniform points, in order

    def as_set(coords):  # order of the uncertain points within each mask
        keys = coords[..., 0] * 4 + coords[..., 1]
        return torch.gather(coords, 1, keys.argsort(dim=1)[..., None].expand(-1, -1, 2))

    assert torch.equal(as_set(ours[:, :k]), as_set(ref[:, :k]))
    # The criterion samples at the [-1, 1] grid directly: the same values as point_sample.
    from detectron2.projects.point_rend.point_features import point_sample

    torch.manual_seed(0)
    grid = criterion_module.uncertain_point_grid(pred, *args)
    assert torch.equal((grid + 1) / 2, ours) and torch.equal(grid, 2 * ours - 1)
    assert torch.equal(
        criterion_module._sample_at(pred, grid), point_sample(pred, ours, align_corners=False)
    )


def test_pairwise_sigmoid_ce_is_mask2formers_two_products():
    """One product and a row sum (comformer) against Mask2Former's two BCE products, on large
    logits and fractional (bilinearly sampled) targets, in float32 against float64."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 2000, generator=g) * 20
    targets = torch.rand(5, 2000, generator=g).round() * torch.rand(5, 2000, generator=g).clamp(0.5)
    x, t = logits.double(), targets.double()
    pos = F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none")
    neg = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
    reference = (pos @ t.t() + neg @ (1 - t).t()) / x.shape[1]
    torch.testing.assert_close(pairwise_sigmoid_ce_loss(logits, targets).double(), reference,
                               rtol=1e-6, atol=1e-5)  # fmt: skip
