"""Pictures of predictions: the image, its ground truth and the prediction side by side, drawn with
detectron2's ``Visualizer`` (class names on the segments), upscaled so that small images and
their labels are readable. In a scenario, old classes (learned before the step) are outlined with a
dashed white line and the step's new classes with a solid yellow one.

Used after every step of a scenario (``OUTPUT_DIR/step<t>/vis``) and by ``tools/predict.py``.
"""

import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..data.scenario import Scenario

__all__ = [
    "vis_metadata",
    "predict_image",
    "read_ground_truth",
    "draw_segmentation",
    "compose_panels",
    "draw_example",
    "visualize_step",
]

# Panels are drawn with their shorter side at least this many pixels (small images are upscaled,
# an integer factor, nearest neighbour: labels must stay on pixel borders) and their longer side at
# most MAX_SIDE (large images are downscaled).
MIN_SIDE = 320
MAX_SIDE = 800
# Outline colours (RGB): old classes dashed white, new classes solid yellow, both over black.
OLD_COLOR = (255, 255, 255)
NEW_COLOR = (255, 215, 0)
_TITLE_HEIGHT = 30
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def vis_metadata(dataset: str):
    """Visualizer metadata of a dataset in Mask2Former's convention: category ids index the full
    class list (``stuff_classes``), things too."""
    from detectron2.data.catalog import Metadata

    meta = MetadataCatalog.get(dataset)
    colors = list(meta.get("stuff_colors", [])) or None
    return Metadata(
        thing_classes=list(meta.stuff_classes),
        stuff_classes=list(meta.stuff_classes),
        thing_colors=colors,
        stuff_colors=colors,
    )


def predict_image(cfg, model, image: np.ndarray) -> Dict:
    """
    The model's output on one image, as detectron2's ``DefaultPredictor`` makes it: resized to the
    test size (INPUT.MIN_SIZE_TEST, MAX_SIZE_TEST), outputs at the image's own size.

    Args:
        cfg: the config (test size).
        model: a model in detectron2's contract (e.g. a ``ContinualModel``), in eval mode.
        image: (H, W, 3) uint8 in cfg.INPUT.FORMAT.
    """
    from detectron2.data import transforms as T

    height, width = image.shape[:2]
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    resized = aug.get_transform(image).apply_image(image)
    tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
    with torch.no_grad():
        return model([{"image": tensor, "height": height, "width": width}])[0]


def read_ground_truth(record: Dict) -> Tuple[str, object]:
    """
    The ground truth of a dataset record: ``("panoptic", (ids (H, W) int64, segments_info))`` when
    it has a panoptic PNG, else ``("semantic", labels (H, W))``, else ``("none", None)``.
    """
    from PIL import Image

    if "pan_seg_file_name" in record:
        from panopticapi.utils import rgb2id

        with Image.open(record["pan_seg_file_name"]) as im:
            ids = rgb2id(np.asarray(im.convert("RGB"))).astype(np.int64)
        return "panoptic", (ids, [dict(s) for s in record["segments_info"]])
    if "sem_seg_file_name" in record:
        with Image.open(record["sem_seg_file_name"]) as im:
            return "semantic", np.asarray(im).astype(np.int64)
    return "none", None


def _panel_scale(height: int, width: int) -> float:
    if min(height, width) < MIN_SIDE:
        return float(math.ceil(MIN_SIDE / min(height, width)))
    if max(height, width) > MAX_SIDE:
        return MAX_SIDE / max(height, width)
    return 1.0


def _resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    rows = (np.arange(height) * array.shape[0] / height).astype(np.int64)
    cols = (np.arange(width) * array.shape[1] / width).astype(np.int64)
    return array[rows][:, cols]


def _draw_outline(canvas: np.ndarray, mask: np.ndarray, color, dashed: bool) -> None:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    for contour in contours:
        pieces = [contour]
        if dashed:  # every other run of 8 boundary pixels
            pieces = [contour[i : i + 8] for i in range(0, len(contour), 16)]
        for piece in pieces:
            cv2.polylines(canvas, [piece], not dashed, (0, 0, 0), 4, cv2.LINE_8)
        for piece in pieces:
            cv2.polylines(canvas, [piece], not dashed, color, 2, cv2.LINE_8)


