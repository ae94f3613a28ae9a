"""Evaluators chosen by a dataset's ``evaluator_type`` through a registry, not an if/elif ladder."""

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOPanopticEvaluator, DatasetEvaluators, SemSegEvaluator
from detectron2.utils.registry import Registry

__all__ = ["EVALUATOR_REGISTRY", "build_evaluator"]

EVALUATOR_REGISTRY = Registry("EVALUATOR")
EVALUATOR_REGISTRY.__doc__ = """
Evaluator builders, keyed by a dataset's ``evaluator_type`` metadata. A member is a function called
as ``fn(cfg, dataset_name, output_folder)`` that returns a list of detectron2 DatasetEvaluator.
"""


# Members are named after the evaluator_type they serve (fvcore registers a function by its name).
@EVALUATOR_REGISTRY.register()
def sem_seg(cfg, dataset_name, output_folder):
    return [SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder)]


@EVALUATOR_REGISTRY.register()
def coco_panoptic_seg(cfg, dataset_name, output_folder):
    evaluators = []
    if cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON:
        evaluators.append(COCOPanopticEvaluator(dataset_name, output_folder))
    # mIoU as well, from the semantic output, when the dataset carries semantic label maps
    if cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON:
        evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
    return evaluators


def build_evaluator(cfg, dataset_name: str, output_folder: str) -> DatasetEvaluators:
    """
    Args:
        cfg: the config (which outputs the model produces decides which metrics are computed).
        dataset_name: a registered dataset; its metadata ``evaluator_type`` picks the builder.
        output_folder: where evaluators may write files.
    Returns:
        the evaluators, combined.
    """
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    if evaluator_type not in EVALUATOR_REGISTRY:
        raise KeyError(
            f"dataset {dataset_name!r} has evaluator_type={evaluator_type!r}, which has no evaluator; "
            f"known: {sorted(EVALUATOR_REGISTRY._obj_map)}"
        )
    evaluators = EVALUATOR_REGISTRY.get(evaluator_type)(cfg, dataset_name, output_folder)
    if not evaluators:
        raise ValueError(
            f"no evaluator for {dataset_name!r}: the model produces none of the outputs it needs "
            "(set MODEL.MASK_FORMER.TEST.PANOPTIC_ON / SEMANTIC_ON)"
        )
    return DatasetEvaluators(evaluators)
