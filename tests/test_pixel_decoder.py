"""Pixel decoders and the pure-PyTorch multi-scale deformable attention."""

import math

import numpy as np
import pytest
import torch

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.projects.deeplab import add_deeplab_config

from comformer import add_comformer_config
from comformer.modeling.pixel_decoder import (
    PIXEL_DECODER_REGISTRY,
    BasePixelDecoder,
    MSDeformAttn,
    MSDeformAttnPixelDecoder,
    build_pixel_decoder,
    ms_deform_attn,
)


def _reference(value, shapes, locations, weights):
    """Deformable attention written out point by point: bilinear from the 4 nearest pixel centres."""
    value, locations, weights = (t.detach().double().numpy() for t in (value, locations, weights))
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = locations.shape
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    out = np.zeros((N, Lq, M, D))
    for n in range(N):
        for q in range(Lq):
            for m in range(M):
                for lvl, (H, W) in enumerate(shapes):
                    level = value[n, starts[lvl] : starts[lvl + 1], m].reshape(H, W, D)
                    for p in range(P):
                        # pixel (i, j)'s centre is at normalised ((j + 0.5) / W, (i + 0.5) / H)
                        x = locations[n, q, m, lvl, p, 0] * W - 0.5
                        y = locations[n, q, m, lvl, p, 1] * H - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        sample = np.zeros(D)
                        for yi in (y0, y0 + 1):
                            for xi in (x0, x0 + 1):
                                if 0 <= yi < H and 0 <= xi < W:  # zero outside the map
                                    bilinear = (1 - abs(x - xi)) * (1 - abs(y - yi))
                                    sample += bilinear * level[yi, xi]
                        out[n, q, m] += weights[n, q, m, lvl, p] * sample
    return torch.from_numpy(out.reshape(N, Lq, M * D))


def _random_inputs(N=2, Lq=5, M=2, D=3, shapes=((3, 4), (2, 2)), P=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in shapes)
    value = torch.randn(N, S, M, D, generator=g)
    # Well outside [0, 1] too: those points read (partly) zero padding.
    locations = torch.rand(N, Lq, M, len(shapes), P, 2, generator=g) * 1.8 - 0.4
    weights = torch.rand(N, Lq, M, len(shapes), P, generator=g)
    return value, list(shapes), locations, weights


def test_ms_deform_attn_matches_pointwise_bilinear_reference():
    value, shapes, locations, weights = _random_inputs()
    # Points that lie entirely outside (further than half a pixel beyond the border) read zero.
    locations[0, 0, 0, 0, 0] = torch.tensor([-0.5, 0.5])
    locations[1, 2, 1, 1, 2] = torch.tensor([0.5, 1.8])
    out = ms_deform_attn(value, shapes, locations, weights)
    assert out.shape == (2, 5, 2 * 3) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _reference(value, shapes, locations, weights))
    # The spatial shapes may also be given as Deformable DETR's (L, 2) tensor.
    out_t = ms_deform_attn(value, torch.tensor(shapes), locations, weights)
    torch.testing.assert_close(out_t, out)


def test_ms_deform_attn_hand_computed_points():
    # One image, one head, one channel, one level of 2x2 pixels [[1, 2], [3, 4]], 4 queries.
    value = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    locations = torch.tensor(
        [
            [0.25, 0.75],  # centre of pixel (row 1, col 0): exactly 3
            [0.75, 0.25],  # centre of pixel (row 0, col 1): exactly 2
            [0.5, 0.25],  # half way between the centres of 1 and 2: 1.5
            [0.0, 0.0],  # the image corner: a quarter of pixel 1, the rest is zero padding: 0.25
        ]
    ).view(1, 4, 1, 1, 1, 2)
    weights = torch.ones(1, 4, 1, 1, 1)
    out = ms_deform_attn(value, [(2, 2)], locations, weights)
    assert out.flatten().tolist() == [3.0, 2.0, 1.5, 0.25]
    # The weights scale each point's sample.
    out = ms_deform_attn(value, [(2, 2)], locations, weights * 2)
    assert out.flatten().tolist() == [6.0, 4.0, 3.0, 0.5]


