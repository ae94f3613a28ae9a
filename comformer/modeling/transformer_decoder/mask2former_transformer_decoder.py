"""Mask2Former's masked-attention transformer decoder.

Shapes: B images, Q queries, C hidden channels, K classes (+1 no-object), (H, W) the mask features'
size, (H_l, W_l) the size of feature level l. Inside the decoder, sequences are laid out
(length, B, C) as ``nn.MultiheadAttention`` expects by default.

Module and parameter names equal Mask2Former's so that its checkpoints load unchanged
(``sem_seg_head.predictor.*``).
"""

from typing import Dict, List, Optional, Tuple

import fvcore.nn.weight_init as weight_init
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import Conv2d
from detectron2.utils.registry import Registry

from ..matcher import check_mask_activation
from .position_encoding import PositionEmbeddingSine

__all__ = [
    "TRANSFORMER_DECODER_REGISTRY",
    "build_transformer_decoder",
    "MultiScaleMaskedTransformerDecoder",
    "MLP",
]

TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_MODULE")
TRANSFORMER_DECODER_REGISTRY.__doc__ = """
Registry for transformer decoders that predict classes and masks from queries.

A member is called as ``decoder(cfg, in_channels, mask_classification)`` (``@configurable``) and its
forward as ``decoder(multi_scale_features, mask_features, mask=None)``, returning a dict with
"pred_logits" (B, Q, K+1), "pred_masks" (B, Q, H, W) mask logits and "aux_outputs".
"""


def build_transformer_decoder(cfg, in_channels: int, mask_classification: bool = True) -> nn.Module:
    """
    Build the transformer decoder named by ``cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME``.

    Args:
        cfg: a config with comformer's keys.
        in_channels: channels of the multi-scale features fed to the decoder.
        mask_classification: whether the decoder predicts a class per query.
    """
    name = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
    if name not in TRANSFORMER_DECODER_REGISTRY:
        valid = ", ".join(sorted(name for name, _ in TRANSFORMER_DECODER_REGISTRY))
        raise KeyError(
            f"MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME={name!r} is not registered; valid: {valid}"
        )
    return TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels, mask_classification)


def _with_pos(x: Tensor, pos: Optional[Tensor]) -> Tensor:
    return x if pos is None else x + pos


def _xavier_init(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class SelfAttentionLayer(nn.Module):
    """Self-attention among queries with a residual connection and LayerNorm (pre or post)."""

    def __init__(
        self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False
    ):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def forward(self, tgt: Tensor, query_pos: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            tgt: (Q, B, C) query features.
            query_pos: (Q, B, C) query positional embeddings, added to queries and keys only.
        """
        x = self.norm(tgt) if self.normalize_before else tgt
        q = k = _with_pos(x, query_pos)
        tgt = tgt + self.dropout(self.self_attn(q, k, value=x)[0])
        return tgt if self.normalize_before else self.norm(tgt)


class CrossAttentionLayer(nn.Module):
    """Attention of queries to image features, with a residual connection and LayerNorm."""

    def __init__(
        self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False
    ):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_mask: Optional[Tensor] = None,
        pos: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            tgt: (Q, B, C) query features.
            memory: (HW, B, C) image features of one level.
            memory_mask: (B * nheads, Q, HW) bool, True where a query may NOT attend.
            pos: (HW, B, C) positional encoding of the image features (added to keys).
            query_pos: (Q, B, C) query positional embeddings (added to queries).
        """
        x = self.norm(tgt) if self.normalize_before else tgt
        attended = self.multihead_attn(
            query=_with_pos(x, query_pos),
            key=_with_pos(memory, pos),
            value=memory,
            attn_mask=memory_mask,
        )[0]
        tgt = tgt + self.dropout(attended)
        return tgt if self.normalize_before else self.norm(tgt)


class FFNLayer(nn.Module):
    """Two-layer ReLU feed-forward block with a residual connection and LayerNorm."""

    def __init__(
        self,
        d_model: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        normalize_before: bool = False,
    ):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def forward(self, tgt: Tensor) -> Tensor:
        """tgt: (Q, B, C) -> (Q, B, C)."""
        x = self.norm(tgt) if self.normalize_before else tgt
        tgt = tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        return tgt if self.normalize_before else self.norm(tgt)


class MLP(nn.Module):
    """Stack of ``num_layers`` Linear layers with ReLU between them (not after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoder(nn.Module):
    """
    Mask2Former's decoder: learnable queries attend, one feature level per layer (round-robin,
    lowest resolution first), only to the pixels inside their currently predicted mask.

    Each layer is cross-attention -> self-attention -> FFN. Class and mask predictions are made
    from the learnable queries before the first layer and after every layer; all but the last are
    returned as "aux_outputs" for deep supervision.
    """

    # Mask2Former always uses three feature levels (strides 32, 16, 8 of the pixel decoder).
    num_feature_levels = 3
    # The state-dict version of Mask2Former's decoder. Saved in every checkpoint's metadata: a
    # module that finds no version (or < 2) in a checkpoint treats it as MaskFormer's old layout
    # and renames its keys, so Mask2Former loads comformer checkpoints unchanged only with it.
    _version = 2

    @configurable
    def __init__(
        self,
        in_channels: int,
        mask_classification: bool = True,
        *,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        nheads: int,
        dim_feedforward: int,
        dec_layers: int,
        pre_norm: bool,
        mask_dim: int,
        enforce_input_project: bool,
        mask_activation: str = "sigmoid",
        dropout: float = 0.0,
    ):
        """
        Args:
            in_channels: channels of the multi-scale input features.
            mask_classification: predict a class per query (Mask2Former always does).
            num_classes: K, classes without no-object; the classifier has K+1 outputs.
            hidden_dim: C, the transformer width.
            num_queries: Q.
            nheads: attention heads.
            dim_feedforward: hidden width of the FFN blocks.
            dec_layers: transformer layers, NOT counting the prediction from the initial queries.
            pre_norm: LayerNorm before (True) or after (False, Mask2Former) each block.
            mask_dim: channels of the mask features the mask embeddings are dotted with.
            enforce_input_project: add the 1x1 input projection even when
                ``in_channels == hidden_dim`` (otherwise it is the identity and has no parameters).
            mask_activation: how masks become probabilities for the attention mask: "sigmoid"
                (Mask2Former) or "softmax" across queries (CoMFormer's softmax masks).
            dropout: dropout in the attention and FFN blocks. Mask2Former has none here, whatever
                MODEL.MASK_FORMER.DROPOUT says (that key is the pixel decoder's), so the config
                does not set it.
        """
        super().__init__()
        if dec_layers < 0:
            raise ValueError(
                f"dec_layers={dec_layers} is not valid; must be >= 0 "
                "(MODEL.MASK_FORMER.DEC_LAYERS, which counts the initial prediction, >= 1)"
            )
        if not 0 <= dropout < 1:
            raise ValueError(f"MODEL.MASK_FORMER.DROPOUT={dropout} is not valid; must be in [0, 1)")
        if hidden_dim % nheads != 0:
            raise ValueError(
                f"MODEL.MASK_FORMER.HIDDEN_DIM={hidden_dim} must be divisible by NHEADS={nheads}"
            )
        self.mask_classification = mask_classification
        self.mask_activation = check_mask_activation(mask_activation)
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.num_heads = nheads
        self.num_layers = dec_layers

        # Half the channels encode y, half x.
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)

        self.transformer_self_attention_layers = nn.ModuleList()
        self.transformer_cross_attention_layers = nn.ModuleList()
        self.transformer_ffn_layers = nn.ModuleList()
        for _ in range(dec_layers):
            self.transformer_self_attention_layers.append(
                SelfAttentionLayer(hidden_dim, nheads, dropout=dropout, normalize_before=pre_norm)
            )
            self.transformer_cross_attention_layers.append(
                CrossAttentionLayer(hidden_dim, nheads, dropout=dropout, normalize_before=pre_norm)
            )
            self.transformer_ffn_layers.append(
                FFNLayer(hidden_dim, dim_feedforward, dropout=dropout, normalize_before=pre_norm)
            )
        self.decoder_norm = nn.LayerNorm(hidden_dim)

        # Learnable query features (the decoder's state) and query positional embeddings.
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        # Tells the attention which level a key comes from (all levels share one encoding).
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                proj = Conv2d(in_channels, hidden_dim, kernel_size=1)
                weight_init.c2_xavier_fill(proj)
                self.input_proj.append(proj)
            else:
                self.input_proj.append(nn.Sequential())

        if mask_classification:
            self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(cls, cfg, in_channels, mask_classification):
        mf = cfg.MODEL.MASK_FORMER
        if mf.DEC_LAYERS < 1:
            raise ValueError(f"MODEL.MASK_FORMER.DEC_LAYERS={mf.DEC_LAYERS} must be >= 1")
        return {
            "in_channels": in_channels,
            "mask_classification": mask_classification,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "hidden_dim": mf.HIDDEN_DIM,
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "nheads": mf.NHEADS,
            "dim_feedforward": mf.DIM_FEEDFORWARD,
            # DEC_LAYERS counts the prediction from the initial queries, which has its own loss
            # like every layer; the transformer has one layer less.
            "dec_layers": mf.DEC_LAYERS - 1,
            "pre_norm": mf.PRE_NORM,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
            "enforce_input_project": mf.ENFORCE_INPUT_PROJ,
            "mask_activation": mf.MASK_ACTIVATION,
        }

    def forward(
        self, x: List[Tensor], mask_features: Tensor, mask: Optional[Tensor] = None
    ) -> Dict[str, object]:
        """
        Args:
            x: 3 feature maps (B, in_channels, H_l, W_l), lowest resolution first.
            mask_features: (B, mask_dim, H, W) per-pixel embeddings.
            mask: padding mask; unused, as in Mask2Former (masking padded pixels does not help).

        Returns:
            dict with "pred_logits" (B, Q, K+1) (only if ``mask_classification``), "pred_masks"
            (B, Q, H, W) mask logits, and "aux_outputs": a list of ``dec_layers`` dicts with the
            same keys, for the initial queries and every layer but the last, in order.
        """
        del mask
        if len(x) != self.num_feature_levels:
            raise ValueError(
                f"{type(self).__name__} expects {self.num_feature_levels} feature levels, "
                f"got {len(x)}"
            )
        src, pos, sizes = [], [], []
        for i, feat in enumerate(x):
            sizes.append(feat.shape[-2:])
            # (B, C, H_l, W_l) -> (H_l * W_l, B, C)
            pos.append(self.pe_layer(feat).flatten(2).permute(2, 0, 1))
            level = self.input_proj[i](feat).flatten(2) + self.level_embed.weight[i][None, :, None]
            src.append(level.permute(2, 0, 1))

        bs = src[0].shape[1]
        query_pos = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)  # (Q, B, C)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)

        predictions_class, predictions_mask = [], []
        outputs_class, outputs_mask, attn_mask = self.forward_prediction_heads(
            output, mask_features, attn_mask_target_size=sizes[0]
        )
        predictions_class.append(outputs_class)
        predictions_mask.append(outputs_mask)

        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            output = self.transformer_cross_attention_layers[i](
                output, src[level], memory_mask=attn_mask, pos=pos[level], query_pos=query_pos
            )
            output = self.transformer_self_attention_layers[i](output, query_pos=query_pos)
            output = self.transformer_ffn_layers[i](output)
            # No layer follows the last one, so its attention mask would go unused.
            is_last = i == self.num_layers - 1
            next_size = None if is_last else sizes[(i + 1) % self.num_feature_levels]
            outputs_class, outputs_mask, attn_mask = self.forward_prediction_heads(
                output, mask_features, attn_mask_target_size=next_size
            )
            predictions_class.append(outputs_class)
            predictions_mask.append(outputs_mask)

        out = {"pred_masks": predictions_mask[-1]}
        if self.mask_classification:
            out["pred_logits"] = predictions_class[-1]
        out["aux_outputs"] = self._aux_outputs(predictions_class, predictions_mask)
        return out

    def predict_class(self, decoder_output: Tensor) -> Tensor:
        """
        Class logits of the queries; the one place a continual method's growing classifier hooks
        into (by replacing ``class_embed`` or overriding this method).

        Args:
            decoder_output: (B, Q, C) normalised query features.

        Returns:
            (B, Q, K+1) logits, or None without mask classification.
        """
        if not self.mask_classification:
            return None
        return self.class_embed(decoder_output)

    def forward_prediction_heads(
        self,
        output: Tensor,
        mask_features: Tensor,
        attn_mask_target_size: Optional[Tuple[int, int]],
    ):
        """
        Predict classes, masks and the next layer's attention mask from the query features.

        Args:
            output: (Q, B, C) query features.
            mask_features: (B, mask_dim, H, W).
            attn_mask_target_size: (H_l, W_l) of the level the next layer attends to, or None
                when no layer follows.

        Returns:
            class logits (B, Q, K+1) or None, mask logits (B, Q, H, W), and the attention mask
            (B * nheads, Q, H_l * W_l) bool, True where a query may NOT attend (None without a
            target size).
        """
        decoder_output = self.decoder_norm(output).transpose(0, 1)  # (B, Q, C)
        outputs_class = self.predict_class(decoder_output)
        mask_embed = self.mask_embed(decoder_output)
        outputs_mask = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        attn_mask = None
        if attn_mask_target_size is not None:
            attn_mask = self.attention_mask(outputs_mask, attn_mask_target_size)
        return outputs_class, outputs_mask, attn_mask

    def attention_mask(self, mask_logits: Tensor, size) -> Tensor:
        """
        The masked-attention rule: a query attends only where its predicted mask probability is
        at least 0.5, at the resolution of the level attended next.

        Args:
            mask_logits: (B, Q, H, W) mask logits.
            size: (H_l, W_l).

        Returns:
            (B * nheads, Q, H_l * W_l) bool, True = masked. A query whose mask is empty everywhere
            is allowed to attend everywhere: a fully masked row would make the softmax NaN.
        """
        # The mask only gates the attention; gradients do not flow through it.
        with torch.no_grad():
            logits = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)
            if self.mask_activation == "softmax":
                probs = logits.softmax(dim=1)
            else:
                probs = logits.sigmoid()
            masked = probs.flatten(2) < 0.5  # (B, Q, HW)
            masked[masked.all(dim=-1)] = False
            # nn.MultiheadAttention wants one mask per (image, head), image-major.
            return masked.repeat_interleave(self.num_heads, dim=0)

    def _aux_outputs(
        self, predictions_class: List[Optional[Tensor]], predictions_mask: List[Tensor]
    ) -> List[Dict[str, Tensor]]:
        aux = []
        for logits, masks in zip(predictions_class[:-1], predictions_mask[:-1]):
            entry = {"pred_masks": masks}
            if self.mask_classification:
                entry["pred_logits"] = logits
            aux.append(entry)
        return aux
