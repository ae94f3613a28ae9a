"""Per-setting defaults of the methods' hyper-parameters, as the public scripts set them.

A config value of -1 for one of the keys below means "the value of this setting": dataset family
(the registered name's first word: ``ade20k``, ``coco``, ``voc``, ``synthetic``), kind (panoptic or
semantic, from the dataset's ``evaluator_type``) and task. A setting without a row takes the key's
fallback. The README's "Per-setting defaults" table lists the same rows (a test compares them).
"""
from dataclasses import dataclass
from typing import Dict, Tuple

from detectron2.data import MetadataCatalog

__all__ = [
    "SettingDefault",
    "SETTING_DEFAULTS",
    "FALLBACKS",
    "setting_of",
    "setting_default",
    "setting_value",
]


@dataclass(frozen=True)
class SettingDefault:
    key: str  # config key
    dataset: str  # dataset family
    kind: str  # "panoptic" or "semantic"
    task: str  # CONT.TASK
    value: float
    source: str  # where the value comes from


_COMFORMER_SCRIPTS = "fcdl94/CoMFormer scripts/{} (CONT.DIST.KD_WEIGHT)"
# The evaluation section's deltas for BASE_DELTA / INC_DELTA (the base group's, the increments').
_ECLIPSE_SCRIPTS = "clovaai/ECLIPSE script/{}:{} ({})"