def draw_segmentation(
    image: np.ndarray,
    kind: str,
    data,
    metadata,
    *,
    shown_classes: Optional[Sequence[int]] = None,
    old_classes: Sequence[int] = (),
    new_classes: Sequence[int] = (),
) -> np.ndarray:
    """
    One panel: a panoptic or semantic segmentation drawn on the image by detectron2's Visualizer,
    at the panel size.

    Args:
        image: (H, W, 3) uint8 RGB, at the panel size.
        kind: "panoptic" (``data`` = (ids, segments_info), category ids contiguous) or
            "semantic" (``data`` = class index per pixel, >= K or 255 void).
        metadata: from :func:`vis_metadata`.
        shown_classes: classes drawn (others are left void, e.g. classes not learned yet); None:
            all.
        old_classes, new_classes: outlined dashed white / solid yellow.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    from detectron2.utils.visualizer import ColorMode, Visualizer

    height, width = image.shape[:2]
    shown = None if shown_classes is None else set(int(c) for c in shown_classes)
    vis = Visualizer(image, metadata, instance_mode=ColorMode.IMAGE)
    masks: List[Tuple[np.ndarray, int]] = []
    if kind == "panoptic":
        ids, segments = data
        ids = _resize_nearest(np.asarray(ids), height, width)
        segments = [s for s in segments if shown is None or s["category_id"] in shown]
        kept = np.isin(ids, [s["id"] for s in segments])
        ids = np.where(kept, ids, 0)
        drawn = vis.draw_panoptic_seg(torch.as_tensor(ids), segments, alpha=0.5)
        masks = [(ids == s["id"], s["category_id"]) for s in segments]
    else:
        labels = _resize_nearest(np.asarray(data), height, width).astype(np.int64)
        num_classes = len(metadata.stuff_classes)
        if shown is not None:
            labels = np.where(np.isin(labels, list(shown)), labels, 255)
        drawn = vis.draw_sem_seg(labels, alpha=0.5)
        masks = [(labels == c, int(c)) for c in np.unique(labels) if c < num_classes]
    canvas = np.ascontiguousarray(drawn.get_image())
    old, new = set(old_classes), set(new_classes)
    for mask, cls in masks:
        if cls in new:
            _draw_outline(canvas, mask, NEW_COLOR, dashed=False)
        elif cls in old:
            _draw_outline(canvas, mask, OLD_COLOR, dashed=True)
    return canvas


def compose_panels(panels: Sequence[Tuple[str, np.ndarray]]) -> np.ndarray:
    """Panels side by side, each under its title, on white; RGB."""
    height = max(p.shape[0] for _, p in panels)
    columns = []
    for title, panel in panels:
        column = np.full((height + _TITLE_HEIGHT, panel.shape[1], 3), 255, np.uint8)
        cv2.putText(column, title, (6, 21), _FONT, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
        column[_TITLE_HEIGHT : _TITLE_HEIGHT + panel.shape[0]] = panel
        columns.append(column)
        columns.append(np.full((height + _TITLE_HEIGHT, 6, 3), 255, np.uint8))
    return np.concatenate(columns[:-1], axis=1)


def _legend_band(width: int, note: str = "") -> np.ndarray:
    """A white band: a dashed white sample "old classes", a solid yellow one "new classes (this
    step)", then ``note``."""
    band = np.full((28, width, 3), 200, np.uint8)
    x = 8
    for label, color, dashed in (
        ("old classes", OLD_COLOR, True),
        ("new classes (this step)", NEW_COLOR, False),
    ):
        cv2.line(band, (x, 14), (x + 32, 14), (0, 0, 0), 4)
        for x0 in range(x, x + 32, 16 if dashed else 32):
            cv2.line(band, (x0, 14), (x0 + (8 if dashed else 32), 14), color, 2)
        x += 40
        cv2.putText(band, label, (x, 19), _FONT, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        x += cv2.getTextSize(label, _FONT, 0.45, 1)[0][0] + 20
    if note:
        cv2.putText(band, note, (x, 19), _FONT, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return band


def draw_example(
    image: np.ndarray,
    prediction: Dict,
    metadata,
    *,
    ground_truth: Tuple[str, object] = ("none", None),
    prediction_title: str = "prediction",
    shown_classes: Optional[Sequence[int]] = None,
    old_classes: Sequence[int] = (),
    new_classes: Sequence[int] = (),
) -> np.ndarray:
    """
    Image, ground truth (when given) and prediction side by side, at a readable size.

    Args:
        image: (H, W, 3) uint8 RGB.
        prediction: the model's output for the image (``panoptic_seg`` drawn if present, else
            the argmax of ``sem_seg``).
        metadata: from :func:`vis_metadata`.
        ground_truth: from :func:`read_ground_truth`.
        prediction_title: the prediction panel's title.
        shown_classes: ground-truth classes drawn (e.g. those learned so far); None: all.
        old_classes, new_classes: outlined in both panels (see :func:`draw_segmentation`).
    """
    height, width = image.shape[:2]
    scale = _panel_scale(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if scale >= 1:
        big = _resize_nearest(image, size[1], size[0])
    else:
        big = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    outlines = dict(old_classes=old_classes, new_classes=new_classes)
    panels = [("image", big)]
    gt_kind, gt = ground_truth
    if gt_kind != "none":
        panels.append(
            ("ground truth", draw_segmentation(
                big, gt_kind, gt, metadata, shown_classes=shown_classes, **outlines))
        )  # fmt: skip
    if "panoptic_seg" in prediction:
        ids, segments = prediction["panoptic_seg"]
        data = (ids.cpu().numpy(), [dict(s) for s in segments])
        drawn = draw_segmentation(big, "panoptic", data, metadata, **outlines)
        if not segments:  # say so, or an empty panel looks like a drawing fault
            prediction_title += ": no segment"
    else:
        labels = prediction["sem_seg"].argmax(0).cpu().numpy()
        drawn = draw_segmentation(big, "semantic", labels, metadata, **outlines)
    panels.append((prediction_title, drawn))
    out = compose_panels(panels)
    if old_classes or new_classes:
        note = "ground truth: classes learned so far" if shown_classes is not None else ""
        out = np.concatenate([out, _legend_band(out.shape[1], note if gt_kind != "none" else "")])
    return out


def visualize_step(cfg, model, scenario: Scenario, step: int, num_images: int) -> List[str]:
    """Draw image, ground truth and the step's prediction for the first ``num_images``
    validation images into ``OUTPUT_DIR/vis``; old and new classes outlined differently."""
    if num_images <= 0:
        return []
    from detectron2.data import detection_utils as utils
    from PIL import Image

    dataset = cfg.DATASETS.TEST[0]
    metadata = vis_metadata(dataset)
    out_dir = os.path.join(cfg.OUTPUT_DIR, "vis")
    os.makedirs(out_dir, exist_ok=True)
    records = DatasetCatalog.get(dataset)[:num_images]
    model = model.module if hasattr(model, "module") else model
    was_training = model.training
    model.eval()
    old = scenario.evaluated_classes(step - 1) if step > 0 else ()
    written = []
    for record in records:
        image = utils.read_image(record["file_name"], format=cfg.INPUT.FORMAT)
        prediction = predict_image(cfg, model, image)
        rgb = utils.convert_image_to_rgb(image, cfg.INPUT.FORMAT)
        picture = draw_example(
            rgb,
            prediction,
            metadata,
            ground_truth=read_ground_truth(record),
            prediction_title=f"prediction, step {step}",
            shown_classes=scenario.evaluated_classes(step),
            old_classes=old,
            new_classes=scenario.steps[step],
        )
        name = os.path.splitext(os.path.basename(record["file_name"]))[0] + ".png"
        path = os.path.join(out_dir, name)
        Image.fromarray(picture).save(path)
        written.append(path)
    model.train(was_training)
    return written
