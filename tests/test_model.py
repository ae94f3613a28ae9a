"""The assembled model: Mask2Former checkpoint layout, backbone weights, forward/backward, outputs."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.projects.deeplab import add_deeplab_config
from detectron2.structures import BitMasks, Instances

from comformer import add_comformer_config

REPO = Path(__file__).resolve().parents[1]
REFERENCE_TSV = REPO / "tests/data/mask2former_R50_ade20k_panoptic_state_dict.tsv"
SYNTHETIC_CFG = REPO / "configs/synthetic/panoptic-segmentation/maskformer2_R18_cpu.yaml"


def _cfg(config_file, *opts):
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_comformer_config(cfg)
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def _read_reference():
    entries = {}
    for line in REFERENCE_TSV.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        name, shape = line.split("\t")
        entries[name] = tuple(int(s) for s in shape.split("x")) if shape else ()
    return entries


@pytest.mark.skipif(not REFERENCE_TSV.exists(), reason=f"{REFERENCE_TSV} not present")
def test_state_dict_equals_mask2former_r50_ade20k_panoptic():
    cfg = _cfg(REPO / "configs/ade20k/panoptic-segmentation/maskformer2_R50_bs16_160k.yaml")
    model = build_model(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    reference = _read_reference()
    assert len(reference) == 558
    missing = sorted(set(reference) - set(ours))
    extra = sorted(set(ours) - set(reference))
    assert not missing, f"missing entries: {missing[:10]}"
    assert not extra, f"entries Mask2Former does not have: {extra[:10]}"
    wrong = {k: (ours[k], reference[k]) for k in reference if ours[k] != reference[k]}
    assert not wrong, f"shape mismatches (ours, reference): {dict(list(wrong.items())[:10])}"


def _tiny_model(*opts):
    torch.manual_seed(0)
    cfg = _cfg(SYNTHETIC_CFG, *opts)
    return build_model(cfg), cfg


def test_detectron2_pkl_backbone_weights_load(tmp_path):
    model, _ = _tiny_model()
    backbone_state = model.backbone.state_dict()
    rng = np.random.default_rng(0)
    # detectron2's ImageNet pickles: {"model": {name: ndarray}} with backbone-relative names
    fake = {
        "model": {
            k: rng.standard_normal(v.shape).astype(np.float32) for k, v in backbone_state.items()
        },
        "__author__": "torchvision",
        "matching_heuristics": True,
    }
    path = tmp_path / "R-18.pkl"
    with open(path, "wb") as f:
        pickle.dump(fake, f)
    DetectionCheckpointer(model).load(str(path))
    for name, value in model.backbone.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        np.testing.assert_array_equal(value.numpy(), fake["model"][name], err_msg=name)


def _inputs(num_segments_per_image, size=64):
    batch = []
    for i, n in enumerate(num_segments_per_image):
        inst = Instances((size, size))
        inst.gt_classes = torch.arange(n, dtype=torch.int64) % 20
        masks = torch.zeros((n, size, size), dtype=torch.bool)
        for j in range(n):
            masks[j, j * 8 : j * 8 + 16, 4 + i : 40] = True
        inst.gt_masks = BitMasks(masks)
        batch.append(
            {"image": torch.randint(0, 255, (3, size, size), dtype=torch.uint8), "instances": inst}
        )
    return batch


@pytest.mark.parametrize("segments", [[2, 3], [0, 2], [0, 0]], ids=["full", "half-empty", "empty"])
def test_forward_backward_with_empty_and_half_empty_ground_truth(segments):
    model, cfg = _tiny_model()
    model.train()
    losses = model(_inputs(segments))
    # one class/mask/dice loss per decoder prediction (initial queries + each layer)
    assert len(losses) == 3 * cfg.MODEL.MASK_FORMER.DEC_LAYERS
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_inference_outputs_follow_detectron2_contract(activation):
    model, cfg = _tiny_model("MODEL.MASK_FORMER.MASK_ACTIVATION", activation)
    model.eval()
    inputs = [
        {
            "image": torch.randint(0, 255, (3, 60, 70), dtype=torch.uint8),
            "height": 120,
            "width": 140,
        },
        {"image": torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)},
    ]
    with torch.no_grad():
        outputs = model(inputs)
    assert len(outputs) == 2
    assert outputs[0]["sem_seg"].shape == (20, 120, 140)
    assert outputs[1]["sem_seg"].shape == (20, 64, 64)
    pan, info = outputs[0]["panoptic_seg"]
    assert pan.shape == (120, 140) and pan.dtype == torch.int32
    assert set(torch.unique(pan).tolist()) <= {0} | {s["id"] for s in info}


@pytest.mark.parametrize("norm", ["BN", "FrozenBN"])
def test_channels_last_pool_stem_equals_detectron2_stem(norm):
    """The stem pools in channels-last on CPU: the same output and the same gradients, bit for
    bit, as detectron2's BasicStem with the same weights (ties after the ReLU are zeros, whose
    gradient the ReLU drops whichever of them the pool picks)."""
    from detectron2.modeling.backbone.resnet import BasicStem

    from comformer.modeling.backbone.stem import ChannelsLastPoolStem

    torch.manual_seed(0)
    reference = BasicStem(3, 16, norm=norm)
    fast = ChannelsLastPoolStem(3, 16, norm=norm)
    fast.load_state_dict(reference.state_dict())
    reference.train(), fast.train()
    x = torch.randn(2, 3, 37, 50)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = reference(x1), fast(x2)
    assert y2.is_contiguous() and torch.equal(y1, y2)
    g = torch.randn_like(y1)
    y1.backward(g), y2.backward(g)
    assert torch.equal(x1.grad, x2.grad)
    for (name, p1), p2 in zip(reference.named_parameters(), fast.parameters()):
        assert torch.equal(p1.grad, p2.grad), name


def test_models_use_the_channels_last_pool_stem():
    model = build_model(_cfg(SYNTHETIC_CFG))
    assert type(model.backbone.stem).__name__ == "ChannelsLastPoolStem"
