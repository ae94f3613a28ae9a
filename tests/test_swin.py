"""Swin backbone (shapes, windows, masks, layout), its checkpoint converter, and every yaml config."""

import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.projects.deeplab import add_deeplab_config

from comformer import add_comformer_config
from comformer.continual import class_embed
from comformer.modeling import classifier_extra_rows
from comformer.modeling.backbone.swin import (
    D2SwinTransformer,
    PatchMerging,
    relative_position_index,
    shifted_window_attention_mask,
    window_partition,
    window_reverse,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
ADE_SWIN_T = REPO / "configs/ade20k/panoptic-segmentation/swin/maskformer2_swin_tiny_bs16_160k.yaml"
TINY = dict(embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=7)
TINY_OPTS = [
    "MODEL.SWIN.EMBED_DIM", 32,
    "MODEL.SWIN.DEPTHS", [2, 2, 2, 2],
    "MODEL.SWIN.NUM_HEADS", [1, 2, 4, 8],
]  # fmt: skip
M = -100.0  # the mask's value for forbidden pairs


def _cfg(config_file, *opts):
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_comformer_config(cfg)
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(list(opts))
    return cfg


def _tiny_swin(**kwargs):
    torch.manual_seed(0)
    return D2SwinTransformer(**{**TINY, **kwargs}).eval()


def _load_converter():
    path = REPO / "tools/convert-pretrained-swin-model-to-d2.py"
    spec = importlib.util.spec_from_file_location("convert_swin", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize(
    "hw, sizes",
    [
        # 64x96: stage maps 16x24 .. 2x3, none a multiple of the 7x7 window (all padded)
        ((64, 96), [(16, 24), (8, 12), (4, 6), (2, 3)]),
        # 56x84: 14x21 is a multiple of the window; later stages are not and odd ones get merged
        ((56, 84), [(14, 21), (7, 11), (4, 6), (2, 3)]),
        # not even a multiple of the patch size: sizes round up
        ((70, 50), [(18, 13), (9, 7), (5, 4), (3, 2)]),
    ],
)
def test_output_shapes_strides_channels(hw, sizes):
    model = _tiny_swin()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *hw))
    assert list(out) == ["res2", "res3", "res4", "res5"]
    for (name, feat), (h, w), channels in zip(out.items(), sizes, [32, 64, 128, 256]):
        assert feat.shape == (1, channels, h, w), name
        assert torch.isfinite(feat).all()
    shapes = model.output_shape()
    assert {k: (s.channels, s.stride) for k, s in shapes.items()} == {
        "res2": (32, 4),
        "res3": (64, 8),
        "res4": (128, 16),
        "res5": (256, 32),
    }
    assert model.size_divisibility == 32


def test_out_features_subset_keeps_every_norm():
    # Mask2Former's Swin builds norm0..norm3 whatever OUT_FEATURES says; so does ours, so that
    # the state dicts are the same.
    model = _tiny_swin(out_features=["res5", "res3"])
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert list(out) == ["res3", "res5"]
    assert list(model.output_shape()) == ["res3", "res5"]
    norms = {k.split(".")[0] for k in model.state_dict() if k.startswith("norm")}
    assert norms == {"norm0", "norm1", "norm2", "norm3"}


def test_absolute_position_embedding_is_resized_to_the_input():
    model = _tiny_swin(ape=True, pretrain_img_size=64)
    assert model.absolute_pos_embed.shape == (1, 32, 16, 16)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    assert out["res2"].shape == (1, 32, 16, 24)


