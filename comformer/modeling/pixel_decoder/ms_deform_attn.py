"""Multi-scale deformable attention (Deformable DETR), in pure PyTorch.

Every query attends to a few sampled points per head and per feature level instead of to every
pixel: the points are its reference point plus learned offsets, values are read there by bilinear
interpolation (``F.grid_sample``) and summed with learned, softmax-normalised weights.

Shapes: N batch, Lq queries, S = sum over levels of H_l * W_l flattened input pixels, M heads,
D channels per head (C = M * D), L levels, P sampling points per head and level.
Locations are normalised: (0, 0) is the top-left corner of a level's top-left pixel, (1, 1) the
bottom-right corner of its bottom-right pixel, so pixel (i, j)'s centre is ((j + 0.5) / W_l,
(i + 0.5) / H_l) in (x, y) order.
"""

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["ms_deform_attn", "compiled_ms_deform_attn", "MSDeformAttn", "IMPLEMENTATIONS"]

SpatialShapes = Union[Tensor, Sequence[Tuple[int, int]]]

# How MSDeformAttn computes the sampling: "pytorch" (:func:`ms_deform_attn`, the reference),
# "compiled" (the same function through torch.compile: on CUDA, Triton kernels generated at run
# time, no build step at install), "auto" (compiled on CUDA, pytorch elsewhere).
IMPLEMENTATIONS = ("auto", "pytorch", "compiled")
_COMPILED = None


def _shape_list(spatial_shapes: SpatialShapes) -> List[Tuple[int, int]]:
    """(L, 2) integer tensor or sequence of (H_l, W_l) -> list of Python int pairs."""
    if isinstance(spatial_shapes, Tensor):
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
            raise ValueError(
                f"spatial_shapes must be an (L, 2) tensor of (H, W); got shape "
                f"{tuple(spatial_shapes.shape)}"
            )
        # .tolist() synchronises with the device; callers that care pass Python ints instead.
        spatial_shapes = spatial_shapes.tolist()
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    if not shapes or any(h <= 0 or w <= 0 for h, w in shapes):
        raise ValueError(
            f"spatial_shapes must be a non-empty list of positive (H, W); got {shapes}"
        )
    return shapes


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """
    The core of multi-scale deformable attention: bilinear sampling + weighted sum.

    Sampling is ``F.grid_sample`` with bilinear interpolation, zero padding and
    ``align_corners=False``: a location outside a level reads zeros from the missing neighbours.
    It always runs in float32, also under ``torch.autocast`` (locations in half precision would be
    off by a fraction of a pixel on large maps); the result is cast back to ``value``'s dtype.

    Args:
        value: (N, S, M, D) values of all levels, flattened row-major and concatenated level by
            level in the order of ``spatial_shapes``.
        spatial_shapes: (H_l, W_l) of each level, as an (L, 2) integer tensor or a sequence of
            int pairs (the latter avoids a device synchronisation).
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y) locations, see module docstring.
        attention_weights: (N, Lq, M, L, P) weights of the sampled values (usually softmax-ed
            over L * P).

    Returns:
        (N, Lq, M * D) attended values, heads concatenated; dtype of ``value``.
    """
    shapes = _shape_list(spatial_shapes)
    if value.dim() != 4:
        raise ValueError(f"value must be (N, S, M, D); got shape {tuple(value.shape)}")
    N, S, M, D = value.shape
    if sum(h * w for h, w in shapes) != S:
        raise ValueError(
            f"value has S={S} pixels but spatial_shapes {shapes} sum to "
            f"{sum(h * w for h, w in shapes)}"
        )
    L = len(shapes)
    if sampling_locations.dim() != 6 or (
        sampling_locations.shape[0] != N
        or sampling_locations.shape[2:4] != (M, L)
        or sampling_locations.shape[5] != 2
    ):
        raise ValueError(
            f"sampling_locations must be (N={N}, Lq, M={M}, L={L}, P, 2); "
            f"got shape {tuple(sampling_locations.shape)}"
        )
    Lq, P = sampling_locations.shape[1], sampling_locations.shape[4]
    if attention_weights.shape != (N, Lq, M, L, P):
        raise ValueError(
            f"attention_weights must be (N, Lq, M, L, P) = {(N, Lq, M, L, P)}; "
            f"got shape {tuple(attention_weights.shape)}"
        )

    out_dtype = value.dtype
    with torch.autocast(device_type=value.device.type, enabled=False):
        # One re-layout of each input for all levels; the per-level pieces below are views.
        # (N, S, M, D) -> (N*M, D, S): each level is then a strided (N*M, D, H_l, W_l) view.
        value = value.float().permute(0, 2, 3, 1).reshape(N * M, D, S)
        # grid_sample wants [-1, 1] coordinates: (N, Lq, M, L, P, 2) -> (N*M, L, Lq, P, 2).
        grids = (2 * sampling_locations.float() - 1).permute(0, 2, 3, 1, 4, 5)
        grids = grids.reshape(N * M, L, Lq, P, 2)
        # (N, Lq, M, L, P) -> (N*M, L, 1, Lq, P), broadcast over the D channels.
        weights = attention_weights.float().permute(0, 2, 3, 1, 4).reshape(N * M, L, 1, Lq, P)

        output = None
        start = 0
        for level, (h, w) in enumerate(shapes):
            value_l = value[:, :, start : start + h * w].unflatten(-1, (h, w))
            start += h * w
            sampled = F.grid_sample(
                value_l, grids[:, level], mode="bilinear", padding_mode="zeros", align_corners=False
            )  # (N*M, D, Lq, P)
            # Accumulating level by level never materialises the (N*M, D, Lq, L, P) stack.
            contribution = (sampled * weights[:, level]).sum(-1)
            output = contribution if output is None else output + contribution
        # (N*M, D, Lq) -> (N, Lq, M*D), head-major channels as the output projection expects.
        output = output.view(N, M * D, Lq).transpose(1, 2)
    return output.to(out_dtype)


