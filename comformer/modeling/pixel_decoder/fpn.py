"""A plain FPN pixel decoder (MaskFormer's), cheaper than the deformable-attention one.

Shapes: B batch, C = conv_dim, (H_l, W_l) the size of backbone feature l.
"""

from typing import Callable, Dict, List, Optional, Tuple, Union

import fvcore.nn.weight_init as weight_init
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm

from .build import PIXEL_DECODER_REGISTRY

__all__ = ["BasePixelDecoder"]

# The transformer decoder attends to this many levels (strides 32, 16, 8 for a ResNet).
NUM_MULTI_SCALE_LEVELS = 3

Norm = Optional[Union[str, Callable[[int], nn.Module]]]


def sorted_by_stride(input_shape: Dict[str, ShapeSpec]) -> List[Tuple[str, ShapeSpec]]:
    """Features from the finest (smallest stride) to the coarsest."""
    return sorted(input_shape.items(), key=lambda kv: kv[1].stride)


def check_norm(norm: Norm, channels: int) -> None:
    """Raise a ValueError naming MODEL.SEM_SEG_HEAD.NORM if ``get_norm`` cannot build ``norm``."""
    valid = ("", "BN", "SyncBN", "FrozenBN", "GN", "LN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N")
    if isinstance(norm, str) and norm not in valid:
        raise ValueError(f"MODEL.SEM_SEG_HEAD.NORM={norm!r} is not a norm; valid: {valid}")
    if norm == "GN" and channels % 32 != 0:
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.NORM='GN' uses 32 groups, so MODEL.SEM_SEG_HEAD.CONVS_DIM="
            f"{channels} must be a multiple of 32"
        )


def _conv_bias(norm: Norm) -> bool:
    """A conv followed by a norm needs no bias. Mask2Former's rule, which decides its state dict:
    a bias only for ``norm == ""`` (``None`` also builds neither norm nor bias)."""
    return norm == ""


def lateral_conv(in_channels: int, conv_dim: int, norm: Norm) -> Conv2d:
    """1x1 projection of a backbone feature (FPN's lateral connection), normalised, no activation."""
    conv = Conv2d(
        in_channels, conv_dim, kernel_size=1, bias=_conv_bias(norm), norm=get_norm(norm, conv_dim)
    )
    weight_init.c2_xavier_fill(conv)
    return conv


def output_conv(in_channels: int, conv_dim: int, norm: Norm) -> Conv2d:
    """3x3 conv + norm + ReLU that smooths a merged FPN level."""
    conv = Conv2d(
        in_channels,
        conv_dim,
        kernel_size=3,
        padding=1,
        bias=_conv_bias(norm),
        norm=get_norm(norm, conv_dim),
        activation=F.relu,
    )
    weight_init.c2_xavier_fill(conv)
    return conv


@PIXEL_DECODER_REGISTRY.register()
class BasePixelDecoder(nn.Module):
    """
    Top-down FPN: the coarsest feature goes through a 3x3 conv; each finer feature adds its 1x1
    lateral projection to the nearest-upsampled coarser level and is smoothed by a 3x3 conv. The
    finest level gives the mask features, the 3 coarsest are the multi-scale features.

    Module names are MaskFormer's: for the i-th finest feature (1-based) ``adapter_i`` (lateral,
    absent for the coarsest) and ``layer_i`` (output conv), plus ``mask_features``.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        conv_dim: int,
        mask_dim: int,
        norm: Norm = None,
    ):
        """
        Args:
            input_shape: shapes of the backbone features to use, by name; at least 3.
            conv_dim: channels C of the FPN levels.
            mask_dim: channels of the mask features.
            norm: normalisation of the convs, as for detectron2's ``get_norm``.
        """
        super().__init__()
        features = sorted_by_stride(input_shape)
        if len(features) < NUM_MULTI_SCALE_LEVELS:
            raise ValueError(
                f"BasePixelDecoder needs at least {NUM_MULTI_SCALE_LEVELS} input features "
                f"(MODEL.SEM_SEG_HEAD.IN_FEATURES); got {[k for k, _ in features]}"
            )
        check_norm(norm, conv_dim)
        self.in_features = [k for k, _ in features]
        self.mask_dim = mask_dim

        # Built finest-first so the names match MaskFormer's; kept coarsest-first for forward.
        lateral_convs, output_convs = [], []
        for idx, (_, shape) in enumerate(features):
            if idx == len(features) - 1:
                lateral = None
                output = output_conv(shape.channels, conv_dim, norm)
            else:
                lateral = lateral_conv(shape.channels, conv_dim, norm)
                output = output_conv(conv_dim, conv_dim, norm)
                self.add_module(f"adapter_{idx + 1}", lateral)
            self.add_module(f"layer_{idx + 1}", output)
            lateral_convs.append(lateral)
            output_convs.append(output)
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]

        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=3, padding=1)
        weight_init.c2_xavier_fill(self.mask_features)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
        }

    def forward_features(self, features: Dict[str, Tensor]) -> Tuple[Tensor, None, List[Tensor]]:
        """
        Args:
            features: backbone features by name, (B, C_l, H_l, W_l); must contain ``in_features``.

        Returns:
            mask_features: (B, mask_dim, H_0, W_0) at the finest input's resolution.
            None: there is no transformer encoder.
            multi_scale_features: 3 maps (B, C, H_l, W_l), coarsest first.
        """
        multi_scale_features = []
        y = None
        for name, lateral, output in zip(
            self.in_features[::-1], self.lateral_convs, self.output_convs
        ):
            x = features[name]
            if lateral is None:
                y = output(x)
            else:
                x = lateral(x)
                y = output(x + F.interpolate(y, size=x.shape[-2:], mode="nearest"))
            if len(multi_scale_features) < NUM_MULTI_SCALE_LEVELS:
                multi_scale_features.append(y)
        return self.mask_features(y), None, multi_scale_features

    def forward(self, features: Dict[str, Tensor]):
        """Same as :meth:`forward_features`."""
        return self.forward_features(features)
