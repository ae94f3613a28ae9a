"""Transformer decoders (registered in TRANSFORMER_DECODER_REGISTRY) and their position encoding."""
from .mask2former_transformer_decoder import (
    TRANSFORMER_DECODER_REGISTRY,
    MultiScaleMaskedTransformerDecoder,
    build_transformer_decoder,
)

__all__ = [
    "TRANSFORMER_DECODER_REGISTRY",
    "MultiScaleMaskedTransformerDecoder",
    "build_transformer_decoder",
]
