"""Generate the Mask2Former parity reference: run the OFFICIAL Mask2Former code on a tiny config.

Usage (from anywhere; needs torch, detectron2, scipy, but NOT comformer):

    OMP_NUM_THREADS=1 python tests/data/mask2former_parity/make_reference.py \
        --mask2former /path/to/facebookresearch/Mask2Former [--out tests/data/mask2former_parity]

For each config (parity_r50.yaml, parity_swin.yaml) it writes ``<name>_weights.pth`` (the model's
state dict, with its ``_metadata``: module versions) and ``<name>_outputs.pth`` (inputs and every
output of the official model in eval mode). README.md says how the committed files were made.

This script never imports comformer, and comformer never imports Mask2Former: both register
``MaskFormer``/``MaskFormerHead``/... in detectron2's registries, so they cannot share a process.

What the official code imports but is not installed here is stubbed, in this process only (the
checkout is not modified):
- ``MultiScaleDeformableAttention``, the compiled CUDA op: the module is stubbed so the import
  succeeds, and ``MSDeformAttnFunction`` is replaced by a call to the official pure-PyTorch
  ``ms_deform_attn_core_pytorch`` (what the official code falls back to on CPU anyway, through a
  bare ``except:``; calling it directly makes the path explicit).
- ``timm`` (used by the official Swin only): ``DropPath`` (identity in eval mode; the real one is
  only active in training), ``to_2tuple`` and ``trunc_normal_`` (torch's, same signature).
And the package's ``mask2former/__init__.py`` is bypassed (it imports datasets, mappers and evaluators);
``mask2former.config``, ``mask2former.modeling`` and ``mask2former.maskformer_model`` are imported
as they are.
"""

import argparse
import collections.abc
import subprocess
import sys
import types
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
CONFIGS = ("parity_r50", "parity_swin")
# Configs also run with semantic inference only (the code path does not depend on the backbone).
SEMANTIC_ONLY = ("parity_r50",)
SEED = 20240601
DATASET = "mask2former_parity"
# Dataset id -> contiguous id of the thing classes: 0 and 1 are things, 2, 3 and 4 stuff.
THING_DATASET_ID_TO_CONTIGUOUS_ID = {1: 0, 2: 1}
# Input images (H, W) and the output size each is asked for (None: its own size). The second is
# not a multiple of 32 (padded to 64 x 96 in a batch with the first) and is resized on output.
IMAGES = (((64, 64), None), ((58, 90), (72, 112)))
# After random initialisation the class logits are scaled by this and the no-object logit lowered
# by NO_OBJECT_SHIFT, so that class scores spread enough for panoptic inference to keep some
# queries and reject others.
CLASS_LOGIT_SCALE = 6.0
NO_OBJECT_SHIFT = 3.0


def _stub_missing_modules(repo: Path) -> None:
    msda = types.ModuleType("MultiScaleDeformableAttention")

    def _not_compiled(*args, **kwargs):
        raise RuntimeError("MultiScaleDeformableAttention is a stub (CUDA op not compiled)")

    msda.ms_deform_attn_forward = msda.ms_deform_attn_backward = _not_compiled
    sys.modules["MultiScaleDeformableAttention"] = msda

    class DropPath(nn.Module):
        def __init__(self, drop_prob=None):
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x):
            if self.training and self.drop_prob:
                raise RuntimeError("stub DropPath: eval mode only")
            return x

    def to_2tuple(x):
        return tuple(x) if isinstance(x, collections.abc.Iterable) else (x, x)

    timm = types.ModuleType("timm")
    timm.models = types.ModuleType("timm.models")
    timm.models.layers = types.ModuleType("timm.models.layers")
    timm.models.layers.DropPath = DropPath
    timm.models.layers.to_2tuple = to_2tuple
    timm.models.layers.trunc_normal_ = nn.init.trunc_normal_
    sys.modules.update(
        {"timm": timm, "timm.models": timm.models, "timm.models.layers": timm.models.layers}
    )

    # The package without its __init__ (datasets, mappers, evaluators).
    package = types.ModuleType("mask2former")
    package.__path__ = [str(repo / "mask2former")]
    sys.modules["mask2former"] = package


def _import_official(repo: Path):
    _stub_missing_modules(repo)
    from mask2former.config import add_maskformer2_config
    import mask2former.modeling  # noqa: F401  (registers backbone, heads, decoders)
    import mask2former.maskformer_model  # noqa: F401  (registers the MaskFormer meta-arch)
    from mask2former.modeling.pixel_decoder.ops.functions.ms_deform_attn_func import (
        ms_deform_attn_core_pytorch,
    )
    from mask2former.modeling.pixel_decoder.ops.modules import ms_deform_attn

    class PurePytorchMSDeformAttnFunction:
        @staticmethod
        def apply(value, shapes, level_start_index, locations, weights, im2col_step):
            return ms_deform_attn_core_pytorch(value, shapes, locations, weights)

    ms_deform_attn.MSDeformAttnFunction = PurePytorchMSDeformAttnFunction
    return add_maskformer2_config


def _config(add_maskformer2_config, name: str):
    from detectron2.config import get_cfg
    from detectron2.projects.deeplab import add_deeplab_config

    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    cfg.merge_from_file(str(HERE / f"{name}.yaml"))
    cfg.freeze()
    return cfg


@torch.no_grad()
def _randomise(model: nn.Module, generator: torch.Generator) -> None:
    """
    Perturb every floating-point parameter and buffer so that no initialisation constant (zero
    attention weights, unit norms, zero BN statistics...) hides a difference: noise of 10% of each
    tensor's spread, or N(0, 0.1) for constant tensors.
    """
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        spread = float(t.std()) if t.numel() > 1 else 0.0
        scale = 0.1 * spread if spread > 0 else 0.1
        t.add_(scale * torch.randn(t.shape, generator=generator))
        if name.endswith("running_var"):
            t.abs_().add_(0.5)
    class_embed = model.sem_seg_head.predictor.class_embed
    class_embed.weight.mul_(CLASS_LOGIT_SCALE)
    class_embed.bias[-1] -= NO_OBJECT_SHIFT


def _inputs(generator: torch.Generator):
    inputs = []
    for (h, w), out_size in IMAGES:
        image = torch.randint(0, 256, (3, h, w), generator=generator, dtype=torch.uint8)
        x = {"image": image}
        if out_size is not None:
            x["height"], x["width"] = out_size
        inputs.append(x)
    return inputs


def _flat_config(cfg, prefix=""):
    """The full config (defaults included) as {"A.B.C": value}."""
    flat = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            flat.update(_flat_config(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = list(value) if isinstance(value, tuple) else value
    return flat


def _capture(model, backbone: bool):
    """Record (backbone features,) pixel decoder outputs and head outputs of the next forward."""
    record = {}
    if backbone:
        model.backbone.register_forward_hook(
            lambda m, args, out: record.__setitem__("backbone", dict(out))
        )
    pixel_decoder = model.sem_seg_head.pixel_decoder
    forward_features = pixel_decoder.forward_features

    def recorded_forward_features(features):
        mask_features, encoder_features, multi_scale = forward_features(features)
        record["pixel_decoder"] = {
            "mask_features": mask_features,
            "multi_scale_features": list(multi_scale),
        }
        return mask_features, encoder_features, multi_scale

    pixel_decoder.forward_features = recorded_forward_features
    model.sem_seg_head.register_forward_hook(lambda m, args, out: record.__setitem__("head", out))
    return record


def _results(processed):
    results = []
    for r in processed:
        panoptic_seg, segments_info = r["panoptic_seg"]
        instances = r["instances"]
        results.append(
            {
                "sem_seg": r["sem_seg"],
                "panoptic_seg": panoptic_seg,
                "segments_info": [dict(s) for s in segments_info],
                "instances": {
                    "pred_masks": instances.pred_masks.bool(),
                    "scores": instances.scores,
                    "pred_classes": instances.pred_classes,
                },
            }
        )
    return results


def _semantic_only(cfg, model, inputs):
    """
    sem_seg of the same weights with panoptic and instance inference off: then semantic inference
    runs on the padded masks and its result is resized (the other order than with them on).
    """
    from detectron2.modeling import build_model

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = False
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = False
    semantic = build_model(cfg)
    semantic.load_state_dict(model.state_dict(), strict=True)
    semantic.eval()
    with torch.no_grad():
        return [r["sem_seg"] for r in semantic(inputs)]


def generate(repo: Path, out: Path) -> None:
    torch.set_num_threads(1)
    add_maskformer2_config = _import_official(repo)
    from detectron2.data import MetadataCatalog
    from detectron2.modeling import build_model

    MetadataCatalog.get(DATASET).set(
        thing_dataset_id_to_contiguous_id=THING_DATASET_ID_TO_CONTIGUOUS_ID
    )
    commit = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    for name in CONFIGS:
        cfg = _config(add_maskformer2_config, name)
        torch.manual_seed(SEED)
        model = build_model(cfg)
        generator = torch.Generator().manual_seed(SEED)
        _randomise(model, generator)
        model.eval()
        inputs = _inputs(generator)
        # detectron2's ResNet is the same code in both projects: its features are not stored.
        record = _capture(model, backbone=cfg.MODEL.BACKBONE.NAME != "build_resnet_backbone")
        with torch.no_grad():
            processed = model(inputs)
        head = record["head"]
        outputs = {
            "meta": {
                "mask2former_commit": commit or "unknown",
                "config": f"{name}.yaml",
                "seed": SEED,
                "torch": str(torch.__version__),
                "thing_dataset_id_to_contiguous_id": THING_DATASET_ID_TO_CONTIGUOUS_ID,
            },
            "config": _flat_config(cfg),
            "inputs": inputs,
            **({"backbone": record["backbone"]} if "backbone" in record else {}),
            "pixel_decoder": record["pixel_decoder"],
            "head": {
                "pred_logits": head["pred_logits"],
                "pred_masks": head["pred_masks"],
                "aux_outputs": [dict(a) for a in head["aux_outputs"]],
            },
            "results": _results(processed),
        }
        if name in SEMANTIC_ONLY:
            outputs["semantic_only"] = _semantic_only(cfg, model, inputs)
        state = model.state_dict()
        torch.save(state, out / f"{name}_weights.pth")
        torch.save(outputs, out / f"{name}_outputs.pth")
        segments = [len(r["segments_info"]) for r in outputs["results"]]
        print(
            f"{name}: {len(state)} state-dict entries, panoptic segments per image {segments}, "
            f"instances per image {[len(r['instances']['scores']) for r in outputs['results']]}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mask2former", required=True, type=Path, help="checkout of facebookresearch/Mask2Former"
    )
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: here)")
    args = parser.parse_args()
    repo = args.mask2former.resolve()
    if not (repo / "mask2former" / "maskformer_model.py").exists():
        parser.error(f"{repo} is not a Mask2Former checkout (no mask2former/maskformer_model.py)")
    sys.path.insert(0, str(repo))
    args.out.mkdir(parents=True, exist_ok=True)
    generate(repo, args.out)


if __name__ == "__main__":
    main()
