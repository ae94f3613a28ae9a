"""Per-setting defaults of the methods' hyper-parameters, as the public scripts set them.

A config value of -1 for one of the keys below means "the value of this setting": dataset family
(the registered name's first word: ``ade20k``, ``coco``, ``voc``, ``synthetic``), kind (panoptic or
semantic, from the dataset's ``evaluator_type``) and task. A setting without a row takes the key's
fallback. The README's "Per-setting defaults" table lists the same rows (a test compares them).
"""
from dataclasses import dataclass
from typing import Dict, Tuple

from detectron2.data import MetadataCatalog

__all__ = ["SettingDefault", "SETTING_DEFAULTS", "FALLBACKS", "setting_of", "setting_default"]


@dataclass(frozen=True)
class SettingDefault:
    key: str  # config key
    dataset: str  # dataset family
    kind: str  # "panoptic" or "semantic"
    task: str  # CONT.TASK
    value: float
    source: str  # where the value comes from


_COMFORMER_SCRIPTS = "fcdl94/CoMFormer scripts/{} (CONT.DIST.KD_WEIGHT)"

SETTING_DEFAULTS: Tuple[SettingDefault, ...] = (
    SettingDefault("CONT.COMFORMER.KD_WEIGHT", "ade20k", "semantic", "100-50", 0.5, _COMFORMER_SCRIPTS.format("ade.sh")),
    SettingDefault("CONT.COMFORMER.KD_WEIGHT", "ade20k", "semantic", "100-10", 10.0, _COMFORMER_SCRIPTS.format("ade10.sh")),
    SettingDefault("CONT.COMFORMER.KD_WEIGHT", "ade20k", "semantic", "100-5", 10.0, _COMFORMER_SCRIPTS.format("ade5.sh")),
    SettingDefault("CONT.COMFORMER.KD_WEIGHT", "ade20k", "panoptic", "100-50", 5.0, _COMFORMER_SCRIPTS.format("adps.sh")),
    SettingDefault("CONT.COMFORMER.KD_WEIGHT", "ade20k", "panoptic", "100-10", 10.0, _COMFORMER_SCRIPTS.format("adps10.sh")),
    SettingDefault("CONT.COMFORMER.KD_WEIGHT", "ade20k", "panoptic", "100-5", 10.0, _COMFORMER_SCRIPTS.format("adps5.sh")),
)  # fmt: skip

# Value of a key in settings without a row, and why.
FALLBACKS: Dict[str, Tuple[float, str]] = {
    "CONT.COMFORMER.KD_WEIGHT": (10.0, "the multi-step value of the CoMFormer scripts"),
}


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
    if key not in FALLBACKS:
        raise KeyError(f"{key} has no per-setting defaults; valid keys: {sorted(FALLBACKS)}")
    family, kind, task = setting_of(dataset, task)
    for row in SETTING_DEFAULTS:
        if (row.key, row.dataset, row.kind, row.task) == (key, family, kind, task):
            return row.value
    return FALLBACKS[key][0]
