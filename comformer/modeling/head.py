"""The segmentation head: a pixel decoder followed by the masked-attention transformer decoder.

Registered in detectron2's SEM_SEG_HEADS_REGISTRY as ``MaskFormerHead`` so that module names
(``sem_seg_head.pixel_decoder``, ``sem_seg_head.predictor``) match Mask2Former checkpoints.
"""

from typing import Dict

from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from .pixel_decoder import build_pixel_decoder
from .transformer_decoder import build_transformer_decoder

__all__ = ["MaskFormerHead"]


@SEM_SEG_HEADS_REGISTRY.register()
class MaskFormerHead(nn.Module):
    """Pixel decoder + transformer decoder; returns the transformer decoder's prediction dict."""

    # The state-dict version of Mask2Former's head, saved in every checkpoint's metadata. Without
    # it (or below 2) Mask2Former takes a checkpoint for MaskFormer's old layout and moves every
    # ``sem_seg_head.*`` key but the predictor's under ``sem_seg_head.pixel_decoder.``, so that a
    # comformer checkpoint would not load there. comformer itself renames nothing: it loads
    # checkpoints of this layout with or without the version.
    _version = 2

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        pixel_decoder: nn.Module,
        transformer_predictor: nn.Module,
        transformer_in_feature: str,
    ):
        """
        Args:
            input_shape: backbone output shapes, by feature name.
            num_classes: number of classes, no-object excluded.
            pixel_decoder: module with ``forward_features(features)`` returning
                ``(mask_features, transformer_encoder_features, multi_scale_features)``.
            transformer_predictor: module called as ``predictor(multi_scale_features, mask_features)``.
            transformer_in_feature: "multi_scale_pixel_decoder" (Mask2Former's only supported value).
        """
        super().__init__()
        if transformer_in_feature != "multi_scale_pixel_decoder":
            raise ValueError(
                f"MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE={transformer_in_feature!r} is not supported; "
                "valid: 'multi_scale_pixel_decoder'"
            )
        self.in_features = sorted(input_shape, key=lambda k: input_shape[k].stride)
        self.num_classes = num_classes
        self.pixel_decoder = pixel_decoder
        self.predictor = transformer_predictor

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        in_features = cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES
        input_shape = {k: v for k, v in input_shape.items() if k in in_features}
        return {
            "input_shape": input_shape,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "pixel_decoder": build_pixel_decoder(cfg, input_shape),
            "transformer_in_feature": cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE,
            "transformer_predictor": build_transformer_decoder(
                cfg, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM, mask_classification=True
            ),
        }

    def forward(self, features, mask=None):
        mask_features, _, multi_scale_features = self.pixel_decoder.forward_features(features)
        outputs = self.predictor(multi_scale_features, mask_features, mask)
        # Continual methods distil the per-pixel embeddings (PLOP's POD); losses ignore the key.
        outputs["mask_features"] = mask_features
        return outputs