def test_ms_deform_attn_gradients_reach_all_inputs():
    value, shapes, locations, weights = _random_inputs()
    for t in (value, locations, weights):
        t.requires_grad_(True)
    ms_deform_attn(value, shapes, locations, weights).sum().backward()
    for name, t in (("value", value), ("locations", locations), ("weights", weights)):
        assert torch.isfinite(t.grad).all(), name
        assert t.grad.abs().sum() > 0, name

    # Hand-checkable slope: on a 1x2 level [[0, 2]] the value rises by 2 per pixel between the two
    # centres, i.e. by 2 * W = 4 per unit of normalised x.
    value = torch.tensor([0.0, 2.0]).view(1, 2, 1, 1).requires_grad_(True)
    location = torch.tensor([0.5, 0.5]).view(1, 1, 1, 1, 1, 2).requires_grad_(True)
    weight = torch.full((1, 1, 1, 1, 1), 0.5, requires_grad=True)
    out = ms_deform_attn(value, [(1, 2)], location, weight)
    out.backward()
    assert out.item() == 0.5  # 0.5 * (0 + 2) / 2
    assert location.grad[..., 0].item() == pytest.approx(0.5 * 4)
    assert weight.grad.item() == 1.0
    assert value.grad.flatten().tolist() == [0.25, 0.25]


def test_ms_deform_attn_runs_in_float32_under_autocast():
    value, shapes, locations, weights = _random_inputs()
    expected = ms_deform_attn(value, shapes, locations, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ms_deform_attn(value, shapes, locations, weights)
        out_bf16 = ms_deform_attn(value.bfloat16(), shapes, locations, weights)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)  # not a bfloat16 approximation
    assert out_bf16.dtype == torch.bfloat16  # cast back to the value's dtype
    torch.testing.assert_close(
        out_bf16.float(),
        ms_deform_attn(value.bfloat16().float(), shapes, locations, weights),
        atol=2e-2,
        rtol=1e-2,
    )


def test_ms_deform_attn_rejects_inconsistent_shapes():
    value, shapes, locations, weights = _random_inputs()
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn(value, [(3, 4), (2, 3)], locations, weights)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn(value, shapes, locations, weights[..., :2])
    with pytest.raises(ValueError, match="sampling_locations"):
        ms_deform_attn(value, shapes, locations[:, :, :, :1], weights)


def test_msdeformattn_init_and_module_names():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=8, n_points=2)
    assert {name for name, _ in attn.named_children()} == {
        "sampling_offsets",
        "attention_weights",
        "value_proj",
        "output_proj",
    }
    assert attn.sampling_offsets.weight.shape == (8 * 2 * 2 * 2, 16)
    assert attn.attention_weights.weight.shape == (8 * 2 * 2, 16)
    assert not attn.sampling_offsets.weight.any()
    assert not attn.attention_weights.weight.any() and not attn.attention_weights.bias.any()
    bias = attn.sampling_offsets.bias.view(8, 2, 2, 2)  # heads, levels, points, (x, y)
    # Head h points along angle 2*pi*h/8, scaled so the larger component is 1, times point index.
    expected_first_point = torch.tensor(
        [[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]], dtype=torch.float32
    )
    for level in range(2):
        torch.testing.assert_close(bias[:, level, 0], expected_first_point, atol=1e-5, rtol=0)
        torch.testing.assert_close(bias[:, level, 1], 2 * expected_first_point, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="d_model=10 must be divisible by n_heads=4"):
        MSDeformAttn(d_model=10, n_heads=4)


