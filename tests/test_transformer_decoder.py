"""Mask2Former's masked-attention transformer decoder: shapes, layer count, level cycling, the
attention-mask rule and parameter names against a Mask2Former checkpoint."""

from pathlib import Path

import pytest
import torch

from detectron2.config import get_cfg

from comformer.config import add_comformer_config
from comformer.modeling.transformer_decoder import (
    MultiScaleMaskedTransformerDecoder,
    build_transformer_decoder,
)

REFERENCE_TSV = (
    Path(__file__).resolve().parent / "data/mask2former_R50_ade20k_panoptic_state_dict.tsv"
)
PREFIX = "sem_seg_head.predictor."

# small decoder: B 2, Q 5, K 3, C 16, 2 heads; levels 2x2, 4x4, 8x8; mask features 16x16
B, Q, K, C, HEADS = 2, 5, 3, 16, 2
LEVEL_SIZES = [(2, 2), (4, 4), (8, 8)]


def _decoder(dec_layers=4, mask_activation="sigmoid", in_channels=8, **kwargs):
    torch.manual_seed(0)
    return MultiScaleMaskedTransformerDecoder(
        in_channels,
        num_classes=K,
        hidden_dim=C,
        num_queries=Q,
        nheads=HEADS,
        dim_feedforward=32,
        dec_layers=dec_layers,
        pre_norm=False,
        mask_dim=C,
        enforce_input_project=False,
        mask_activation=mask_activation,
        **kwargs,
    )


def _inputs(in_channels=8):
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(B, in_channels, h, w, generator=g) for h, w in LEVEL_SIZES]
    return feats, torch.randn(B, C, 16, 16, generator=g)


def _cfg(**mask_former):
    cfg = get_cfg()
    add_comformer_config(cfg)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = K
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = C
    cfg.MODEL.MASK_FORMER.HIDDEN_DIM = C
    cfg.MODEL.MASK_FORMER.NHEADS = HEADS
    cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = Q
    cfg.MODEL.MASK_FORMER.DIM_FEEDFORWARD = 32
    for key, value in mask_former.items():
        cfg.MODEL.MASK_FORMER[key] = value
    return cfg


@pytest.mark.parametrize("mask_activation", ["sigmoid", "softmax"])
def test_output_shapes_and_aux_count(mask_activation):
    decoder = _decoder(dec_layers=4, mask_activation=mask_activation)
    out = decoder(*_inputs())
    assert out["pred_logits"].shape == (B, Q, K + 1)
    assert out["pred_masks"].shape == (B, Q, 16, 16)
    # the initial queries' prediction and layers 0..2 are auxiliary, layer 3's is the final one
    assert len(out["aux_outputs"]) == 4
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (B, Q, K + 1)
        assert aux["pred_masks"].shape == (B, Q, 16, 16)
    assert all(torch.isfinite(t).all() for t in (out["pred_logits"], out["pred_masks"]))


def test_dec_layers_from_config_counts_the_initial_prediction():
    decoder = build_transformer_decoder(_cfg(DEC_LAYERS=10), C, mask_classification=True)
    assert decoder.num_layers == 9
    assert len(decoder.transformer_cross_attention_layers) == 9
    assert len(decoder.transformer_self_attention_layers) == 9
    assert len(decoder.transformer_ffn_layers) == 9
    feats, mask_features = _inputs(in_channels=C)
    assert len(decoder(feats, mask_features)["aux_outputs"]) == 10 - 1
    # DEC_LAYERS = 1: only the prediction from the initial queries, no aux outputs
    decoder = build_transformer_decoder(_cfg(DEC_LAYERS=1), C, mask_classification=True)
    assert decoder.num_layers == 0 and decoder(feats, mask_features)["aux_outputs"] == []
    with pytest.raises(ValueError, match="DEC_LAYERS=0"):
        build_transformer_decoder(_cfg(DEC_LAYERS=0), C, mask_classification=True)


def test_config_keys_reach_the_decoder():
    cfg = _cfg(DEC_LAYERS=3, DROPOUT=0.25, MASK_ACTIVATION="softmax")
    decoder = build_transformer_decoder(cfg, 8, mask_classification=True)
    # MASK_FORMER.DROPOUT is the pixel decoder's: Mask2Former's transformer decoder has none.
    assert decoder.transformer_ffn_layers[0].dropout.p == 0.0
    assert decoder.transformer_cross_attention_layers[1].multihead_attn.dropout == 0.0
    assert decoder.mask_activation == "softmax"
    assert len(decoder.input_proj[0].state_dict()) == 2  # 8 -> 16 channels needs a projection
    assert len(build_transformer_decoder(cfg, C).input_proj[0].state_dict()) == 0
    enforced = build_transformer_decoder(_cfg(ENFORCE_INPUT_PROJ=True), C)
    assert len(enforced.input_proj[0].state_dict()) == 2
    cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "NoSuchDecoder"
    with pytest.raises(KeyError, match="NoSuchDecoder.*MultiScaleMaskedTransformerDecoder"):
        build_transformer_decoder(cfg, 8)


