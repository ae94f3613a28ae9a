"""The Mask2Former-style meta-architecture, registered in detectron2's META_ARCH_REGISTRY.

Shapes: B images, Q queries, K classes (class logits have K+1 entries, the last is no-object),
H W image size, h w mask-feature size (1/4 of the padded image).

``MODEL.MASK_FORMER.PER_PIXEL True`` swaps the transformer decoder and its set criterion for the
per-pixel head and its cross-entropy (``per_pixel.py``); the backbone, pixel decoder, batching and
the model contract stay the same.
"""
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_sem_seg_head
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList

from .backbone.stem import use_channels_last_pool
from .criterion import ClassLoss, SetCriterion
from .inference import (
    CLASS_ACTIVATIONS,
    MASK_ACTIVATIONS,
    instance_inference,
    panoptic_inference,
    semantic_from_segments,
    semantic_inference,
    semantic_inference_with_background,
)
from .per_pixel import (
    PerPixelCriterion,
    PerPixelHead,
    PixelLoss,
    per_pixel_has_no_object,
    per_pixel_targets,
)

__all__ = ["MaskFormer", "build_criterion", "classifier_extra_rows"]


def build_criterion(
    cfg, class_loss: Optional[Union[ClassLoss, PixelLoss]] = None
) -> nn.Module:
    """
    The training criterion of ``cfg``'s model: the set criterion (mask classification), or the
    per-pixel one (``MODEL.MASK_FORMER.PER_PIXEL``).

    Args:
        cfg: the config.
        class_loss: replaces the default classification loss: a :data:`~.criterion.ClassLoss`
            (mask classification) or a :data:`~.per_pixel.PixelLoss` (per-pixel); None: the
            default (Mask2Former's weighted cross-entropy, or the per-pixel cross-entropy).
    """
    if cfg.MODEL.MASK_FORMER.PER_PIXEL:
        return PerPixelCriterion(
            cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            no_object=per_pixel_has_no_object(cfg),
            ignore_value=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            pixel_loss=class_loss,
        )
    return SetCriterion(cfg, class_loss=class_loss)


def classifier_extra_rows(cfg) -> int:
    """Rows of ``cfg``'s classifier besides one per class: the no-object row (mask
    classification always; the per-pixel head on datasets without a background class)."""
    if cfg.MODEL.MASK_FORMER.PER_PIXEL:
        return int(per_pixel_has_no_object(cfg))
    return 1


@META_ARCH_REGISTRY.register()
class MaskFormer(nn.Module):
    """
    Backbone -> pixel decoder -> masked-attention transformer decoder, trained with Hungarian matching.

    Follows detectron2's model contract: ``forward(list[dict])`` returns a dict of weighted losses in
    training, and one dict per image with ``sem_seg`` (K, H, W), ``panoptic_seg``
    ((H, W) int32, segments_info) and/or ``instances`` in inference.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        sem_seg_head: nn.Module,
        criterion: SetCriterion,
        num_queries: int,
        object_mask_threshold: float,
        overlap_threshold: float,
        metadata,
        size_divisibility: int,
        sem_seg_postprocess_before_inference: bool,
        pixel_mean: Tuple[float, ...],
        pixel_std: Tuple[float, ...],
        semantic_on: bool,
        panoptic_on: bool,
        instance_on: bool,
        test_topk_per_image: int,
        mask_activation: str = "sigmoid",
        class_activation: str = "softmax",
        semantic_background_class: int = -1,
        per_pixel: bool = False,
        ignore_value: int = 255,
    ):
        """
        Args:
            backbone: detectron2 backbone.
            sem_seg_head: module returning the prediction dict (see ``MaskFormerHead``).
            criterion: the set criterion; its ``weight_dict`` weights the losses.
            num_queries: Q.
            object_mask_threshold, overlap_threshold: panoptic inference thresholds.
            metadata: dataset metadata; ``thing_dataset_id_to_contiguous_id`` tells things from stuff.
            size_divisibility: pad images to a multiple of this; < 0: the backbone's; 0: no padding
                beyond what the backbone needs (Mask2Former's meanings).
            sem_seg_postprocess_before_inference: resize masks to the output size before semantic
                inference (needed for panoptic / instance outputs anyway).
            pixel_mean, pixel_std: per-channel normalisation of the input image.
            semantic_on, panoptic_on, instance_on: which outputs inference produces.
            test_topk_per_image: instances kept per image.
            mask_activation: "sigmoid" or "softmax" (across queries) at inference.
            class_activation: class scores at inference: "softmax" (Mask2Former) or "sigmoid" per
                logit (ECLIPSE); with "sigmoid", semantic inference gives each pixel the class of
                the panoptic-style segment covering it (``semantic_from_segments``), as ECLIPSE's
                code does, since summing sigmoid scores would ignore the no-object logit.
            semantic_background_class: -1: Mask2Former's semantic inference (class times mask
                probabilities summed over queries); c >= 0: the dataset has a background class c
                that the model does not predict (it is no-object): pixels take the class of the
                panoptic-style segment covering them, the others c
                (:func:`semantic_inference_with_background`, as CoMFormer's code on such data).
            per_pixel: ``sem_seg_head`` is a :class:`~.per_pixel.PerPixelHead` and ``criterion`` a
                :class:`~.per_pixel.PerPixelCriterion`: per-pixel training targets from the inputs'
                ``sem_seg``, semantic inference only.
            ignore_value: label of ignored pixels in ``sem_seg`` (per-pixel training).
        """
        super().__init__()
        if mask_activation not in MASK_ACTIVATIONS:
            raise ValueError(
                f"MODEL.MASK_FORMER.MASK_ACTIVATION={mask_activation!r}; valid: {MASK_ACTIVATIONS}"
            )
        if class_activation not in CLASS_ACTIVATIONS:
            raise ValueError(
                f"MODEL.MASK_FORMER.CLASS_ACTIVATION={class_activation!r}; valid: "
                f"{CLASS_ACTIVATIONS}"
            )
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion
        self.num_queries = num_queries
        self.overlap_threshold = overlap_threshold
        self.object_mask_threshold = object_mask_threshold
        self.metadata = metadata
        if size_divisibility < 0:
            size_divisibility = self.backbone.size_divisibility
        self.size_divisibility = size_divisibility
        self.sem_seg_postprocess_before_inference = sem_seg_postprocess_before_inference
        # Not persistent: Mask2Former checkpoints do not carry them, and configs set them.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.semantic_on = semantic_on
        self.instance_on = instance_on
        self.panoptic_on = panoptic_on
        self.test_topk_per_image = test_topk_per_image
        self.mask_activation = mask_activation
        self.class_activation = class_activation
        self.semantic_background_class = semantic_background_class
        if semantic_background_class >= 0 or class_activation == "sigmoid":
            # segments need full-resolution masks
            self.sem_seg_postprocess_before_inference = True
        self.per_pixel = bool(per_pixel)
        self.ignore_value = ignore_value
        if self.per_pixel and (self.panoptic_on or self.instance_on or not self.semantic_on):
            raise ValueError(
                "MODEL.MASK_FORMER.PER_PIXEL: the per-pixel head predicts semantic segmentation "
                "only; set MODEL.MASK_FORMER.TEST.SEMANTIC_ON True and PANOPTIC_ON, INSTANCE_ON "
                "False"
            )
        if not self.semantic_on and (self.panoptic_on or self.instance_on):
            # panoptic/instance inference needs full-resolution masks
            self.sem_seg_postprocess_before_inference = True

    @classmethod
    def from_config(cls, cfg):
        backbone = use_channels_last_pool(build_backbone(cfg))
        mf = cfg.MODEL.MASK_FORMER
        if mf.PER_PIXEL:
            # MODEL.SEM_SEG_HEAD.NAME names the mask-classification head; the switch replaces it.
            sem_seg_head = PerPixelHead(cfg, backbone.output_shape())
        else:
            sem_seg_head = build_sem_seg_head(cfg, backbone.output_shape())
        return {
            "backbone": backbone,
            "sem_seg_head": sem_seg_head,
            "criterion": build_criterion(cfg),
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "object_mask_threshold": mf.TEST.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": mf.TEST.OVERLAP_THRESHOLD,
            "metadata": MetadataCatalog.get(cfg.DATASETS.TRAIN[0]) if cfg.DATASETS.TRAIN else None,
            "size_divisibility": mf.SIZE_DIVISIBILITY,
            "sem_seg_postprocess_before_inference": (
                mf.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE
                or mf.TEST.PANOPTIC_ON
                or mf.TEST.INSTANCE_ON
            ),
            "pixel_mean": tuple(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": tuple(cfg.MODEL.PIXEL_STD),
            "semantic_on": mf.TEST.SEMANTIC_ON,
            "instance_on": mf.TEST.INSTANCE_ON,
            "panoptic_on": mf.TEST.PANOPTIC_ON,
            "test_topk_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "mask_activation": mf.MASK_ACTIVATION,
            "class_activation": mf.CLASS_ACTIVATION,
            "semantic_background_class": mf.TEST.SEMANTIC_BACKGROUND_CLASS,
            "per_pixel": mf.PER_PIXEL,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        }

    @property
    def num_classes(self) -> int:
        """Classes the classifier predicts (no-object excluded)."""
        return self.criterion.num_classes

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def thing_ids(self) -> set:
        if self.metadata is None:
            return set()
        return set(getattr(self.metadata, "thing_dataset_id_to_contiguous_id", {}).values())

    def preprocess_images(self, batched_inputs: List[Dict]) -> ImageList:
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images, self.size_divisibility)

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: a list of dataset-mapper outputs, each with ``image`` (C, H, W) and in
                training ``instances`` (gt_classes, gt_masks); optional ``height``/``width`` give the
                output resolution in inference.
        Returns:
            training: dict of weighted losses; inference: list of dicts (see the class docstring).
        """
        images = self.preprocess_images(batched_inputs)
        _, outputs = self.predict(images)
        if self.training:
            targets = self.prepare_targets(batched_inputs, images)
            return self.weighted_losses(self.criterion(outputs, targets))
        return self.inference(outputs, batched_inputs, images)

    def predict(self, images: ImageList):
        """Backbone features and the raw prediction dict for already normalised, padded images."""
        features = self.backbone(images.tensor)
        return features, self.sem_seg_head(features)

    def weighted_losses(self, losses: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Multiply each loss of :attr:`criterion` by its weight; losses without a weight are not
        optimised."""
        weight_dict = self.criterion.weight_dict
        return {k: v * weight_dict[k] for k, v in losses.items() if k in weight_dict}

    def prepare_targets(self, batched_inputs: List[Dict], images: ImageList):
        """
        Mask classification: ground truth per image, labels (N,) and masks (N, H_pad, W_pad)
        padded like the image. Per-pixel: ``{"sem_seg": (B, H_pad, W_pad)}`` the labels of each
        pixel (see :func:`~.per_pixel.per_pixel_targets`).
        """
        h_pad, w_pad = images.tensor.shape[-2:]
        if self.per_pixel:
            missing = [i for i, x in enumerate(batched_inputs) if "sem_seg" not in x]
            if missing:
                raise KeyError(
                    "per-pixel training needs 'sem_seg' label maps in the inputs (the semantic "
                    f"mapper's); inputs {missing[:5]} have none"
                )
            labels = per_pixel_targets(
                [x["sem_seg"] for x in batched_inputs],
                images.image_sizes,
                (h_pad, w_pad),
                num_classes=self.num_classes,
                no_object=self.sem_seg_head.no_object,
                ignore_value=self.ignore_value,
                device=self.device,
            )
            return {"sem_seg": labels}
        targets = []
        for x in batched_inputs:
            if "instances" not in x:
                raise KeyError(
                    "training inputs need 'instances' (gt_classes, gt_masks); the dataset mapper "
                    "did not produce them"
                )
            inst = x["instances"].to(self.device)
            gt_masks = inst.gt_masks
            if hasattr(gt_masks, "tensor"):  # BitMasks
                gt_masks = gt_masks.tensor
            padded = gt_masks.new_zeros((gt_masks.shape[0], h_pad, w_pad))
            padded[:, : gt_masks.shape[1], : gt_masks.shape[2]] = gt_masks
            targets.append({"labels": inst.gt_classes, "masks": padded})
        return targets

    def inference(self, outputs: Dict, batched_inputs: List[Dict], images: ImageList) -> List[Dict]:
        """
        Per-image results (see the class docstring) from the prediction dict; the class entries
        of ``outputs["pred_logits"]`` are the output classes of ``sem_seg`` and the category ids
        of the panoptic and instance results. Per-pixel: ``sem_seg`` only, the softmax of
        ``outputs["sem_logits"]`` without the no-object channel.
        """
        if self.per_pixel:
            return self._per_pixel_inference(outputs["sem_logits"], batched_inputs, images)
        mask_cls_results = outputs["pred_logits"]
        # upsample the 1/4-resolution masks to the padded input size
        mask_pred_results = F.interpolate(
            outputs["pred_masks"],
            size=images.tensor.shape[-2:],
            mode="bilinear",
            align_corners=False,
        )
        processed = []
        for mask_cls, mask_pred, x, image_size in zip(
            mask_cls_results, mask_pred_results, batched_inputs, images.image_sizes
        ):
            height = x.get("height", image_size[0])
            width = x.get("width", image_size[1])
            result: Dict = {}
            if self.sem_seg_postprocess_before_inference:
                mask_pred = sem_seg_postprocess(mask_pred, image_size, height, width)
                mask_cls = mask_cls.to(mask_pred)

            if self.semantic_on and self.semantic_background_class >= 0:
                sem_seg = semantic_inference_with_background(
                    mask_cls,
                    mask_pred,
                    background_class=self.semantic_background_class,
                    object_mask_threshold=self.object_mask_threshold,
                    overlap_threshold=self.overlap_threshold,
                    mask_activation=self.mask_activation,
                    class_activation=self.class_activation,
                )
                result["sem_seg"] = sem_seg
            elif self.semantic_on and self.class_activation == "sigmoid":
                result["sem_seg"] = semantic_from_segments(
                    mask_cls,
                    mask_pred,
                    object_mask_threshold=self.object_mask_threshold,
                    overlap_threshold=self.overlap_threshold,
                    mask_activation=self.mask_activation,
                    class_activation=self.class_activation,
                )
            elif self.semantic_on:
                sem_seg = semantic_inference(mask_cls, mask_pred, self.mask_activation)
                if not self.sem_seg_postprocess_before_inference:
                    sem_seg = sem_seg_postprocess(sem_seg, image_size, height, width)
                result["sem_seg"] = sem_seg
            if self.panoptic_on:
                result["panoptic_seg"] = panoptic_inference(
                    mask_cls,
                    mask_pred,
                    thing_ids=self.thing_ids,
                    object_mask_threshold=self.object_mask_threshold,
                    overlap_threshold=self.overlap_threshold,
                    mask_activation=self.mask_activation,
                    class_activation=self.class_activation,
                )
            if self.instance_on:
                result["instances"] = instance_inference(
                    mask_cls,
                    mask_pred,
                    image_size=(height, width),
                    topk=self.test_topk_per_image,
                    thing_ids=self.thing_ids,
                    panoptic_on=self.panoptic_on,
                    mask_activation=self.mask_activation,
                    class_activation=self.class_activation,
                )
            processed.append(result)
        return processed

    def _per_pixel_inference(
        self, sem_logits: torch.Tensor, batched_inputs: List[Dict], images: ImageList
    ) -> List[Dict]:
        logits = F.interpolate(
            sem_logits, size=images.tensor.shape[-2:], mode="bilinear", align_corners=False
        )
        num_classes = self.num_classes
        processed = []
        for logit, x, image_size in zip(logits, batched_inputs, images.image_sizes):
            height = x.get("height", image_size[0])
            width = x.get("width", image_size[1])
            logit = sem_seg_postprocess(logit, image_size, height, width)
            processed.append({"sem_seg": logit.softmax(dim=0)[:num_classes]})
        return processed