SETTING_DEFAULTS: Tuple[SettingDefault, ...] = (
    SettingDefault("CONT.COMFORMER.KD_WEIGHT", "ade20k", "semantic", "100-50", 0.5, _COMFORMER_SCRIPTS.format("ade.sh")),
    SettingDefault("CONT.COMFORMER.KD_WEIGHT", "ade20k", "semantic", "100-10", 10.0, _COMFORMER_SCRIPTS.format("ade10.sh")),
    SettingDefault("CONT.COMFORMER.KD_WEIGHT", "ade20k", "semantic", "100-5", 10.0, _COMFORMER_SCRIPTS.format("ade5.sh")),
    SettingDefault("CONT.COMFORMER.KD_WEIGHT", "ade20k", "panoptic", "100-50", 5.0, _COMFORMER_SCRIPTS.format("adps.sh")),
    SettingDefault("CONT.COMFORMER.KD_WEIGHT", "ade20k", "panoptic", "100-10", 10.0, _COMFORMER_SCRIPTS.format("adps10.sh")),
    SettingDefault("CONT.COMFORMER.KD_WEIGHT", "ade20k", "panoptic", "100-5", 10.0, _COMFORMER_SCRIPTS.format("adps5.sh")),
    SettingDefault("CONT.ECLIPSE.NUM_PROMPTS", "ade20k", "panoptic", "100-10", 10.0, _ECLIPSE_SCRIPTS.format("ade_ps/100_10.sh", 42, "num_prompts")),
    SettingDefault("CONT.ECLIPSE.NUM_PROMPTS", "ade20k", "panoptic", "100-5", 10.0, _ECLIPSE_SCRIPTS.format("ade_ps/100_5.sh", 43, "num_prompts")),
    SettingDefault("CONT.ECLIPSE.NUM_PROMPTS", "ade20k", "panoptic", "100-50", 50.0, _ECLIPSE_SCRIPTS.format("ade_ps/100_50.sh", 43, "num_prompts")),
    SettingDefault("CONT.ECLIPSE.NUM_PROMPTS", "ade20k", "panoptic", "50-10", 10.0, _ECLIPSE_SCRIPTS.format("ade_ps/50_10.sh", 43, "num_prompts")),
    SettingDefault("CONT.ECLIPSE.NUM_PROMPTS", "ade20k", "panoptic", "50-20", 20.0, _ECLIPSE_SCRIPTS.format("ade_ps/50_20.sh", 43, "num_prompts")),
    SettingDefault("CONT.ECLIPSE.NUM_PROMPTS", "ade20k", "panoptic", "50-50", 50.0, _ECLIPSE_SCRIPTS.format("ade_ps/50_50.sh", 43, "num_prompts")),
    SettingDefault("CONT.ECLIPSE.NUM_PROMPTS", "ade20k", "semantic", "100-10", 10.0, _ECLIPSE_SCRIPTS.format("ade_ss/100_10.sh", 43, "num_prompts")),
    SettingDefault("CONT.ECLIPSE.NUM_PROMPTS", "ade20k", "semantic", "100-5", 5.0, _ECLIPSE_SCRIPTS.format("ade_ss/100_5.sh", 43, "num_prompts")),
    SettingDefault("CONT.ECLIPSE.NUM_PROMPTS", "ade20k", "semantic", "100-50", 50.0, _ECLIPSE_SCRIPTS.format("ade_ss/100_50.sh", 43, "num_prompts")),
    SettingDefault("CONT.ECLIPSE.NUM_PROMPTS", "coco", "panoptic", "83-10", 10.0, _ECLIPSE_SCRIPTS.format("coco_ps/83_10.sh", 42, "num_prompts")),
    SettingDefault("CONT.ECLIPSE.NUM_PROMPTS", "coco", "panoptic", "83-5", 10.0, _ECLIPSE_SCRIPTS.format("coco_ps/83_5.sh", 42, "num_prompts")),
    SettingDefault("CONT.ECLIPSE.INC_MAX_ITER", "ade20k", "panoptic", "100-10", 16000.0, _ECLIPSE_SCRIPTS.format("ade_ps/100_10.sh", 44, "iter")),
    SettingDefault("CONT.ECLIPSE.INC_MAX_ITER", "ade20k", "panoptic", "100-5", 12000.0, _ECLIPSE_SCRIPTS.format("ade_ps/100_5.sh", 45, "iter")),
    SettingDefault("CONT.ECLIPSE.INC_MAX_ITER", "ade20k", "panoptic", "100-50", 80000.0, _ECLIPSE_SCRIPTS.format("ade_ps/100_50.sh", 45, "iter")),
    SettingDefault("CONT.ECLIPSE.INC_MAX_ITER", "ade20k", "panoptic", "50-10", 24000.0, _ECLIPSE_SCRIPTS.format("ade_ps/50_10.sh", 45, "iter")),
    SettingDefault("CONT.ECLIPSE.INC_MAX_ITER", "ade20k", "panoptic", "50-20", 32000.0, _ECLIPSE_SCRIPTS.format("ade_ps/50_20.sh", 45, "iter")),
    SettingDefault("CONT.ECLIPSE.INC_MAX_ITER", "ade20k", "panoptic", "50-50", 120000.0, _ECLIPSE_SCRIPTS.format("ade_ps/50_50.sh", 45, "iter")),
    SettingDefault("CONT.ECLIPSE.INC_MAX_ITER", "ade20k", "semantic", "100-10", 24000.0, _ECLIPSE_SCRIPTS.format("ade_ss/100_10.sh", 45, "iter")),
    SettingDefault("CONT.ECLIPSE.INC_MAX_ITER", "ade20k", "semantic", "100-5", 12000.0, _ECLIPSE_SCRIPTS.format("ade_ss/100_5.sh", 45, "iter")),
    SettingDefault("CONT.ECLIPSE.INC_MAX_ITER", "ade20k", "semantic", "100-50", 120000.0, _ECLIPSE_SCRIPTS.format("ade_ss/100_50.sh", 45, "iter")),
    SettingDefault("CONT.ECLIPSE.INC_MAX_ITER", "coco", "panoptic", "83-10", 32000.0, _ECLIPSE_SCRIPTS.format("coco_ps/83_10.sh", 44, "iter")),
    SettingDefault("CONT.ECLIPSE.INC_MAX_ITER", "coco", "panoptic", "83-5", 8000.0, _ECLIPSE_SCRIPTS.format("coco_ps/83_5.sh", 44, "iter")),
    SettingDefault("CONT.ECLIPSE.INC_BASE_LR", "ade20k", "panoptic", "100-10", 0.0005, _ECLIPSE_SCRIPTS.format("ade_ps/100_10.sh", 45, "base_lr")),
    SettingDefault("CONT.ECLIPSE.INC_BASE_LR", "ade20k", "panoptic", "100-5", 0.0005, _ECLIPSE_SCRIPTS.format("ade_ps/100_5.sh", 46, "base_lr")),
    SettingDefault("CONT.ECLIPSE.INC_BASE_LR", "ade20k", "panoptic", "100-50", 0.0005, _ECLIPSE_SCRIPTS.format("ade_ps/100_50.sh", 46, "base_lr")),
    SettingDefault("CONT.ECLIPSE.INC_BASE_LR", "ade20k", "panoptic", "50-10", 0.0005, _ECLIPSE_SCRIPTS.format("ade_ps/50_10.sh", 46, "base_lr")),
    SettingDefault("CONT.ECLIPSE.INC_BASE_LR", "ade20k", "panoptic", "50-20", 0.0005, _ECLIPSE_SCRIPTS.format("ade_ps/50_20.sh", 46, "base_lr")),
    SettingDefault("CONT.ECLIPSE.INC_BASE_LR", "ade20k", "panoptic", "50-50", 0.0005, _ECLIPSE_SCRIPTS.format("ade_ps/50_50.sh", 46, "base_lr")),
    SettingDefault("CONT.ECLIPSE.INC_BASE_LR", "ade20k", "semantic", "100-10", 0.001, _ECLIPSE_SCRIPTS.format("ade_ss/100_10.sh", 46, "base_lr")),
    SettingDefault("CONT.ECLIPSE.INC_BASE_LR", "ade20k", "semantic", "100-5", 0.001, _ECLIPSE_SCRIPTS.format("ade_ss/100_5.sh", 46, "base_lr")),
    SettingDefault("CONT.ECLIPSE.INC_BASE_LR", "ade20k", "semantic", "100-50", 0.001, _ECLIPSE_SCRIPTS.format("ade_ss/100_50.sh", 46, "base_lr")),
    SettingDefault("CONT.ECLIPSE.INC_BASE_LR", "coco", "panoptic", "83-10", 0.0005, _ECLIPSE_SCRIPTS.format("coco_ps/83_10.sh", 45, "base_lr")),
    SettingDefault("CONT.ECLIPSE.INC_BASE_LR", "coco", "panoptic", "83-5", 0.0005, _ECLIPSE_SCRIPTS.format("coco_ps/83_5.sh", 45, "base_lr")),
    SettingDefault("CONT.ECLIPSE.LOGIT_DELTAS[0]", "ade20k", "panoptic", "100-10", 0.4, _ECLIPSE_SCRIPTS.format("ade_ps/100_10.sh", 85, "deltas[0]")),
    SettingDefault("CONT.ECLIPSE.LOGIT_DELTAS[0]", "ade20k", "panoptic", "100-5", 0.4, _ECLIPSE_SCRIPTS.format("ade_ps/100_5.sh", 86, "deltas[0]")),
    SettingDefault("CONT.ECLIPSE.LOGIT_DELTAS[0]", "ade20k", "panoptic", "100-50", -0.4, _ECLIPSE_SCRIPTS.format("ade_ps/100_50.sh", 81, "deltas[0]")),
    SettingDefault("CONT.ECLIPSE.LOGIT_DELTAS[0]", "ade20k", "panoptic", "50-10", 0.4, _ECLIPSE_SCRIPTS.format("ade_ps/50_10.sh", 87, "deltas[0]")),
    SettingDefault("CONT.ECLIPSE.LOGIT_DELTAS[0]", "ade20k", "panoptic", "50-20", 0.4, _ECLIPSE_SCRIPTS.format("ade_ps/50_20.sh", 87, "deltas[0]")),
    SettingDefault("CONT.ECLIPSE.LOGIT_DELTAS[0]", "ade20k", "panoptic", "50-50", 0.5, _ECLIPSE_SCRIPTS.format("ade_ps/50_50.sh", 87, "deltas[0]")),
    SettingDefault("CONT.ECLIPSE.LOGIT_DELTAS[0]", "ade20k", "semantic", "100-10", 0.1, _ECLIPSE_SCRIPTS.format("ade_ss/100_10.sh", 86, "deltas[0]")),
    SettingDefault("CONT.ECLIPSE.LOGIT_DELTAS[0]", "ade20k", "semantic", "100-5", 0.1, _ECLIPSE_SCRIPTS.format("ade_ss/100_5.sh", 86, "deltas[0]")),
    SettingDefault("CONT.ECLIPSE.LOGIT_DELTAS[0]", "ade20k", "semantic", "100-50", 0.0, _ECLIPSE_SCRIPTS.format("ade_ss/100_50.sh", 80, "deltas[0]")),
    SettingDefault("CONT.ECLIPSE.LOGIT_DELTAS[0]", "coco", "panoptic", "83-10", 0.5, _ECLIPSE_SCRIPTS.format("coco_ps/83_10.sh", 86, "deltas[0]")),
    SettingDefault("CONT.ECLIPSE.LOGIT_DELTAS[0]", "coco", "panoptic", "83-5", 0.5, _ECLIPSE_SCRIPTS.format("coco_ps/83_5.sh", 86, "deltas[0]")),
    SettingDefault("CONT.ECLIPSE.LOGIT_DELTAS[1:]", "ade20k", "panoptic", "100-10", 0.5, _ECLIPSE_SCRIPTS.format("ade_ps/100_10.sh", 85, "deltas[1:]")),
    SettingDefault("CONT.ECLIPSE.LOGIT_DELTAS[1:]", "ade20k", "panoptic", "100-5", 0.6, _ECLIPSE_SCRIPTS.format("ade_ps/100_5.sh", 86, "deltas[1:]")),
    SettingDefault("CONT.ECLIPSE.LOGIT_DELTAS[1:]", "ade20k", "panoptic", "100-50", -0.6, _ECLIPSE_SCRIPTS.format("ade_ps/100_50.sh", 81, "deltas[1:]")),
    SettingDefault("CONT.ECLIPSE.LOGIT_DELTAS[1:]", "ade20k", "panoptic", "50-10", 0.5, _ECLIPSE_SCRIPTS.format("ade_ps/50_10.sh", 87, "deltas[1:]")),
    SettingDefault("CONT.ECLIPSE.LOGIT_DELTAS[1:]", "ade20k", "panoptic", "50-20", 0.5, _ECLIPSE_SCRIPTS.format("ade_ps/50_20.sh", 87, "deltas[1:]")),
    SettingDefault("CONT.ECLIPSE.LOGIT_DELTAS[1:]", "ade20k", "panoptic", "50-50", -0.4, _ECLIPSE_SCRIPTS.format("ade_ps/50_50.sh", 87, "deltas[1:]")),
    SettingDefault("CONT.ECLIPSE.LOGIT_DELTAS[1:]", "ade20k", "semantic", "100-10", 0.7, _ECLIPSE_SCRIPTS.format("ade_ss/100_10.sh", 86, "deltas[1:]")),
    SettingDefault("CONT.ECLIPSE.LOGIT_DELTAS[1:]", "ade20k", "semantic", "100-5", 0.8, _ECLIPSE_SCRIPTS.format("ade_ss/100_5.sh", 86, "deltas[1:]")),
    SettingDefault("CONT.ECLIPSE.LOGIT_DELTAS[1:]", "ade20k", "semantic", "100-50", -0.1, _ECLIPSE_SCRIPTS.format("ade_ss/100_50.sh", 80, "deltas[1:]")),
    SettingDefault("CONT.ECLIPSE.LOGIT_DELTAS[1:]", "coco", "panoptic", "83-10", 0.6, _ECLIPSE_SCRIPTS.format("coco_ps/83_10.sh", 86, "deltas[1:]")),
    SettingDefault("CONT.ECLIPSE.LOGIT_DELTAS[1:]", "coco", "panoptic", "83-5", 0.6, _ECLIPSE_SCRIPTS.format("coco_ps/83_5.sh", 86, "deltas[1:]")),
)  # fmt: skip

