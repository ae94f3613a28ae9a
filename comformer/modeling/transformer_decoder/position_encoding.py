"""Fixed 2-D sine/cosine position encoding for feature maps (DETR's, as Mask2Former uses it)."""

import math
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["PositionEmbeddingSine"]


class PositionEmbeddingSine(nn.Module):
    """
    Encode each pixel's (y, x) position with sines and cosines of geometrically spaced frequencies.

    The output has ``2 * num_pos_feats`` channels: the first half encodes y, the second x. It has no
    parameters, so it never appears in a state dict.
    """

    def __init__(
        self,
        num_pos_feats: int = 64,
        temperature: int = 10000,
        normalize: bool = False,
        scale: Optional[float] = None,
    ):
        """
        Args:
            num_pos_feats: channels per axis (half of the output's channels).
            temperature: base of the geometric frequency progression.
            normalize: divide the coordinates (1..H, 1..W) by the map's size and multiply by
                ``scale``, so that the encoding does not depend on image size: pixel i of n
                gets i / n * scale, the last one exactly ``scale``.
            scale: the normalised range; only meaningful with ``normalize`` (default 2*pi).
        """
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            x: (B, C, H, W) features; only their shape, device and dtype are used.
            mask: optional (B, H, W) bool, True on padding; padded pixels do not count.

        Returns:
            (B, 2 * num_pos_feats, H, W) position encoding in x's dtype.
        """
        if mask is None:
            mask = torch.zeros((x.size(0), x.size(2), x.size(3)), device=x.device, dtype=torch.bool)
        not_mask = (~mask).to(torch.float32)
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            # DETR's and Mask2Former's normalisation, which their checkpoints were trained with.
            # Deformable DETR's variant subtracts 0.5 first (pixel centres), a different encoding.
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (
            2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats
        )
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        # Interleave sin (even channels) and cos (odd channels) of each frequency.
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
            f"normalize={self.normalize}, scale={self.scale}"
        )