def _identity_attention(offset_xy):
    """One head, level and point; identity projections; every query samples at ``offset_xy`` px."""
    attn = MSDeformAttn(d_model=2, n_levels=1, n_heads=1, n_points=1)
    with torch.no_grad():
        for proj in (attn.value_proj, attn.output_proj):
            proj.weight.copy_(torch.eye(2))
            proj.bias.zero_()
        attn.sampling_offsets.bias.copy_(torch.tensor(offset_xy))
    return attn


def test_msdeformattn_offsets_are_in_pixels_of_the_level():
    H, W = 2, 3
    src = torch.arange(12, dtype=torch.float32).view(1, H * W, 2)
    ys, xs = torch.meshgrid((torch.arange(H) + 0.5) / H, (torch.arange(W) + 0.5) / W, indexing="ij")
    reference = torch.stack([xs.flatten(), ys.flatten()], -1).view(1, H * W, 1, 2)
    # Zero offset at the pixel centres: the input comes back.
    out = _identity_attention([0.0, 0.0])(src, reference, src, [(H, W)])
    torch.testing.assert_close(out, src)
    # One pixel to the right: each pixel reads its right neighbour, the last column reads padding.
    out = _identity_attention([1.0, 0.0])(src, reference, src, [(H, W)])
    expected = torch.cat([src.view(H, W, 2)[:, 1:], torch.zeros(H, 1, 2)], 1).view(1, H * W, 2)
    torch.testing.assert_close(out, expected)
    # One pixel down on a 2-row map: the first row reads the second, the second reads zeros.
    out = _identity_attention([0.0, 1.0])(src, reference, src, [(H, W)])
    expected = torch.cat([src.view(H, W, 2)[1:], torch.zeros(1, W, 2)], 0).view(1, H * W, 2)
    torch.testing.assert_close(out, expected)


def test_msdeformattn_module_under_autocast_stays_close_to_float32():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    shapes = [(4, 4), (2, 2)]
    src = torch.randn(2, 20, 16)
    reference = torch.rand(2, 20, 2, 2)
    expected = attn(src, reference, src, shapes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(src, reference, src, shapes)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


SHAPES = {
    "res2": ShapeSpec(channels=16, stride=4),
    "res3": ShapeSpec(channels=32, stride=8),
    "res4": ShapeSpec(channels=48, stride=16),
    "res5": ShapeSpec(channels=64, stride=32),
}


def _features(batch=2, height=64, width=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(batch, s.channels, height // s.stride, width // s.stride, generator=g)
        for k, s in SHAPES.items()
    }


def _msdeform_decoder(**overrides):
    torch.manual_seed(0)
    kwargs = dict(
        input_shape=SHAPES,
        transformer_dropout=0.0,
        transformer_nheads=4,
        transformer_dim_feedforward=64,
        transformer_enc_layers=2,
        conv_dim=32,
        mask_dim=16,
        norm="GN",
        transformer_in_features=["res5", "res3", "res4"],  # order does not matter
        common_stride=4,
        transformer_n_points=2,
    )
    kwargs.update(overrides)
    return MSDeformAttnPixelDecoder(**kwargs)


def test_msdeformattn_pixel_decoder_shapes_and_backward():
    decoder = _msdeform_decoder()
    features = _features()
    mask_features, encoder_features, multi_scale = decoder.forward_features(features)
    assert mask_features.shape == (2, 16, 16, 24)  # stride 4
    assert encoder_features.shape == (2, 32, 2, 3)  # the encoder's res5 output
    assert [tuple(f.shape) for f in multi_scale] == [(2, 32, 2, 3), (2, 32, 4, 6), (2, 32, 8, 12)]
    assert multi_scale[0] is encoder_features
    loss = mask_features.square().mean() + sum(f.mean() for f in multi_scale)
    loss.backward()
    for name, p in decoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert decoder.transformer.encoder.layers[0].self_attn.sampling_offsets.weight.grad.any()


def test_msdeformattn_pixel_decoder_parameter_names_follow_mask2former():
    state = {k: tuple(v.shape) for k, v in _msdeform_decoder().state_dict().items()}
    # input_proj runs coarsest first: res5 (64 channels), res4 (48), res3 (32).
    assert state["input_proj.0.0.weight"] == (32, 64, 1, 1)
    assert state["input_proj.1.0.weight"] == (32, 48, 1, 1)
    assert state["input_proj.2.0.weight"] == (32, 32, 1, 1)
    assert state["input_proj.2.1.weight"] == (32,)  # GroupNorm
    assert state["transformer.level_embed"] == (3, 32)
    layer = "transformer.encoder.layers.1."
    assert state[layer + "self_attn.sampling_offsets.weight"] == (4 * 3 * 2 * 2, 32)
    assert state[layer + "self_attn.attention_weights.weight"] == (4 * 3 * 2, 32)
    assert state[layer + "linear1.weight"] == (64, 32)
    assert state[layer + "norm2.bias"] == (32,)
    assert "transformer.encoder.layers.2.norm1.weight" not in state
    # One FPN level (res2, stride 4): a bias-free lateral 1x1 and 3x3 output conv, both with GN.
    assert state["adapter_1.weight"] == (32, 16, 1, 1) and "adapter_1.bias" not in state
    assert state["adapter_1.norm.weight"] == (32,)
    assert state["layer_1.weight"] == (32, 32, 3, 3) and "layer_1.norm.bias" in state
    assert "adapter_2.weight" not in state
    assert state["mask_features.weight"] == (16, 32, 1, 1)


def test_msdeformattn_pixel_decoder_images_do_not_interact():
    decoder = _msdeform_decoder().eval()
    features = _features(batch=2)
    with torch.no_grad():
        both = decoder.forward_features(features)
        first = decoder.forward_features({k: v[:1] for k, v in features.items()})
    torch.testing.assert_close(both[0][:1], first[0], atol=1e-5, rtol=1e-4)
    for a, b in zip(both[2], first[2]):
        torch.testing.assert_close(a[:1], b, atol=1e-5, rtol=1e-4)


def test_msdeformattn_pixel_decoder_with_two_encoder_levels():
    # Encoder on res4-res5 only: the FPN path then adds res3 and res2, res3 being the third level.
    decoder = _msdeform_decoder(transformer_in_features=["res4", "res5"])
    mask_features, _, multi_scale = decoder.forward_features(_features(batch=1))
    assert mask_features.shape == (1, 16, 16, 24)
    assert [tuple(f.shape[-2:]) for f in multi_scale] == [(2, 3), (4, 6), (8, 12)]
    assert decoder.transformer.level_embed.shape == (2, 32)
    assert hasattr(decoder, "adapter_2") and not hasattr(decoder, "adapter_3")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(transformer_in_features=["res3", "res6"]),
            "DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES",
        ),
        (dict(conv_dim=48), "CONVS_DIM=48 must be a multiple of 32"),
        (dict(transformer_nheads=3), "MODEL.MASK_FORMER.NHEADS=3"),
        (dict(common_stride=2), "COMMON_STRIDE=2"),
        (dict(norm="BatchNorm"), "NORM='BatchNorm'"),
        (dict(transformer_in_features=["res5"], common_stride=16), "needs 3"),
    ],
)
def test_msdeformattn_pixel_decoder_rejects_bad_settings(overrides, message):
    with pytest.raises(ValueError, match=message):
        _msdeform_decoder(**overrides)


def test_base_pixel_decoder_shapes_and_names():
    torch.manual_seed(0)
    decoder = BasePixelDecoder(SHAPES, conv_dim=32, mask_dim=16, norm="GN")
    mask_features, encoder_features, multi_scale = decoder.forward_features(_features())
    assert encoder_features is None
    assert mask_features.shape == (2, 16, 16, 24)
    assert [tuple(f.shape) for f in multi_scale] == [(2, 32, 2, 3), (2, 32, 4, 6), (2, 32, 8, 12)]
    state = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    # Finest feature first: adapter_1/layer_1 for res2, ..., only layer_4 for res5.
    assert state["adapter_1.weight"] == (32, 16, 1, 1)
    assert state["adapter_3.weight"] == (32, 48, 1, 1)
    assert "adapter_4.weight" not in state
    assert state["layer_4.weight"] == (32, 64, 3, 3)
    assert state["mask_features.weight"] == (16, 32, 3, 3)
    with pytest.raises(ValueError, match="at least 3 input features"):
        BasePixelDecoder(
            {k: SHAPES[k] for k in ("res4", "res5")}, conv_dim=32, mask_dim=16, norm="GN"
        )


def _cfg(**head):
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_comformer_config(cfg)
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 32
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 16
    cfg.MODEL.SEM_SEG_HEAD.NORM = "GN"
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    cfg.MODEL.MASK_FORMER.NHEADS = 2
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 1
    cfg.MODEL.SEM_SEG_HEAD.DIM_FEEDFORWARD = 48
    for k, v in head.items():
        cfg.MODEL.SEM_SEG_HEAD[k] = v
    return cfg


def test_build_pixel_decoder_from_config():
    # A feature the head does not use (IN_FEATURES) is not given to the decoder.
    shapes = dict(SHAPES, res6=ShapeSpec(channels=8, stride=64))
    decoder = build_pixel_decoder(_cfg(), shapes)
    assert isinstance(decoder, MSDeformAttnPixelDecoder)
    attn = decoder.transformer.encoder.layers[0].self_attn
    # Heads from MODEL.MASK_FORMER.NHEADS and 4 points, as Mask2Former builds it.
    assert (attn.n_heads, attn.n_levels, attn.n_points) == (2, 3, 4)
    assert len(decoder.transformer.encoder.layers) == 1
    assert decoder.transformer.encoder.layers[0].linear1.out_features == 48
    assert isinstance(
        build_pixel_decoder(_cfg(PIXEL_DECODER_NAME="BasePixelDecoder"), shapes), BasePixelDecoder
    )


def test_mask2former_unread_encoder_keys_are_not_read(caplog):
    # Mask2Former defines these keys but builds its encoder from MASK_FORMER.NHEADS and 4 points:
    # a config that sets them must build the same model in both.
    cfg = _cfg(DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS=4, DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS=2)
    with caplog.at_level("WARNING"):
        decoder = build_pixel_decoder(cfg, SHAPES)
    attn = decoder.transformer.encoder.layers[0].self_attn
    assert (attn.n_heads, attn.n_points) == (2, 4)
    assert "DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS=4 is not read" in caplog.text
    assert "DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS=2 is not read" in caplog.text
    # The defaults say nothing.
    caplog.clear()
    with caplog.at_level("WARNING"):
        build_pixel_decoder(_cfg(), SHAPES)
    assert "is not read" not in caplog.text


def test_encoder_feed_forward_width_defaults_to_mask2former():
    # SEM_SEG_HEAD.DIM_FEEDFORWARD is comformer's key; Mask2Former fixes the width at 1024.
    defaults = get_cfg()
    add_comformer_config(defaults)
    assert defaults.MODEL.SEM_SEG_HEAD.DIM_FEEDFORWARD == 1024


def test_build_pixel_decoder_unknown_name_lists_valid_names():
    assert {"MSDeformAttnPixelDecoder", "BasePixelDecoder"} <= {
        k for k, _ in PIXEL_DECODER_REGISTRY
    }
    with pytest.raises(KeyError) as err:
        build_pixel_decoder(_cfg(PIXEL_DECODER_NAME="FancyDecoder"), SHAPES)
    message = str(err.value)
    assert "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME='FancyDecoder'" in message
    assert "BasePixelDecoder" in message and "MSDeformAttnPixelDecoder" in message