def test_training_with_checkpointing_and_drop_path_reaches_every_parameter():
    model = _tiny_swin(drop_path_rate=0.5, use_checkpoint=True).train()
    out = model(torch.randn(2, 3, 32, 32))
    sum(v.square().mean() for v in out.values()).backward()
    # (a dropped branch still gets a zero gradient, so only None means "not reached")
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # stochastic depth grows linearly from 0 (first block) to the rate (last block)
    rates = [blk.drop_path.p for layer in model.layers for blk in layer.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.5)
    assert rates[4] == pytest.approx(0.5 * 4 / 7)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(depths=[2, 2, 2]), "MODEL.SWIN.DEPTHS"),
        (dict(num_heads=[1, 2, 3, 8]), "MODEL.SWIN.NUM_HEADS[2]"),
        (dict(out_features=["res2", "res6"]), "MODEL.SWIN.OUT_FEATURES"),
        (dict(window_size=0), "MODEL.SWIN.WINDOW_SIZE"),
    ],
)
def test_bad_settings_name_the_config_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("]", r"\]")):
        D2SwinTransformer(**{**TINY, **kwargs})


def test_rejects_non_4d_input():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        _tiny_swin()(torch.zeros(3, 64, 64))


# ------------------------------------------------------------------------------------ windows


def test_window_partition_order_and_reverse():
    x = torch.arange(16.0).view(1, 4, 4, 1)  # x[0, r, c] = 4 r + c
    windows = window_partition(x, 2)
    assert windows.squeeze(-1).tolist() == [
        [0, 1, 4, 5],  # top-left window, tokens row-major
        [2, 3, 6, 7],
        [8, 9, 12, 13],
        [10, 11, 14, 15],
    ]
    assert torch.equal(window_reverse(windows, 2, 4, 4), x)


def test_relative_position_index_window_2():
    # tokens 0=(0,0) 1=(0,1) 2=(1,0) 3=(1,1); entry = (dy + 1) * 3 + (dx + 1), d = token_i - token_j
    assert relative_position_index(2).tolist() == [
        [4, 3, 1, 0],
        [5, 4, 2, 1],
        [7, 6, 4, 3],
        [8, 7, 5, 4],
    ]
    index = relative_position_index(7)
    assert index.shape == (49, 49)
    assert index.min() == 0 and index.max() == 13 * 13 - 1
    assert torch.all(index.diagonal() == 6 * 13 + 6)  # zero offset: the table's centre


def test_shifted_window_mask_4x4_window_2_shift_1():
    # After rolling a 4x4 map up-left by 1, shifted rows/cols 0-1 hold original 1-2, shifted 2
    # holds original 3 and shifted 3 holds original 0 (wrapped around). Windows are 2x2.
    mask = shifted_window_attention_mask(4, 4, window_size=2, shift_size=1)
    assert mask.shape == (4, 4, 4)
    # top-left window: all four tokens were neighbours
    assert mask[0].tolist() == [[0.0] * 4] * 4
    # top-right window, cols 2 (orig 3) and 3 (orig 0): only same-column tokens may attend
    assert mask[1].tolist() == [[0, M, 0, M], [M, 0, M, 0], [0, M, 0, M], [M, 0, M, 0]]
    # bottom-left window, rows 2 (orig 3) and 3 (orig 0): only same-row tokens
    assert mask[2].tolist() == [[0, 0, M, M], [0, 0, M, M], [M, M, 0, 0], [M, M, 0, 0]]
    # bottom-right window: every token came from a different corner, each attends to itself only
    assert mask[3].tolist() == [[0 if i == j else M for j in range(4)] for i in range(4)]


