"""Parity with the official Mask2Former: same weights, same config, same outputs.

The reference under tests/data/mask2former_parity/ was produced by running
facebookresearch/Mask2Former itself (make_reference.py there; its README says how). Here comformer
builds its model from the same yaml with detectron2's ``build_model``, loads the official model's
state dict strictly, runs the same batch in eval mode and must reproduce every output:
backbone features (non-detectron2 backbones), pixel decoder outputs, class and mask logits of the
final and every auxiliary prediction, and semantic, panoptic and instance inference.
"""

from pathlib import Path

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.projects.deeplab import add_deeplab_config

from comformer import add_comformer_config

DATA = Path(__file__).resolve().parent / "data" / "mask2former_parity"
CONFIGS = ("parity_r50", "parity_swin")
# float32 on CPU; the two implementations sum in different orders (deformable attention, SDPA).
ATOL = 1e-5
# Keys whose defaults differ on purpose, with the reason (see comformer/config.py).
CONFIG_KEYS_DIFFERING = {
    # Mask2Former's default names a mapper comformer does not have; "" picks comformer's mapper
    # from the dataset's evaluator_type. Data loading only: the model does not read it.
    "INPUT.DATASET_MAPPER_NAME",
}


def _cfg(name: str):
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_comformer_config(cfg)
    cfg.merge_from_file(str(DATA / f"{name}.yaml"))
    cfg.freeze()
    return cfg


def _flat(cfg, prefix=""):
    flat = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = list(value) if isinstance(value, tuple) else value
    return flat


def _register_metadata(dataset: str, thing_map: dict) -> None:
    metadata = MetadataCatalog.get(dataset)
    if not hasattr(metadata, "thing_dataset_id_to_contiguous_id"):
        metadata.set(thing_dataset_id_to_contiguous_id=dict(thing_map))
    assert metadata.thing_dataset_id_to_contiguous_id == thing_map


def _run(model, inputs):
    """Eval forward recording what the reference recorded."""
    record = {}
    handles = [
        model.backbone.register_forward_hook(
            lambda m, args, out: record.__setitem__("backbone", dict(out))
        ),
        model.sem_seg_head.register_forward_hook(
            lambda m, args, out: record.__setitem__("head", out)
        ),
    ]
    pixel_decoder = model.sem_seg_head.pixel_decoder
    forward_features = pixel_decoder.forward_features

    def recorded(features):
        mask_features, encoder_features, multi_scale = forward_features(features)
        record["pixel_decoder"] = {
            "mask_features": mask_features,
            "multi_scale_features": list(multi_scale),
        }
        return mask_features, encoder_features, multi_scale

    pixel_decoder.forward_features = recorded
    try:
        with torch.no_grad():
            record["results"] = model([dict(x) for x in inputs])
    finally:
        del pixel_decoder.forward_features
        for h in handles:
            h.remove()
    return record