# Value of a key in settings without a row, and why.
FALLBACKS: Dict[str, Tuple[float, str]] = {
    "CONT.COMFORMER.KD_WEIGHT": (10.0, "the multi-step value of the CoMFormer scripts"),
    "CONT.ECLIPSE.NUM_PROMPTS": (10.0, "clovaai/ECLIPSE scripts' value for 10-class and most other steps"),
    "CONT.ECLIPSE.INC_MAX_ITER": (-1.0, "-1: the engine's CONT.INC_ITERS_PER_CLASS / CONT.INC_MAX_ITER"),
    "CONT.ECLIPSE.INC_BASE_LR": (-1.0, "-1: the engine's CONT.INC_BASE_LR"),
    "CONT.ECLIPSE.INC_CLASS_WEIGHT": (10.0, "every clovaai/ECLIPSE script (class_weight=10.0 of increments)"),
    "CONT.ECLIPSE.LOGIT_DELTAS[0]": (0.4, "clovaai/ECLIPSE script/ade_ps/100_10.sh:85 (deltas[0])"),
    "CONT.ECLIPSE.LOGIT_DELTAS[1:]": (0.5, "clovaai/ECLIPSE script/ade_ps/100_10.sh:85 (deltas[1:])"),
}  # fmt: skip


def setting_of(dataset: str, task: str) -> Tuple[str, str, str]:
    """(dataset family, kind, task) of a registered dataset and a task."""
    family = dataset.split("_")[0]
    evaluator = MetadataCatalog.get(dataset).get("evaluator_type", "")
    kind = "panoptic" if "panoptic" in evaluator else "semantic"
    return family, kind, task


def setting_default(key: str, value: float, dataset: str, task: str) -> float:
    """
    ``value`` when it is >= 0, else the default of ``key`` for the setting (see the module
    docstring), else the key's fallback.
    """
    if value >= 0:
        return float(value)
    return setting_value(key, dataset, task)


def setting_value(key: str, dataset: str, task: str) -> float:
    """The default of ``key`` for the setting, else the key's fallback (for keys whose values
    may be negative, such as ECLIPSE's deltas)."""
    if key not in FALLBACKS:
        raise KeyError(f"{key} has no per-setting defaults; valid keys: {sorted(FALLBACKS)}")
    family, kind, task = setting_of(dataset, task)
    for row in SETTING_DEFAULTS:
        if (row.key, row.dataset, row.kind, row.task) == (key, family, kind, task):
            return row.value
    return FALLBACKS[key][0]
