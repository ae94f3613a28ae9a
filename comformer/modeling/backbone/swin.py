"""Swin Transformer backbone (Liu et al., 2021) for detectron2, registered as ``D2SwinTransformer``.

Module and parameter names follow the official Swin / Mask2Former layout (``patch_embed.proj``,
``layers.i.blocks.j.attn.qkv``, ``layers.i.downsample.reduction``, ``norm{i}``...) so that converted
ImageNet checkpoints and Mask2Former Swin checkpoints load without renaming.

Shapes: B batch, C channels, H W feature-map size of the current stage, ws window size,
N = ws * ws tokens per window, nW windows per image, nh attention heads.
Inside the stages features are kept channels-last, (B, H, W, C).
"""

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils import checkpoint

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

__all__ = [
    "D2SwinTransformer",
    "relative_position_index",
    "shifted_window_attention_mask",
    "window_partition",
    "window_reverse",
]

_STAGE_NAMES = ("res2", "res3", "res4", "res5")
# Additive logit for pairs that may not attend to each other. Finite (not -inf) so that it stays
# representable under fp16 autocast; exp(-100) is 0 in any float format, as in the reference.
_MASKED_LOGIT = -100.0


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """
    Args:
        x: (B, H, W, C) with H and W multiples of ``window_size``.
    Returns:
        (B * nW, ws * ws, C): windows in row-major order per image, tokens row-major per window.
    """
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, c)