def _dense_block_reference(blk, x):
    """A Swin block written as full attention over all H*W tokens: a token attends to another iff
    both fall in the same (shifted) window and the pair does not straddle the wrap-around seam,
    i.e. their offset after the cyclic shift equals their offset in the image."""
    _, h, w, c = x.shape
    ws, s, attn = blk.window_size, blk.shift_size, blk.attn
    ys, xs = (t.flatten() for t in torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"))
    sy, sx = (ys - s) % h, (xs - s) % w
    dy, dx = ys[:, None] - ys[None, :], xs[:, None] - xs[None, :]
    allowed = (
        (sy[:, None] // ws == sy[None, :] // ws)
        & (sx[:, None] // ws == sx[None, :] // ws)
        & (sy[:, None] - sy[None, :] == dy)
        & (sx[:, None] - sx[None, :] == dx)
    )
    table_index = ((dy + ws - 1) * (2 * ws - 1) + dx + ws - 1).clamp(0, (2 * ws - 1) ** 2 - 1)
    bias = attn.relative_position_bias_table[table_index].permute(2, 0, 1)  # (nh, L, L)
    n, nh = h * w, attn.num_heads
    q, k, v = attn.qkv(blk.norm1(x).reshape(n, c)).view(n, 3, nh, c // nh).permute(1, 2, 0, 3)
    logits = (q @ k.transpose(1, 2)) * attn.scale + bias
    weights = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    y = x + attn.proj((weights @ v).transpose(0, 1).reshape(n, c)).view(1, h, w, c)
    return y + blk.mlp(blk.norm2(y))


@pytest.mark.parametrize("block", [0, 1], ids=["regular", "shifted"])
def test_block_equals_dense_attention_with_window_rules(block):
    torch.manual_seed(0)
    model = D2SwinTransformer(
        embed_dim=16, depths=[2, 2, 2, 2], num_heads=[2, 2, 4, 8], window_size=4
    )
    layer = model.layers[0].eval()
    blk = layer.blocks[block]
    assert blk.shift_size == (0 if block == 0 else 2)
    with torch.no_grad():
        blk.attn.relative_position_bias_table.normal_()  # make the bias matter
        x = torch.randn(1, 8, 8, 16)
        mask = shifted_window_attention_mask(8, 8, 4, 2)
        torch.testing.assert_close(
            blk(x, mask), _dense_block_reference(blk, x), atol=1e-5, rtol=1e-5
        )


def test_patch_merging_concatenation_order():
    # Pretrained `reduction` weights expect each 2x2 neighbourhood concatenated as
    # (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1).
    merge = PatchMerging(dim=1)
    merge.norm = torch.nn.Identity()
    with torch.no_grad():
        merge.reduction.weight.copy_(torch.tensor([[1.0, 10.0, 100.0, 1000.0], [0, 0, 0, 0]]))
        x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 2, 1)  # x[0, row, col, 0]
        assert merge(x).flatten().tolist() == [1 + 3 * 10 + 2 * 100 + 4 * 1000, 0.0]
        # an odd-sized map is zero-padded at the bottom/right before merging
        assert merge(torch.ones(1, 3, 3, 1)).shape == (1, 2, 2, 2)
        assert merge(torch.ones(1, 3, 3, 1))[0, 1, 1, 0].item() == 1.0


# ------------------------------------------------------------------------------------ layout


def test_parameter_names_follow_the_official_layout():
    sd = _tiny_swin().state_dict()
    block = {
        "norm1.weight": (32,),
        "norm1.bias": (32,),
        "attn.relative_position_bias_table": (13 * 13, 1),
        "attn.relative_position_index": (49, 49),
        "attn.qkv.weight": (96, 32),
        "attn.qkv.bias": (96,),
        "attn.proj.weight": (32, 32),
        "attn.proj.bias": (32,),
        "norm2.weight": (32,),
        "norm2.bias": (32,),
        "mlp.fc1.weight": (128, 32),
        "mlp.fc1.bias": (128,),
        "mlp.fc2.weight": (32, 128),
        "mlp.fc2.bias": (32,),
    }
    for j in (0, 1):
        for name, shape in block.items():
            assert sd[f"layers.0.blocks.{j}.{name}"].shape == shape, name
    assert sd["patch_embed.proj.weight"].shape == (32, 3, 4, 4)
    assert sd["patch_embed.norm.weight"].shape == (32,)
    for i, c in enumerate([32, 64, 128]):
        assert sd[f"layers.{i}.downsample.reduction.weight"].shape == (2 * c, 4 * c)
        assert sd[f"layers.{i}.downsample.norm.weight"].shape == (4 * c,)
    assert "layers.3.downsample.reduction.weight" not in sd
    for i, c in enumerate([32, 64, 128, 256]):
        assert sd[f"norm{i}.weight"].shape == (c,)
    assert sd["layers.3.blocks.1.attn.relative_position_bias_table"].shape == (169, 8)
    # 4 patch-embed + 2 blocks x 4 stages x 14 + 3 merges x 3 + 4 output norms x 2
    assert len(sd) == 4 + 8 * 14 + 9 + 8


# ------------------------------------------------------------------------------------ converter


def _fake_official_checkpoint(path):
    """What the official release holds: the classification model's state dict under "model"."""
    sd = {k: v.clone() for k, v in _tiny_swin().state_dict().items() if not k.startswith("norm")}
    extra = {
        "norm.weight": torch.ones(256),
        "norm.bias": torch.zeros(256),
        "head.weight": torch.randn(10, 256),
        "head.bias": torch.randn(10),
        # precomputed for 224 px inputs: 56x56 map, 64 windows of 49 tokens
        "layers.0.blocks.1.attn_mask": torch.zeros(64, 49, 49),
        "layers.1.blocks.1.attn_mask": torch.zeros(16, 49, 49),
    }
    torch.save({"model": {**sd, **extra}}, path)
    return sd, sorted(extra)


def test_converter_keeps_names_and_drops_classifier(tmp_path):
    sd, extra = _fake_official_checkpoint(tmp_path / "swin.pth")
    kept, dropped = _load_converter().convert(tmp_path / "swin.pth", tmp_path / "swin.pkl")
    assert sorted(dropped) == extra
    with open(tmp_path / "swin.pkl", "rb") as f:
        data = pickle.load(f)
    assert data["__author__"] == "third_party" and data["matching_heuristics"] is True
    assert sorted(data["model"]) == sorted(sd)
    for k, v in sd.items():
        assert isinstance(data["model"][k], np.ndarray)
        np.testing.assert_array_equal(data["model"][k], v.numpy())


def test_converted_weights_load_into_the_model(tmp_path):
    sd, _ = _fake_official_checkpoint(tmp_path / "swin.pth")
    _load_converter().convert(tmp_path / "swin.pth", tmp_path / "swin.pkl")
    cfg = _cfg(ADE_SWIN_T, *TINY_OPTS, "MODEL.DEVICE", "meta")
    with torch.device("meta"):
        # the head is not loaded, so skip its allocation and init: build on the meta device
        model = build_model(cfg)
    model.to_empty(device="cpu")
    checkpointer = DetectionCheckpointer(model)
    incompatible = checkpointer._load_model(checkpointer._load_file(str(tmp_path / "swin.pkl")))
    # Not in an ImageNet checkpoint: the per-stage output norms, the segmentation head and the
    # criterion's class weights.
    missing_backbone = sorted(k for k in incompatible.missing_keys if k.startswith("backbone."))
    assert missing_backbone == [
        f"backbone.norm{i}.{p}" for i in range(4) for p in ("bias", "weight")
    ]
    others = {k.split(".")[0] for k in incompatible.missing_keys} - {"backbone"}
    assert others == {"sem_seg_head", "criterion"}
    assert not incompatible.unexpected_keys
    assert not incompatible.incorrect_shapes
    loaded = model.backbone.state_dict()
    for k, v in sd.items():
        assert torch.equal(loaded[k], v), k


def test_converter_errors(tmp_path):
    convert = _load_converter().convert
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        convert(tmp_path / "missing.pth", tmp_path / "out.pkl")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        convert(tmp_path / "garbage.pth", tmp_path / "out.pkl")
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="'model'.*state_dict"):
        convert(tmp_path / "other.pth", tmp_path / "out.pkl")
    torch.save({"model": {"conv1.weight": torch.zeros(1)}}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="patch_embed.proj.weight"):
        convert(tmp_path / "resnet.pth", tmp_path / "out.pkl")
    assert not (tmp_path / "out.pkl").exists()


# ------------------------------------------------------------------------------------ configs

# Mask2Former's published model sizes (millions of parameters) for the architectures we mirror.
PUBLISHED_MPARAMS = {
    "ade20k/panoptic-segmentation/maskformer2_R50_bs16_160k.yaml": 44,
    "ade20k/panoptic-segmentation/swin/maskformer2_swin_tiny_bs16_160k.yaml": 47,
    "ade20k/panoptic-segmentation/swin/maskformer2_swin_small_bs16_160k.yaml": 69,
    "ade20k/panoptic-segmentation/swin/maskformer2_swin_base_384_bs16_160k.yaml": 107,
    "ade20k/panoptic-segmentation/swin/maskformer2_swin_large_384_bs16_160k.yaml": 216,
    "ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml": 44,
    "ade20k/semantic-segmentation/maskformer2_R101_bs16_160k.yaml": 63,
    "ade20k/semantic-segmentation/swin/maskformer2_swin_tiny_bs16_160k.yaml": 47,
    "coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml": 44,
}


def test_the_expected_configs_exist():
    names = {str(p.relative_to(REPO / "configs")) for p in CONFIGS}
    expected = set(PUBLISHED_MPARAMS) | {
        "ade20k/semantic-segmentation/Base-ADE20K-SemanticSegmentation.yaml",
        "coco/panoptic-segmentation/Base-COCO-PanopticSegmentation.yaml",
        "voc/semantic-segmentation/Base-VOC-SemanticSegmentation.yaml",
        "voc/semantic-segmentation/maskformer2_R101_bs16_20k.yaml",
    }
    assert expected <= names, sorted(expected - names)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_loads_and_builds(path):
    cfg = _cfg(path)
    assert "!!python" not in path.read_text()
    if path.name.startswith("Base-"):
        return  # a base holds data and solver settings only; its children build models
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        # building on the meta device checks the wiring and the shapes without allocating
        model = build_model(cfg)
    # one row per class, plus no-object (mask classification; the per-pixel head without a
    # background class)
    rows = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES + classifier_extra_rows(cfg)
    assert len(class_embed(model).bias) == rows
    rel = str(path.relative_to(REPO / "configs"))
    if rel in PUBLISHED_MPARAMS:
        mparams = sum(p.numel() for p in model.parameters()) / 1e6
        assert mparams == pytest.approx(PUBLISHED_MPARAMS[rel], abs=0.6)


def test_dataset_and_class_settings():
    ade = _cfg(REPO / "configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml")
    assert ade.DATASETS.TRAIN == ("ade20k_semantic_train",)
    assert ade.INPUT.CROP.SIZE == [512, 512] and ade.SOLVER.MAX_ITER == 160000
    mf_test = ade.MODEL.MASK_FORMER.TEST
    assert (mf_test.SEMANTIC_ON, mf_test.INSTANCE_ON, mf_test.PANOPTIC_ON) == (True, False, False)
    coco = _cfg(REPO / "configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml")
    assert coco.DATASETS.TRAIN == ("comformer_coco_panoptic_train",)
    assert coco.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 133 and coco.SOLVER.MAX_ITER == 368750
    voc = _cfg(REPO / "configs/voc/semantic-segmentation/maskformer2_R101_bs16_20k.yaml")
    assert voc.DATASETS.TEST == ("voc_sem_seg_val",)
    assert voc.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 21 and voc.MODEL.RESNETS.DEPTH == 101
    large = _cfg(ADE_SWIN_T.parent / "maskformer2_swin_large_384_bs16_160k.yaml")
    assert large.MODEL.SWIN.WINDOW_SIZE == 12 and large.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES == 200


def test_ade_swin_tiny_model_runs_on_cpu():
    torch.manual_seed(0)
    cfg = _cfg(ADE_SWIN_T, "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "")
    model = build_model(cfg).eval()
    assert isinstance(model.backbone, D2SwinTransformer)
    image = torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        (out,) = model([{"image": image, "height": 64, "width": 96}])
    assert out["sem_seg"].shape == (150, 64, 96)
    panoptic, segments = out["panoptic_seg"]
    assert panoptic.shape == (64, 96)
    assert isinstance(segments, list)
