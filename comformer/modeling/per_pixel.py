"""The per-pixel head: a 1x1 classifier on the pixel decoder's mask features, trained with a
per-pixel cross-entropy (``MODEL.MASK_FORMER.PER_PIXEL True``).

This is the per-pixel architecture the CoMFormer paper uses as the home of MiB and PLOP on semantic
segmentation (both methods were written for per-pixel classifiers, DeepLab-v3 in their papers):
the backbone and pixel decoder of Mask2Former, no transformer decoder, and MaskFormer's
``PerPixelBaselineHead`` on top (one 1x1 convolution over the mask features).

Shapes: B images, C the classifier's channels, H W the padded image size, h w the mask-feature
size (H / 4, W / 4).

Class layout (channels). The classifier has one channel per class of the model
(``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` = K, in the model's order), and:

* on a dataset with a background class (metadata ``background_class``, e.g. Pascal VOC's class 0)
  nothing else: the background is a class of the model like any other (C = K), and a pixel's target
  is its label; void pixels (the ignore value, 255) are ignored;
* on a dataset without one (ADE20K, COCO, the synthetic sets) one more channel, last (C = K + 1):
  "no-object", the target of every pixel of the image that no class covers (void, and in a
  continual step the classes of other steps). This is MiB's treatment of ADE20K, whose unlabelled
  pixels are its background class, and the mask classifier's layout [classes, no-object]; the
  continual layer grows both classifiers the same way (new rows before the last). Only the padding
  added to batch the images is ignored. The labels of ``sem_seg`` are the dataset mapper's, so a
  mapper that pads label maps (``INPUT.SIZE_DIVISIBILITY`` > 0) makes its padding no-object too:
  per-pixel configs on such datasets leave it at -1.

Inference gives detectron2's ``sem_seg`` (K, H, W): the softmax over the C channels at full
resolution, without the no-object channel.
"""

from typing import Callable, Dict, Optional

import fvcore.nn.weight_init as weight_init
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.layers import Conv2d, ShapeSpec

from .pixel_decoder import build_pixel_decoder

__all__ = [
    "PerPixelHead",
    "PerPixelCriterion",
    "PixelLoss",
    "per_pixel_has_no_object",
    "per_pixel_targets",
    "pixel_cross_entropy",
    "upsample_logits",
]

# A per-pixel classification loss: (logits (B, C, H, W), labels (B, H, W) int64 with the ignore
# value on ignored pixels) -> (B, H, W) loss of each pixel, 0 on ignored pixels.
PixelLoss = Callable[[Tensor, Tensor], Tensor]


def per_pixel_has_no_object(cfg) -> bool:
    """Whether the per-pixel classifier of ``cfg`` has the extra no-object channel: when the
    training dataset (``DATASETS.TRAIN[0]``) has no background class (see the module docstring)."""
    if not cfg.DATASETS.TRAIN:
        return True
    return int(MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("background_class", -1)) < 0


def upsample_logits(logits: Tensor, size) -> Tensor:
    """Per-pixel logits (B, C, h, w) -> (B, C, H, W), bilinearly, as MiB and PLOP upsample their
    DeepLab logits to the input size before every loss."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def pixel_cross_entropy(logits: Tensor, labels: Tensor, ignore_value: int = 255) -> Tensor:
    """The cross-entropy of each pixel, (B, H, W), 0 on ignored pixels."""
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_value, reduction="none")


class PerPixelHead(nn.Module):
    """
    Pixel decoder + a 1x1 convolution predicting C channels per pixel (see the module docstring).

    Module names: ``pixel_decoder`` (as ``MaskFormerHead``'s) and ``predictor`` (the classifier,
    ``sem_seg_head.predictor.weight`` (C, MASK_DIM, 1, 1) and ``.bias`` (C,) in the model).
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        no_object: bool,
        pixel_decoder: nn.Module,
        mask_dim: int,
    ):
        """
        Args:
            input_shape: backbone output shapes, by feature name.
            num_classes: K, the classes of the model.
            no_object: add the no-object channel (C = K + 1), else C = K.
            pixel_decoder: module with ``forward_features(features)`` returning
                ``(mask_features, _, _)``, mask features (B, mask_dim, h, w).
            mask_dim: channels of the mask features.
        """
        super().__init__()
        self.in_features = sorted(input_shape, key=lambda k: input_shape[k].stride)
        self.num_classes = num_classes
        self.no_object = bool(no_object)
        self.pixel_decoder = pixel_decoder
        self.predictor = Conv2d(mask_dim, num_classes + int(no_object), kernel_size=1)
        weight_init.c2_msra_fill(self.predictor)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        in_features = cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES
        input_shape = {k: v for k, v in input_shape.items() if k in in_features}
        return {
            "input_shape": input_shape,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "no_object": per_pixel_has_no_object(cfg),
            "pixel_decoder": build_pixel_decoder(cfg, input_shape),
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
        }

    def forward(self, features: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """
        Returns:
            {"sem_logits": (B, C, h, w) per-pixel logits, "mask_features": (B, MASK_DIM, h, w) the
            features they are computed from (continual methods distil them)}.
        """
        mask_features, _, _ = self.pixel_decoder.forward_features(features)
        return {"sem_logits": self.predictor(mask_features), "mask_features": mask_features}


class PerPixelCriterion(nn.Module):
    """
    ``loss_ce``: the per-pixel classification loss of the logits upsampled to the targets' size,
    summed over pixels and divided by the number of pixels of the batch, B x H x W, ignored pixels
    included. That is MiB's and PLOP's normalisation (``reduction='none'`` and then ``.mean()``
    in their ``train.py``), not torch's ``reduction='mean'``, which divides by the labelled pixels.

    Targets: ``{"sem_seg": (B, H, W) int64 labels}`` (channel indices, the ignore value on ignored
    pixels) and optionally ``"pixel_weight"``, a tensor broadcastable to (B, H, W) multiplying each
    pixel's loss before the mean (PLOP's adaptive factor is one per image, (B, 1, 1)).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        no_object: bool,
        ignore_value: int = 255,
        weight: float = 1.0,
        pixel_loss: Optional[PixelLoss] = None,
    ):
        """
        Args:
            num_classes: K, the classes of the model (C = K + no_object channels).
            no_object: whether the classifier has the no-object channel.
            ignore_value: label of ignored pixels.
            weight: weight of ``loss_ce`` in :attr:`weight_dict` (1, as MiB and PLOP).
            pixel_loss: the loss of each pixel (:data:`PixelLoss`); None: the cross-entropy.
        """
        super().__init__()
        self.num_classes = num_classes
        self.no_object = bool(no_object)
        self.ignore_value = ignore_value
        self.weight_dict = {"loss_ce": float(weight)}
        self.pixel_loss = pixel_loss

    @property
    def num_channels(self) -> int:
        return self.num_classes + int(self.no_object)

    def forward(self, outputs: Dict[str, Tensor], targets: Dict[str, Tensor]) -> Dict[str, Tensor]:
        labels = targets["sem_seg"]
        logits = upsample_logits(outputs["sem_logits"], labels.shape[-2:]).float()
        if logits.shape[1] != self.num_channels:
            raise ValueError(
                f"per-pixel logits have {logits.shape[1]} channels, the criterion expects "
                f"{self.num_channels} ({self.num_classes} classes"
                + (" + no-object)" if self.no_object else ")")
            )
        if self.pixel_loss is None:
            per_pixel = pixel_cross_entropy(logits, labels, self.ignore_value)
        else:
            per_pixel = self.pixel_loss(logits, labels)
        weight = targets.get("pixel_weight")
        if weight is not None:
            per_pixel = per_pixel * weight
        return {"loss_ce": per_pixel.mean()}

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, no_object={self.no_object}, "
            f"pixel_loss={self.pixel_loss!r}"
        )


def per_pixel_targets(
    sem_segs,
    image_sizes,
    padded_size,
    *,
    num_classes: int,
    no_object: bool,
    ignore_value: int,
    device=None,
) -> Tensor:
    """
    The per-pixel training labels of a batch.

    Args:
        sem_segs: B label maps (H_b, W_b) int64 (the mapper's ``sem_seg``, model indices).
        image_sizes: B (h_b, w_b), each image's size inside the padded batch.
        padded_size: (H, W) of the padded batch.
        num_classes: K; the no-object channel is K.
        no_object: ignored pixels inside the image become K (see the module docstring).
        ignore_value: the label of ignored pixels.
        device: where the result goes (the labels are checked where they are, on the host for
            the mapper's).

    Returns:
        (B, H, W) int64; the batch padding is ``ignore_value``.
    """
    height, width = padded_size
    out = []
    for sem_seg, (h, w) in zip(sem_segs, image_sizes):
        labels = torch.full((height, width), ignore_value, dtype=torch.int64, device=sem_seg.device)
        labels[: sem_seg.shape[0], : sem_seg.shape[1]] = sem_seg
        if no_object:
            inside = labels[:h, :w]
            inside[inside == ignore_value] = num_classes
        bad = (labels != ignore_value) & ((labels < 0) | (labels >= num_classes + int(no_object)))
        if bad.any():
            raise ValueError(
                f"sem_seg holds labels {sorted(set(labels[bad].tolist()))[:10]} outside the "
                f"model's {num_classes} classes"
            )
        out.append(labels)
    batch = torch.stack(out)
    return batch if device is None else batch.to(device)
