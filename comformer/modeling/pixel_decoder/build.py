"""The pixel-decoder registry and its builder."""

from typing import Dict

from torch import nn

from detectron2.layers import ShapeSpec
from detectron2.utils.registry import Registry

__all__ = ["PIXEL_DECODER_REGISTRY", "build_pixel_decoder"]

PIXEL_DECODER_REGISTRY = Registry("PIXEL_DECODER")
PIXEL_DECODER_REGISTRY.__doc__ = """
Registry for pixel decoders, which turn backbone features into per-pixel mask features and the
multi-scale features the transformer decoder attends to.

A member is called as ``decoder(cfg, input_shape)`` (``@configurable``), ``input_shape`` mapping
backbone feature names to :class:`ShapeSpec`. Its ``forward_features(features)`` takes the dict of
backbone features and returns ``(mask_features, transformer_encoder_features, multi_scale_features)``:
(B, MASK_DIM, H/COMMON_STRIDE, W/COMMON_STRIDE), the encoder's lowest-resolution output or None,
and a list of 3 maps (B, CONVS_DIM, H_l, W_l) from the lowest resolution to the highest.
"""


def build_pixel_decoder(cfg, input_shape: Dict[str, ShapeSpec]) -> nn.Module:
    """
    Build the pixel decoder named by ``cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME``.

    Args:
        cfg: a config with comformer's keys.
        input_shape: backbone output shapes, by feature name.
    """
    name = cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME
    if name not in PIXEL_DECODER_REGISTRY:
        valid = ", ".join(sorted(k for k, _ in PIXEL_DECODER_REGISTRY))
        raise KeyError(
            f"MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME={name!r} is not registered; valid: {valid}"
        )
    model = PIXEL_DECODER_REGISTRY.get(name)(cfg, input_shape)
    if not callable(getattr(model, "forward_features", None)):
        raise TypeError(
            f"pixel decoder {name!r} has no forward_features(features) method, which "
            "MaskFormerHead calls"
        )
    return model