def compiled_ms_deform_attn():
    """
    :func:`ms_deform_attn` through ``torch.compile``, built on first use and shared. On CUDA the
    inductor backend fuses the permutes, the bilinear sampling and the weighted sum into Triton
    kernels (Triton ships with PyTorch's CUDA wheels): no compiled extension to build at install,
    unlike Mask2Former's ``MultiScaleDeformableAttention`` op. Shapes are specialised: a new set
    of level sizes compiles again (fixed training crops compile once), and past torch's
    recompilation limit torch falls back to the eager function.
    """
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(ms_deform_attn, dynamic=False)
    return _COMPILED


class MSDeformAttn(nn.Module):
    """
    Multi-scale deformable attention module.

    Sub-module names, shapes and initialisation follow Deformable DETR so that its (and
    Mask2Former's) checkpoints load unchanged.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        """
        Args:
            d_model: channels C of queries and values; must be divisible by ``n_heads``.
            n_levels: number of feature levels L.
            n_heads: number of attention heads M.
            n_points: sampling points P per head and level.
        """
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(
                f"MSDeformAttn: d_model={d_model} must be divisible by n_heads={n_heads}"
            )
        for name, v in (("n_levels", n_levels), ("n_heads", n_heads), ("n_points", n_points)):
            if v < 1:
                raise ValueError(f"MSDeformAttn: {name}={v} must be >= 1")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        # see IMPLEMENTATIONS; not a parameter: the pixel decoder sets it from its config
        self.impl = "auto"

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation."""
        # At initialisation head m samples along direction 2*pi*m/M, point p at distance p+1 pixels
        # (in the larger of |cos|, |sin| so the ring is a square), whatever the query: the heads
        # start by looking around the reference point in different directions and scales.
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([thetas.cos(), thetas.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        scale = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        grid = directions.view(self.n_heads, 1, 1, 2) * scale
        grid = grid.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        # Zero weights: uniform attention over all sampled points until trained.
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        spatial_shapes: SpatialShapes,
        input_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            query: (N, Lq, C) queries (position embedding already added).
            reference_points: (N or 1, Lq, L, 2) normalised (x, y) reference point of each query on
                each level; offsets are in pixels of the level they sample.
            input_flatten: (N, S, C) values of all levels, flattened and concatenated.
            spatial_shapes: (H_l, W_l) of each level, see :func:`ms_deform_attn`.
            input_padding_mask: optional (N, S) bool, True at padding pixels (they read as zero).

        Returns:
            (N, Lq, C)
        """
        shapes = _shape_list(spatial_shapes)
        if len(shapes) != self.n_levels:
            raise ValueError(
                f"MSDeformAttn was built for n_levels={self.n_levels}; got {len(shapes)} "
                f"spatial_shapes {shapes}"
            )
        N, Lq, _ = query.shape
        if reference_points.dim() != 4 or reference_points.shape[1:] != (Lq, self.n_levels, 2):
            raise ValueError(
                f"reference_points must be (N, Lq={Lq}, L={self.n_levels}, 2); got shape "
                f"{tuple(reference_points.shape)}"
            )
        S = input_flatten.shape[1]
        M, L, P = self.n_heads, self.n_levels, self.n_points

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, S, M, self.d_model // M)

        # Locations and weights in float32 whatever autocast did to the projections.
        offsets = self.sampling_offsets(query).float().view(N, Lq, M, L, P, 2)
        weights = self.attention_weights(query).float().view(N, Lq, M, L * P)
        weights = F.softmax(weights, -1).view(N, Lq, M, L, P)
        # Offsets are in pixels of each level: divide by that level's (W, H).
        normalizer = torch.tensor(
            [[w, h] for h, w in shapes], dtype=torch.float32, device=query.device
        )
        locations = (
            reference_points.float()[:, :, None, :, None, :]
            + offsets / normalizer[None, None, None, :, None, :]
        )
        output = self._sampler(value)(value, shapes, locations, weights)
        return self.output_proj(output)

    def _sampler(self, value: Tensor):
        if self.impl not in IMPLEMENTATIONS:
            raise ValueError(
                f"MSDeformAttn.impl={self.impl!r} is not valid; valid: {', '.join(IMPLEMENTATIONS)}"
            )
        if self.impl == "compiled" or (self.impl == "auto" and value.is_cuda):
            return compiled_ms_deform_attn()
        return ms_deform_attn

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, "
            f"n_points={self.n_points}, impl={self.impl!r}"
        )
