"""Pixel decoders (registered in PIXEL_DECODER_REGISTRY) and multi-scale deformable attention."""

from .build import PIXEL_DECODER_REGISTRY, build_pixel_decoder
from .fpn import BasePixelDecoder
from .ms_deform_attn import MSDeformAttn, ms_deform_attn
from .msdeformattn import MSDeformAttnPixelDecoder

__all__ = [
    "PIXEL_DECODER_REGISTRY",
    "build_pixel_decoder",
    "BasePixelDecoder",
    "MSDeformAttnPixelDecoder",
    "MSDeformAttn",
    "ms_deform_attn",
]