def test_attention_mask_sigmoid_rule_by_hand():
    decoder = _decoder()  # 2 heads
    logits = torch.tensor(
        [
            [[[1.0, -1.0], [0.0, -2.0]], [[-1.0, -1.0], [-1.0, -1.0]]],  # image 0: q0, q1
            [[[-3.0, 2.0], [2.0, -3.0]], [[5.0, 5.0], [5.0, -5.0]]],  # image 1: q0, q1
        ]
    )
    mask = decoder.attention_mask(logits, (2, 2))
    assert mask.dtype == torch.bool and mask.shape == (B * HEADS, 2, 4)
    # masked (True) where sigmoid < 0.5, i.e. logit < 0; a logit of exactly 0 (p = 0.5) attends.
    # image 0 q1 is masked everywhere, which would make its attention softmax NaN: unmasked.
    image0 = torch.tensor([[False, True, False, True], [False, False, False, False]])
    image1 = torch.tensor([[True, False, False, True], [False, False, False, True]])
    # one mask per (image, head), image-major, as nn.MultiheadAttention expects
    expected = torch.stack([image0, image0, image1, image1])
    assert torch.equal(mask, expected)


def test_attention_mask_softmax_rule_by_hand():
    logits = torch.tensor(
        [[[[1.0, -1.0], [0.0, -2.0]], [[0.0, 0.0], [0.0, 0.0]], [[-99.0, -99.0], [-99.0, -99.0]]]]
    )
    # softmax across the 3 queries, per pixel (q2: e^-99 vanishes next to 2 in fp32):
    #   top-left  1 vs 0: q0 .73, q1 .27   top-right -1 vs 0: q0 .27, q1 .73
    #   bot-left  0 vs 0: .5 each          bot-right -2 vs 0: q0 .12, q1 .88
    # q2 is below 0.5 everywhere -> fully masked -> unmasked by the rule
    mask = _decoder(mask_activation="softmax").attention_mask(logits, (2, 2))
    expected = torch.tensor(
        [[False, True, False, True], [True, False, False, False], [False, False, False, False]]
    )
    assert torch.equal(mask, torch.stack([expected, expected]))
    # sigmoid on the same logits: q1 has p = 0.5 everywhere and attends everywhere
    mask = _decoder(mask_activation="sigmoid").attention_mask(logits, (2, 2))
    assert torch.equal(mask[0, 1], torch.tensor([False, False, False, False]))
    assert torch.equal(mask[0, 0], expected[0])


def test_attention_mask_is_taken_at_the_next_levels_resolution():
    # 4x4 logits -> 2x2: bilinear (align_corners=False) halving averages each 2x2 block
    logits = torch.tensor(
        [
            [3.0, -1.0, -1.0, -1.0],
            [-1.0, -1.0, -1.0, -1.0],
            [1.0, 1.0, 2.0, 2.0],
            [1.0, -5.0, 2.0, 2.0],
        ]
    )
    # block means: top-left 0 (p .5, attends), top-right -1 (masked),
    #              bottom-left -0.5 (masked), bottom-right 2 (attends)
    mask = _decoder().attention_mask(logits[None, None], (2, 2))
    assert torch.equal(mask[0, 0], torch.tensor([False, True, True, False]))


def test_levels_cycle_and_each_layer_uses_the_previous_prediction():
    decoder = _decoder(dec_layers=5)
    calls = []

    def record(module, args, kwargs):
        calls.append((args[1].shape, kwargs["memory_mask"]))

    for layer in decoder.transformer_cross_attention_layers:
        layer.register_forward_pre_hook(record, with_kwargs=True)
    out = decoder(*_inputs())
    predictions = [aux["pred_masks"] for aux in out["aux_outputs"]]
    assert len(calls) == 5
    for i, (memory_shape, memory_mask) in enumerate(calls):
        h, w = LEVEL_SIZES[i % 3]  # levels 0, 1, 2, 0, 1: lowest resolution first
        assert memory_shape == (h * w, B, C)
        assert memory_mask.shape == (B * HEADS, Q, h * w)
        # layer i attends through the mask of the prediction made just before it
        assert torch.equal(memory_mask, decoder.attention_mask(predictions[i], (h, w)))


def test_attention_mask_carries_no_gradient():
    decoder = _decoder(dec_layers=1)
    mask_logits = torch.randn(1, Q, 4, 4, requires_grad=True)
    assert not decoder.attention_mask(mask_logits, (2, 2)).requires_grad


@pytest.mark.skipif(not REFERENCE_TSV.exists(), reason=f"{REFERENCE_TSV} not present")
def test_parameter_names_match_mask2former_checkpoint():
    reference = {}
    for line in REFERENCE_TSV.read_text().splitlines():
        if line.startswith(PREFIX):
            name, shape = line.split("\t")
            reference[name[len(PREFIX) :]] = tuple(int(s) for s in shape.split("x"))
    assert len(reference) == 175
    decoder = MultiScaleMaskedTransformerDecoder(
        256,
        num_classes=150,
        hidden_dim=256,
        num_queries=100,
        nheads=8,
        dim_feedforward=2048,
        dec_layers=9,
        pre_norm=False,
        mask_dim=256,
        enforce_input_project=False,
    )
    ours = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    assert sorted(set(reference) - set(ours)) == []
    assert sorted(set(ours) - set(reference)) == []
    assert ours == reference