def window_reverse(
    windows: torch.Tensor, window_size: int, height: int, width: int
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, ws * ws, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    nh, nw = height // window_size, width // window_size
    x = windows.view(-1, nh, nw, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def relative_position_index(window_size: int) -> torch.Tensor:
    """
    Index into the relative position bias table for every pair of tokens of a window.

    Token i at (y_i, x_i) and token j at (y_j, x_j) (row-major inside the window) get
    ``(y_i - y_j + ws - 1) * (2 ws - 1) + (x_i - x_j + ws - 1)``: a distinct entry of the
    (2 ws - 1)^2 table per relative offset.

    Returns:
        (N, N) int64.
    """
    ys, xs = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :] + (window_size - 1)  # (2, N, N), >= 0
    return rel[0] * (2 * window_size - 1) + rel[1]


def shifted_window_attention_mask(
    height: int, width: int, window_size: int, shift_size: int, device=None
) -> torch.Tensor:
    """
    Attention mask of the shifted-window blocks.

    After the feature map (already padded to ``height`` x ``width``, multiples of the window) is
    rolled up-left by ``shift_size``, the last row and column of windows hold pixels that were
    not neighbours in the image (the bottom/right strips next to the wrapped-around top/left
    strips). Tokens are labelled by which of the 3 x 3 strips they came from; two tokens of a
    window may attend to each other only if their labels are equal.

    Returns:
        (nW, N, N) float: 0 where attention is allowed, a large negative logit elsewhere.
    """
    label = torch.zeros((1, height, width, 1), device=device)
    bounds = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    for i, hs in enumerate(bounds):
        for j, ws in enumerate(bounds):
            label[:, hs, ws, :] = 3 * i + j
    windows = window_partition(label, window_size).squeeze(-1)  # (nW, N)
    different = windows[:, None, :] != windows[:, :, None]
    return torch.zeros(different.shape, device=device).masked_fill(different, _MASKED_LOGIT)


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability ``p``
    and rescale the kept ones by 1 / (1 - p)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """Linear -> GELU -> dropout -> Linear -> dropout, applied per token."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned bias per relative offset."""

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        # Persistent: official and Mask2Former checkpoints carry it, so loading them reports no
        # unexpected keys. It is a pure function of window_size.
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            x: (B * nW, N, C) tokens of all windows.
            mask: (nW, N, N) additive mask shared by all images, or None.
        Returns:
            (B * nW, N, C).
        """
        bw, n, c = x.shape
        qkv = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B * nW, nh, N, C / nh)

        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, self.num_heads).permute(2, 0, 1).unsqueeze(0)  # (1, nh, N, N)
        if mask is not None:
            # Windows are image-major (see window_partition): regroup them per image so that the
            # per-window mask broadcasts over images instead of being repeated for each.
            nw = mask.shape[0]
            q, k, v = (t.reshape(bw // nw, nw * self.num_heads, n, -1) for t in (q, k, v))
            bias = (bias + mask.unsqueeze(1)).reshape(1, nw * self.num_heads, n, n)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=bias.to(q.dtype),
            dropout_p=self.attn_drop if self.training else 0.0,
            scale=self.scale,
        )
        out = out.reshape(bw, self.num_heads, n, -1).transpose(1, 2).reshape(bw, n, c)
        return self.proj_drop(self.proj(out))


class SwinTransformerBlock(nn.Module):
    """(Shifted-)window attention and an MLP, each in a pre-norm residual branch."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: Optional[float],
        drop: float,
        attn_drop: float,
        drop_path: float,
    ):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size={shift_size} must be in [0, window_size={window_size})")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(
            dim, window_size, num_heads, qkv_bias, qk_scale, attn_drop, drop
        )
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            x: (B, H, W, C).
            attn_mask: (nW, N, N) mask for the padded map (see shifted_window_attention_mask);
                used only when this block shifts its windows.
        Returns:
            (B, H, W, C).
        """
        _, h, w, _ = x.shape
        ws, shift = self.window_size, self.shift_size
        y = self.norm1(x)
        # Zero-pad after the norm and let padded tokens take part in attention as keys, as the
        # reference implementation does: Mask2Former's Swin models were trained that way, so
        # masking them out would change what their checkpoints compute.
        y = F.pad(y, (0, 0, 0, (-w) % ws, 0, (-h) % ws))
        hp, wp = y.shape[1:3]
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        windows = self.attn(window_partition(y, ws), attn_mask if shift else None)
        y = window_reverse(windows, ws, hp, wp)
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        x = x + self.drop_path(y[:, :h, :w, :])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Halve the resolution: concatenate each 2x2 neighbourhood (4C), normalise, project to 2C."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, ceil(H / 2), ceil(W / 2), 2C); odd sizes are zero-padded."""
        _, h, w, _ = x.shape
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        # This concatenation order is what pretrained `reduction` weights expect.
        x = torch.cat(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1
        )
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    """One stage: ``depth`` blocks alternating regular and shifted windows, then (optionally)
    patch merging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: Optional[float],
        drop: float,
        attn_drop: float,
        drop_path: Sequence[float],
        downsample: bool,
        use_checkpoint: bool,
    ):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim,
                num_heads,
                window_size,
                0 if i % 2 == 0 else self.shift_size,
                mlp_ratio,
                qkv_bias,
                qk_scale,
                drop,
                attn_drop,
                drop_path[i],
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x: (B, H, W, C).
        Returns:
            the stage output (B, H, W, C) and the next stage's input (B, H/2, W/2, 2C), or the
            stage output twice when there is no downsampling.
        """
        _, h, w, _ = x.shape
        ws = self.window_size
        attn_mask = None
        if self.shift_size and len(self.blocks) > 1:
            padded_h, padded_w = h + (-h) % ws, w + (-w) % ws
            attn_mask = shifted_window_attention_mask(
                padded_h, padded_w, ws, self.shift_size, device=x.device
            )
        for blk in self.blocks:
            if self.use_checkpoint and self.training:
                x = checkpoint.checkpoint(blk, x, attn_mask, use_reentrant=False)
            else:
                x = blk(x, attn_mask)
        if self.downsample is None:
            return x, x
        return x, self.downsample(x)


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches -> ``embed_dim`` channels (a strided convolution)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, patch_norm: bool):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, ceil(H / p), ceil(W / p), C); the input is zero-padded."""
        h, w = x.shape[-2:]
        p = self.patch_size
        x = self.proj(F.pad(x, (0, (-w) % p, 0, (-h) % p))).permute(0, 2, 3, 1)
        return x if self.norm is None else self.norm(x)


@BACKBONE_REGISTRY.register()
class D2SwinTransformer(Backbone):
    """
    Swin Transformer returning the four stages as ``res2``..``res5`` (strides 4, 8, 16, 32 with
    the usual patch size 4; channels C, 2C, 4C, 8C), each normalised by its own LayerNorm
    ``norm{i}``. Any input size works: inputs are padded to the patch size, feature maps to the
    window size and to even sizes before merging, and outputs cropped back.

    All four stages and their norms are always built so that checkpoints load whatever
    OUT_FEATURES says; stages after the last requested one are skipped in ``forward`` (their
    parameters, and the norms of stages not returned, get no gradient).
    """

    @configurable
    def __init__(
        self,
        *,
        pretrain_img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        ape: bool = False,
        patch_norm: bool = True,
        out_features: Sequence[str] = _STAGE_NAMES,
        use_checkpoint: bool = False,
    ):
        """
        Args:
            pretrain_img_size: image size of pretraining; only sizes the absolute position
                embedding (``ape``), which is resized to the input.
            patch_size: side of the non-overlapping patches embedded by ``patch_embed``.
            in_chans: input channels.
            embed_dim: C, channels of the first stage (doubled at every stage).
            depths: blocks per stage (4 stages).
            num_heads: attention heads per stage; must divide the stage's channels.
            window_size: ws, side of the attention windows.
            mlp_ratio: MLP hidden width relative to the channels.
            qkv_bias: learn a bias for queries, keys and values.
            qk_scale: attention logit scale (None: head_dim ** -0.5).
            drop_rate: dropout after the patch embedding, in the MLPs and after attention.
            attn_drop_rate: dropout on attention weights.
            drop_path_rate: stochastic depth rate, increased linearly from 0 to this over blocks.
            ape: add a learned absolute position embedding after the patch embedding.
            patch_norm: LayerNorm after the patch embedding.
            out_features: stages to return, a subset of "res2".."res5".
            use_checkpoint: recompute blocks in the backward pass to save memory (training only).
        """
        super().__init__()
        depths, num_heads = list(depths), list(num_heads)
        if len(depths) != len(_STAGE_NAMES) or len(num_heads) != len(_STAGE_NAMES):
            raise ValueError(
                f"MODEL.SWIN.DEPTHS={depths} and MODEL.SWIN.NUM_HEADS={num_heads} must both have "
                f"{len(_STAGE_NAMES)} entries, one per stage {_STAGE_NAMES}"
            )
        dims = [embed_dim * 2**i for i in range(len(depths))]
        for i, (dim, heads) in enumerate(zip(dims, num_heads)):
            if heads <= 0 or dim % heads:
                raise ValueError(
                    f"MODEL.SWIN.NUM_HEADS[{i}]={heads} must be a positive divisor of stage {i}'s "
                    f"{dim} channels (MODEL.SWIN.EMBED_DIM={embed_dim} * 2**{i})"
                )
        if any(d < 1 for d in depths):
            raise ValueError(f"MODEL.SWIN.DEPTHS={depths}: every stage needs at least one block")
        if window_size < 1 or patch_size < 1:
            raise ValueError(
                f"MODEL.SWIN.WINDOW_SIZE={window_size} and MODEL.SWIN.PATCH_SIZE={patch_size} "
                "must be >= 1"
            )
        unknown = [f for f in out_features if f not in _STAGE_NAMES]
        if unknown or not out_features:
            raise ValueError(
                f"MODEL.SWIN.OUT_FEATURES={list(out_features)}: must be a non-empty subset of "
                f"{list(_STAGE_NAMES)}"
            )

        self.ape = ape
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        if ape:
            grid = pretrain_img_size // patch_size
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, grid, grid))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)

        # plain floats: stochastic depth grows linearly with the block's depth in the network
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.layers.append(
                BasicLayer(
                    dims[i],
                    depth,
                    num_heads[i],
                    window_size,
                    mlp_ratio,
                    qkv_bias,
                    qk_scale,
                    drop_rate,
                    attn_drop_rate,
                    dpr[start : start + depth],
                    downsample=i < len(depths) - 1,
                    use_checkpoint=use_checkpoint,
                )
            )

        # stage order, whatever order the config lists them in
        self._out_features = [f for f in _STAGE_NAMES if f in out_features]
        self._out_indices = [_STAGE_NAMES.index(f) for f in self._out_features]
        self._out_feature_strides = {
            name: patch_size * 2**i for i, name in enumerate(_STAGE_NAMES) if name in out_features
        }
        self._out_feature_channels = {
            name: dims[i] for i, name in enumerate(_STAGE_NAMES) if name in out_features
        }
        # Like the stages, a norm for every stage whatever OUT_FEATURES says: Mask2Former's state
        # dict always has norm0..norm3.
        for i, dim in enumerate(dims):
            self.add_module(f"norm{i}", nn.LayerNorm(dim))
        self._size_divisibility = patch_size * 2 ** (len(depths) - 1)
        # Linear, conv and norm layers keep PyTorch's default initialisation, as in Mask2Former,
        # whose backbone never calls the official Swin's init_weights (truncated normal, std 0.02):
        # Swin backbones are meant to start from ImageNet weights. Only the position tables are
        # initialised here, as there.

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        swin = cfg.MODEL.SWIN
        return {
            "pretrain_img_size": swin.PRETRAIN_IMG_SIZE,
            "patch_size": swin.PATCH_SIZE,
            "in_chans": input_shape.channels,
            "embed_dim": swin.EMBED_DIM,
            "depths": swin.DEPTHS,
            "num_heads": swin.NUM_HEADS,
            "window_size": swin.WINDOW_SIZE,
            "mlp_ratio": swin.MLP_RATIO,
            "qkv_bias": swin.QKV_BIAS,
            "qk_scale": swin.QK_SCALE,
            "drop_rate": swin.DROP_RATE,
            "attn_drop_rate": swin.ATTN_DROP_RATE,
            "drop_path_rate": swin.DROP_PATH_RATE,
            "ape": swin.APE,
            "patch_norm": swin.PATCH_NORM,
            "out_features": swin.OUT_FEATURES,
            "use_checkpoint": swin.USE_CHECKPOINT,
        }

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: (B, C_in, H, W) normalised images.
        Returns:
            dict of the requested stages, "res{i+2}" -> (B, C * 2**i, ceil(H / (4 * 2**i)),
            ceil(W / (4 * 2**i))) for patch size 4.
        """
        if x.dim() != 4:
            raise ValueError(
                f"D2SwinTransformer takes (B, C, H, W) inputs, got shape {tuple(x.shape)}"
            )
        x = self.patch_embed(x)  # (B, H, W, C)
        if self.ape:
            pos = F.interpolate(self.absolute_pos_embed, size=x.shape[1:3], mode="bicubic")
            x = x + pos.permute(0, 2, 3, 1)
        x = self.pos_drop(x)

        outputs = {}
        last = self._out_indices[-1]
        for i, layer in enumerate(self.layers[: last + 1]):
            out, x = layer(x)
            if i in self._out_indices:
                norm = getattr(self, f"norm{i}")
                outputs[_STAGE_NAMES[i]] = norm(out).permute(0, 3, 1, 2).contiguous()
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility
