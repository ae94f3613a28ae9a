"""Mask2Former's pixel decoder: a deformable-attention encoder over the coarse levels + an FPN path.

Shapes: B batch, C = conv_dim, L encoder levels, (H_l, W_l) the size of level l,
S = sum over levels of H_l * W_l (all encoder pixels flattened into one sequence).
Module and parameter names equal Mask2Former's so that its checkpoints load unchanged
(``sem_seg_head.pixel_decoder.*``).
"""

import logging
from typing import Dict, List, Sequence, Tuple

import fvcore.nn.weight_init as weight_init
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec

from ..transformer_decoder.position_encoding import PositionEmbeddingSine
from .build import PIXEL_DECODER_REGISTRY
from .fpn import (
    NUM_MULTI_SCALE_LEVELS,
    Norm,
    check_norm,
    lateral_conv,
    output_conv,
    sorted_by_stride,
)
from .ms_deform_attn import IMPLEMENTATIONS, MSDeformAttn

logger = logging.getLogger(__name__)

# Sampling points per head and level of the encoder's deformable attention, and the width of its
# feed-forward layers, as Mask2Former fixes them. (Mask2Former's config also has
# SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS and _N_HEADS, which it never reads.)
ENCODER_N_POINTS = 4
ENCODER_DIM_FEEDFORWARD = 1024

__all__ = [
    "ENCODER_N_POINTS",
    "MSDeformAttnEncoderLayer",
    "MSDeformAttnEncoder",
    "MSDeformAttnTransformer",
    "MSDeformAttnPixelDecoder",
]


class MSDeformAttnEncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then a ReLU FFN; post-norm residuals."""

    def __init__(
        self,
        d_model: int = 256,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        n_levels: int = 3,
        n_heads: int = 8,
        n_points: int = 4,
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: Sequence[Tuple[int, int]],
    ) -> Tensor:
        """
        Args:
            src: (B, S, C) the flattened levels.
            pos: (B or 1, S, C) position + level embedding, added to the queries only.
            reference_points: (B or 1, S, L, 2) see :class:`MSDeformAttn`.
            spatial_shapes: (H_l, W_l) of each level.

        Returns:
            (B, S, C)
        """
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes)
        src = self.norm1(src + self.dropout1(attended))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class MSDeformAttnEncoder(nn.Module):
    """A stack of :class:`MSDeformAttnEncoderLayer` sharing reference points and position."""

    def __init__(self, num_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(
            [MSDeformAttnEncoderLayer(**layer_kwargs) for _ in range(num_layers)]
        )

    def forward(self, src, pos, reference_points, spatial_shapes) -> Tensor:
        """Arguments as :meth:`MSDeformAttnEncoderLayer.forward`; returns (B, S, C)."""
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes)
        return src


def reference_points(spatial_shapes: Sequence[Tuple[int, int]], device: torch.device) -> Tensor:
    """
    Every pixel's centre as a normalised (x, y) reference point.

    Without padding masks a point's normalised position is the same on every level, so one point
    serves all levels (Deformable DETR rescales by valid ratios here, which are all 1 for us).

    Returns:
        (1, S, L, 2), the level dimension expanded (no copy).
    """
    points = []
    for h, w in spatial_shapes:
        ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
        xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
        y, x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([x.reshape(-1), y.reshape(-1)], -1))
    points = torch.cat(points, 0)
    return points[None, :, None, :].expand(1, -1, len(spatial_shapes), 2)


class MSDeformAttnTransformer(nn.Module):
    """
    Flattens the (projected) levels into one sequence, adds a learned per-level embedding to the
    position encoding and runs the deformable encoder. Named ``transformer`` in the pixel decoder,
    like Mask2Former's encoder-only deformable transformer.
    """

    def __init__(
        self,
        d_model: int = 256,
        n_heads: int = 8,
        num_encoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        num_feature_levels: int = 3,
        enc_n_points: int = 4,
    ):
        super().__init__()
        self.encoder = MSDeformAttnEncoder(
            num_encoder_layers,
            d_model=d_model,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            n_levels=num_feature_levels,
            n_heads=n_heads,
            n_points=enc_n_points,
        )
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        nn.init.normal_(self.level_embed)

    def forward(
        self, srcs: List[Tensor], pos_embeds: List[Tensor]
    ) -> Tuple[Tensor, List[Tuple[int, int]]]:
        """
        Args:
            srcs: L maps (B, C, H_l, W_l).
            pos_embeds: L position encodings (B or 1, C, H_l, W_l).

        Returns:
            (B, S, C) encoded sequence, levels concatenated in input order, and the (H_l, W_l) list.
        """
        spatial_shapes = [(src.shape[2], src.shape[3]) for src in srcs]
        src_flat = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)
        pos_flat = torch.cat(
            [
                pos.flatten(2).transpose(1, 2) + self.level_embed[lvl]
                for lvl, pos in enumerate(pos_embeds)
            ],
            1,
        )
        ref = reference_points(spatial_shapes, src_flat.device)
        return self.encoder(src_flat, pos_flat, ref, spatial_shapes), spatial_shapes


@PIXEL_DECODER_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """
    Mask2Former's pixel decoder.

    The ``transformer_in_features`` (res3-res5 by default) are projected to C channels
    (``input_proj``, coarsest first), encoded jointly by deformable self-attention across levels,
    then finer backbone features down to ``common_stride`` are merged top-down FPN-style
    (``adapter_i`` lateral 1x1 conv + bilinear upsampling + ``layer_i`` 3x3 conv). The finest map
    gives the mask features through a 1x1 conv; the 3 coarsest maps are the multi-scale features.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        transformer_dropout: float,
        transformer_nheads: int,
        transformer_dim_feedforward: int = ENCODER_DIM_FEEDFORWARD,
        transformer_enc_layers: int,
        conv_dim: int,
        mask_dim: int,
        norm: Norm = None,
        transformer_in_features: List[str],
        common_stride: int,
        transformer_n_points: int = ENCODER_N_POINTS,
        deformable_attn_impl: str = "auto",
    ):
        """
        Args:
            input_shape: shapes of the backbone features to use, by name.
            transformer_dropout: dropout in the encoder layers.
            transformer_nheads: deformable attention heads (MODEL.MASK_FORMER.NHEADS, as in
                Mask2Former); must divide ``conv_dim``.
            transformer_dim_feedforward: FFN width of the encoder layers (Mask2Former: 1024;
                MODEL.SEM_SEG_HEAD.DIM_FEEDFORWARD, a comformer extension, defaults to it).
            transformer_enc_layers: number of encoder layers.
            conv_dim: channels C of the encoder and FPN levels; a multiple of 32 (GroupNorm).
            mask_dim: channels of the mask features.
            norm: normalisation of the FPN convs, as for detectron2's ``get_norm``.
            transformer_in_features: names of the features the encoder attends over.
            common_stride: stride of the mask features; the FPN path stops there.
            transformer_n_points: sampling points per head and level (Mask2Former: 4, not
                configurable; no config key sets it here either).
            deformable_attn_impl: how the deformable attention samples (see
                ``ms_deform_attn.IMPLEMENTATIONS``): the same numbers within float32 rounding.
        """
        super().__init__()
        features = sorted_by_stride(input_shape)
        names = [k for k, _ in features]
        unknown = [f for f in transformer_in_features if f not in input_shape]
        if unknown or not transformer_in_features:
            raise ValueError(
                "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES="
                f"{list(transformer_in_features)} must be a non-empty subset of the pixel decoder's "
                f"input features (MODEL.SEM_SEG_HEAD.IN_FEATURES) {names}"
            )
        if conv_dim % 32 != 0:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.CONVS_DIM={conv_dim} must be a multiple of 32: the input "
                "projections use GroupNorm(32)"
            )
        if conv_dim % transformer_nheads != 0:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.CONVS_DIM={conv_dim} must be divisible by the deformable "
                f"encoder's heads, MODEL.MASK_FORMER.NHEADS={transformer_nheads}"
            )
        check_norm(norm, conv_dim)

        # Encoder levels, finest first (by stride, whatever order the config lists them in).
        self.transformer_in_features = [k for k in names if k in transformer_in_features]
        transformer_channels = [input_shape[k].channels for k in self.transformer_in_features]
        min_encoder_stride = input_shape[self.transformer_in_features[0]].stride

        # The FPN path: every finer feature with stride >= common_stride.
        self.in_features = [
            k for k, s in features if common_stride <= s.stride < min_encoder_stride
        ]
        finest = input_shape[self.in_features[0]].stride if self.in_features else min_encoder_stride
        if finest != common_stride:
            strides = {k: s.stride for k, s in features}
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.COMMON_STRIDE={common_stride} must be the stride of an input "
                f"feature no coarser than the encoder's finest level (stride {min_encoder_stride});"
                f" input strides: {strides}"
            )
        num_levels = len(self.transformer_in_features) + len(self.in_features)
        if num_levels < NUM_MULTI_SCALE_LEVELS:
            raise ValueError(
                f"the pixel decoder produces {num_levels} levels (encoder "
                f"{self.transformer_in_features} + FPN {self.in_features}) but the transformer "
                f"decoder needs {NUM_MULTI_SCALE_LEVELS}; add features to "
                "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES or lower COMMON_STRIDE"
            )
        self.common_stride = common_stride
        self.mask_dim = mask_dim

        # Coarsest first, the order of Mask2Former's input_proj.N and level_embed rows.
        self.input_proj = nn.ModuleList()
        for channels in transformer_channels[::-1]:
            proj = nn.Sequential(
                nn.Conv2d(channels, conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim)
            )
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
            self.input_proj.append(proj)

        self.transformer = MSDeformAttnTransformer(
            d_model=conv_dim,
            n_heads=transformer_nheads,
            num_encoder_layers=transformer_enc_layers,
            dim_feedforward=transformer_dim_feedforward,
            dropout=transformer_dropout,
            num_feature_levels=len(self.transformer_in_features),
            enc_n_points=transformer_n_points,
        )
        if deformable_attn_impl not in IMPLEMENTATIONS:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTN_IMPL={deformable_attn_impl!r} is not valid; "
                f"valid: {', '.join(IMPLEMENTATIONS)}"
            )
        for module in self.transformer.modules():
            if isinstance(module, MSDeformAttn):
                module.impl = deformable_attn_impl
        # Half the channels encode y, half x.
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1)
        weight_init.c2_xavier_fill(self.mask_features)

        # Built finest-first so the names match Mask2Former's; kept coarsest-first for forward.
        lateral_convs, output_convs = [], []
        for idx, name in enumerate(self.in_features):
            lateral = lateral_conv(input_shape[name].channels, conv_dim, norm)
            output = output_conv(conv_dim, conv_dim, norm)
            self.add_module(f"adapter_{idx + 1}", lateral)
            self.add_module(f"layer_{idx + 1}", output)
            lateral_convs.append(lateral)
            output_convs.append(output)
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head, mask_former = cfg.MODEL.SEM_SEG_HEAD, cfg.MODEL.MASK_FORMER
        # The keys Mask2Former reads, with its meanings: a config both can read builds one model.
        # Mask2Former's own encoder keys are not among them; a config that sets them to something
        # else than their default and the value used is told so.
        ignored = {
            "DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS": (
                head.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS,
                8,
                mask_former.NHEADS,
                "MODEL.MASK_FORMER.NHEADS",
            ),
            "DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS": (
                head.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS,
                ENCODER_N_POINTS,
                ENCODER_N_POINTS,
                "fixed, as in Mask2Former",
            ),
        }
        for key, (value, default, used, source) in ignored.items():
            if value not in (default, used):
                logger.warning(
                    f"MODEL.SEM_SEG_HEAD.{key}={value} is not read (nor is it by Mask2Former): "
                    f"the deformable encoder uses {used} ({source})"
                )
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
            "transformer_dropout": mask_former.DROPOUT,
            "transformer_nheads": mask_former.NHEADS,
            "transformer_dim_feedforward": head.DIM_FEEDFORWARD,
            "transformer_enc_layers": head.TRANSFORMER_ENC_LAYERS,
            "transformer_in_features": list(head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES),
            "common_stride": head.COMMON_STRIDE,
            "deformable_attn_impl": head.DEFORMABLE_ATTN_IMPL,
        }

    def forward_features(self, features: Dict[str, Tensor]) -> Tuple[Tensor, Tensor, List[Tensor]]:
        """
        Args:
            features: backbone features by name, (B, C_l, H_l, W_l).

        Returns:
            mask_features: (B, mask_dim, H / common_stride, W / common_stride).
            transformer_encoder_features: (B, C, H_l, W_l) the encoder's coarsest output.
            multi_scale_features: 3 maps (B, C, H_l, W_l), coarsest first; all in float32.
        """
        # As in Mask2Former, the whole pixel decoder runs in float32 under mixed precision: the
        # deformable attention's sampling locations are too coarse in half precision.
        names = self.transformer_in_features + self.in_features
        device_type = features[names[0]].device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return self._forward_features({k: features[k].float() for k in names})

    def _forward_features(self, features: Dict[str, Tensor]) -> Tuple[Tensor, Tensor, List[Tensor]]:
        srcs, pos = [], []
        for proj, name in zip(self.input_proj, self.transformer_in_features[::-1]):
            src = proj(features[name])
            srcs.append(src)
            # The encoding depends only on the map's size: compute it for one image and broadcast.
            pos.append(self.pe_layer(src[:1]))
        y, spatial_shapes = self.transformer(srcs, pos)

        batch = y.shape[0]
        out = []
        for level in y.split([h * w for h, w in spatial_shapes], dim=1):
            h, w = spatial_shapes[len(out)]
            out.append(level.transpose(1, 2).reshape(batch, -1, h, w))

        for name, lateral, output in zip(
            self.in_features[::-1], self.lateral_convs, self.output_convs
        ):
            x = lateral(features[name])
            up = F.interpolate(out[-1], size=x.shape[-2:], mode="bilinear", align_corners=False)
            out.append(output(x + up))

        return self.mask_features(out[-1]), out[0], out[:NUM_MULTI_SCALE_LEVELS]

    def forward(self, features: Dict[str, Tensor]):
        """Same as :meth:`forward_features`."""
        return self.forward_features(features)