def _parity(name: str) -> dict:
    reference = torch.load(DATA / f"{name}_outputs.pth", weights_only=True)
    weights = torch.load(DATA / f"{name}_weights.pth", weights_only=True)
    cfg = _cfg(name)
    _register_metadata(
        cfg.DATASETS.TRAIN[0], reference["meta"]["thing_dataset_id_to_contiguous_id"]
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    model.load_state_dict(weights, strict=True)
    model.eval()
    return {
        "name": name,
        "cfg": cfg,
        "model": model,
        "weights": weights,
        "reference": reference,
        "ours": _run(model, reference["inputs"]),
    }


@pytest.fixture(scope="module", params=CONFIGS)
def parity(request):
    return _parity(request.param)


def _max_diff(ours: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == ref.dtype, f"{what}: dtype {ours.dtype} != {ref.dtype}"
    return (ours.double() - ref.double()).abs().max().item() if ref.numel() else 0.0


def _assert_close(ours, ref, what):
    diff = _max_diff(ours, ref, what)
    assert diff <= ATOL, f"{what}: max abs difference {diff:.3g} > {ATOL}"


def test_config_means_what_mask2former_reads(parity):
    """Every key of Mask2Former's config (defaults included) exists here with the same value."""
    ours = _flat(parity["cfg"])
    reference = parity["reference"]["config"]
    missing = sorted(set(reference) - set(ours))
    assert not missing, f"keys Mask2Former has and comformer lacks: {missing}"
    different = {
        k: (ours[k], v)
        for k, v in reference.items()
        if k not in CONFIG_KEYS_DIFFERING and ours[k] != v
    }
    assert not different, f"(comformer, Mask2Former) values differ: {different}"


def test_state_dict_equals_mask2former(parity):
    ours = parity["model"].state_dict()
    reference = parity["weights"]
    assert list(ours) == list(reference), "state-dict names or their order differ"
    wrong = {
        k: (tuple(v.shape), tuple(reference[k].shape))
        for k, v in ours.items()
        if v.shape != reference[k].shape
    }
    assert not wrong, f"shapes (ours, Mask2Former): {wrong}"


def test_state_dict_versions_equal_mask2former(parity):
    """
    detectron2/Mask2Former modules rename old keys on load when the checkpoint's version of the
    module is missing or older (Mask2Former's MaskFormerHead moves every ``sem_seg_head.*`` key but
    the predictor's under ``pixel_decoder.``): a comformer checkpoint loads strictly into Mask2Former
    only if it carries the versions Mask2Former's modules declare.
    """
    ours = parity["model"].state_dict()._metadata
    reference = parity["weights"]._metadata
    # Version 1 is every nn.Module's default, which no module renames keys for.
    versioned = {k: v["version"] for k, v in reference.items() if v.get("version", 1) > 1}
    assert versioned["sem_seg_head"] == 2 and versioned["sem_seg_head.predictor"] == 2
    wrong = {
        k: (ours.get(k, {}).get("version"), v)
        for k, v in versioned.items()
        if ours.get(k, {}).get("version") != v
    }
    assert not wrong, f"module versions (ours, Mask2Former): {wrong}"


def test_checkpoint_round_trip_keeps_versions(parity, tmp_path):
    path = tmp_path / "model.pth"
    torch.save(parity["model"].state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    assert loaded._metadata["sem_seg_head"]["version"] == 2
    assert loaded._metadata["sem_seg_head.predictor"]["version"] == 2


def test_backbone_features(parity):
    reference = parity["reference"].get("backbone")
    if reference is None:
        pytest.skip("detectron2's ResNet: the same code in both projects, features not stored")
    ours = parity["ours"]["backbone"]
    assert sorted(ours) == sorted(reference)
    for name, value in reference.items():
        _assert_close(ours[name], value, f"backbone {name}")


def test_pixel_decoder_outputs(parity):
    reference = parity["reference"]["pixel_decoder"]
    ours = parity["ours"]["pixel_decoder"]
    _assert_close(ours["mask_features"], reference["mask_features"], "mask_features")
    assert len(ours["multi_scale_features"]) == len(reference["multi_scale_features"])
    for i, (a, b) in enumerate(
        zip(ours["multi_scale_features"], reference["multi_scale_features"])
    ):
        _assert_close(a, b, f"multi_scale_features[{i}]")


def test_head_outputs(parity):
    reference = parity["reference"]["head"]
    ours = parity["ours"]["head"]
    _assert_close(ours["pred_logits"], reference["pred_logits"], "pred_logits")
    _assert_close(ours["pred_masks"], reference["pred_masks"], "pred_masks")
    assert len(ours["aux_outputs"]) == len(reference["aux_outputs"])
    for i, (a, b) in enumerate(zip(ours["aux_outputs"], reference["aux_outputs"])):
        assert sorted(a) == sorted(b)
        for key in b:
            _assert_close(a[key], b[key], f"aux_outputs[{i}][{key!r}]")


def test_semantic_inference(parity):
    for i, (ours, ref) in enumerate(zip(parity["ours"]["results"], parity["reference"]["results"])):
        _assert_close(ours["sem_seg"], ref["sem_seg"], f"image {i} sem_seg")


def test_semantic_inference_alone(parity):
    """With panoptic and instance inference off, semantic inference runs before the resize."""
    reference = parity["reference"].get("semantic_only")
    if reference is None:
        pytest.skip(f"{parity['name']}: no semantic-only reference (same code path as parity_r50)")
    cfg = parity["cfg"].clone()
    cfg.defrost()
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = False
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = False
    model = build_model(cfg)
    model.load_state_dict(parity["weights"], strict=True)
    model.eval()
    assert not model.sem_seg_postprocess_before_inference
    with torch.no_grad():
        results = model([dict(x) for x in parity["reference"]["inputs"]])
    for i, (ours, ref) in enumerate(zip(results, reference)):
        assert sorted(ours) == ["sem_seg"]
        _assert_close(ours["sem_seg"], ref, f"image {i} sem_seg (semantic only)")


def test_panoptic_inference(parity):
    reference = parity["reference"]["results"]
    # The reference is meant to exercise panoptic inference: segments are kept and rejected.
    assert sum(len(r["segments_info"]) for r in reference) > 0
    for i, (ours, ref) in enumerate(zip(parity["ours"]["results"], reference)):
        panoptic_seg, segments_info = ours["panoptic_seg"]
        assert panoptic_seg.dtype == ref["panoptic_seg"].dtype
        assert torch.equal(panoptic_seg, ref["panoptic_seg"]), f"image {i}: panoptic_seg differs"
        assert segments_info == ref["segments_info"], f"image {i}: segments_info differs"


def test_instance_inference(parity):
    for i, (ours, ref) in enumerate(zip(parity["ours"]["results"], parity["reference"]["results"])):
        instances, ref_instances = ours["instances"], ref["instances"]
        assert torch.equal(instances.pred_classes, ref_instances["pred_classes"]), f"image {i}"
        assert torch.equal(instances.pred_masks.bool(), ref_instances["pred_masks"]), f"image {i}"
        _assert_close(instances.scores, ref_instances["scores"], f"image {i} instance scores")


def max_abs_differences(parity) -> dict:
    """Max abs difference of every float output (for reports: ``python -m`` this file)."""
    ref, ours = parity["reference"], parity["ours"]

    def _max_diff(a, b, what):  # a shape mismatch reads as inf instead of failing the report
        return globals()["_max_diff"](a, b, what) if a.shape == b.shape else float("inf")

    diffs = {}
    for name, value in ref.get("backbone", {}).items():
        diffs[f"backbone.{name}"] = _max_diff(ours["backbone"][name], value, name)
    diffs["mask_features"] = _max_diff(
        ours["pixel_decoder"]["mask_features"], ref["pixel_decoder"]["mask_features"], ""
    )
    for i, v in enumerate(ref["pixel_decoder"]["multi_scale_features"]):
        diffs[f"multi_scale_features[{i}]"] = _max_diff(
            ours["pixel_decoder"]["multi_scale_features"][i], v, ""
        )
    for key in ("pred_logits", "pred_masks"):
        diffs[key] = _max_diff(ours["head"][key], ref["head"][key], key)
    for i, aux in enumerate(ref["head"]["aux_outputs"]):
        for key, v in aux.items():
            diffs[f"aux_outputs[{i}].{key}"] = _max_diff(ours["head"]["aux_outputs"][i][key], v, "")
    for i, r in enumerate(ref["results"]):
        diffs[f"sem_seg[{i}]"] = _max_diff(ours["results"][i]["sem_seg"], r["sem_seg"], "")
        diffs[f"instance_scores[{i}]"] = _max_diff(
            ours["results"][i]["instances"].scores, r["instances"]["scores"], ""
        )
    return diffs


if __name__ == "__main__":
    for config in CONFIGS:
        data = _parity(config)
        print(config)
        for key, value in max_abs_differences(data).items():
            print(f"  {key:32s} {value:.3g}")
