"""Pictures of a step's predictions on validation images (``OUTPUT_DIR/step<t>/vis``)."""

import os
from typing import List

import numpy as np
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..data.scenario import Scenario

__all__ = ["visualize_step"]


def visualize_step(cfg, model, scenario: Scenario, step: int, num_images: int) -> List[str]:
    """Draw the step's predictions on the first ``num_images`` validation images."""
    if num_images <= 0:
        return []
    from detectron2.data import detection_utils as utils
    from detectron2.data.catalog import Metadata
    from detectron2.utils.visualizer import ColorMode, Visualizer

    dataset = cfg.DATASETS.TEST[0]
    meta = MetadataCatalog.get(dataset)
    # Mask2Former's convention: category ids index the full class list (stuff_classes), things too.
    vis_meta = Metadata(
        thing_classes=list(meta.stuff_classes),
        stuff_classes=list(meta.stuff_classes),
        thing_colors=list(meta.get("stuff_colors", [])) or None,
        stuff_colors=list(meta.get("stuff_colors", [])) or None,
    )
    out_dir = os.path.join(cfg.OUTPUT_DIR, "vis")
    os.makedirs(out_dir, exist_ok=True)
    records = DatasetCatalog.get(dataset)[:num_images]
    model = model.module if hasattr(model, "module") else model
    was_training = model.training
    model.eval()
    written = []
    with torch.no_grad():
        for record in records:
            image = utils.read_image(record["file_name"], format=cfg.INPUT.FORMAT)
            tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
            pred = model([{"image": tensor, "height": image.shape[0], "width": image.shape[1]}])[0]
            vis = Visualizer(image, vis_meta, instance_mode=ColorMode.IMAGE)
            if "panoptic_seg" in pred:
                seg, info = pred["panoptic_seg"]
                drawn = vis.draw_panoptic_seg(seg.cpu(), info)
            else:
                drawn = vis.draw_sem_seg(pred["sem_seg"].argmax(0).cpu())
            name = os.path.splitext(os.path.basename(record["file_name"]))[0] + ".png"
            path = os.path.join(out_dir, name)
            drawn.save(path)
            written.append(path)
    model.train(was_training)
    return written
