"""Continual scenarios: class splits per step, class orders, step datasets and label remapping.

All the continual data logic lives here. Vocabulary:

- *class id*: a dataset's contiguous class id (index into ``metadata.stuff_classes``), 0..K-1.
- *class order*: the sequence in which classes are learned; step t learns ``steps[t]``.
- *model index*: a class's position in the class order. A model of step t predicts the first
  ``num_seen(t)`` model indices plus no-object, so old classes keep their classifier rows and new
  ones are appended (the growing classifier). Inference maps model indices back to class ids.

Step datasets are registered as ``<train dataset>_<task>[_<mode>][_<order tag>]_step<t>`` with the
full-label-space metadata of the dataset they filter; their records are unchanged, the training
mapper removes the classes a step does not train on using :meth:`Scenario.label_map`.
"""
import dataclasses
import hashlib
import json
import logging
import os
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = [
    "MODES",
    "BUILTIN_SCENARIOS",
    "Scenario",
    "parse_task",
    "build_scenario",
    "record_classes",
    "step_dataset_name",
    "register_step_dataset",
    "scenario_summary",
]

logger = logging.getLogger(__name__)

MODES = ("overlap", "disjoint")
# No label maps to this model index: the class is absent from the step's targets.
REMOVED = -1

# The settings of the papers (MiB, PLOP, CoMFormer) per dataset family, for listing and summaries.
# Any "<base>-<increment>" that adds up to the dataset's classes is accepted as well.
BUILTIN_SCENARIOS: Dict[str, Tuple[str, ...]] = {
    "ade20k_panoptic": ("100-50", "100-10", "100-5", "50-50", "50-20", "50-10"),
    "ade20k_semantic": ("100-50", "100-10", "100-5", "50-50"),
    "comformer_coco_panoptic": ("83-5", "83-10"),
    "voc_sem_seg": ("19-1", "15-5", "15-1", "10-1"),
    "synthetic_panoptic": ("10-10", "10-2"),
    "synthetic_sem_seg": ("10-10", "10-2"),
    "synthetic_shapes_panoptic": ("10-10", "10-2"),
    "synthetic_shapes_sem_seg": ("10-10", "10-2"),
    # background + 12 objects: 9-3 and 9-1 split them as VOC's 15-5 and 15-1 split its 20
    "synthetic_voc_sem_seg": ("9-3", "9-1"),
}

_TASK_RE = re.compile(r"^(\d+)-(\d+)$")


def parse_task(task: str, num_foreground: int) -> List[int]:
    """
    Sizes of the steps of a ``"<base>-<increment>"`` task.

    Args:
        task: e.g. "100-10".
        num_foreground: classes to split (the dataset's classes minus a background class, if any).

    Returns:
        step sizes, e.g. [100, 10, 10, 10, 10, 10] for "100-10" on 150 classes.
    """
    m = _TASK_RE.match(task)
    if m is None:
        raise ValueError(
            f"CONT.TASK={task!r} is not of the form '<base>-<increment>' (e.g. '100-10'); or leave it "
            "empty and list the classes of each step in CONT.STEP_CLASSES"
        )
    base, inc = int(m.group(1)), int(m.group(2))
    if base <= 0 or inc <= 0 or base >= num_foreground or (num_foreground - base) % inc:
        valid = [
            f"{b}-{i}"
            for b in range(1, num_foreground)
            for i in (1, 2, 5, 10, 20, 50)
            if b % 5 == 0 and (num_foreground - b) % i == 0 and i <= num_foreground - b
        ]
        raise ValueError(
            f"CONT.TASK={task!r} does not split {num_foreground} classes: the base must be in "
            f"[1, {num_foreground - 1}] and the remaining {num_foreground} - base classes a multiple "
            f"of the increment. Valid examples: {', '.join(valid[:12])}"
        )
    return [base] + [inc] * ((num_foreground - base) // inc)


@dataclasses.dataclass(frozen=True)
class Scenario:
    """
    A class-incremental scenario over one dataset.

    Attributes:
        dataset: the training dataset the steps filter (e.g. "ade20k_panoptic_train").
        task: the task's name ("100-10", or "custom" for explicit class lists).
        steps: class ids learned at each step, in class order. A background class, when the dataset
            has one, is part of step 0 and stays a target in every step.
        num_classes: K, classes of the dataset.
        mode: "overlap" (images of step t may show future classes, unlabelled) or "disjoint"
            (images showing future classes are left out).
        background: the dataset's background class id, or -1.
    """

    dataset: str
    task: str
    steps: Tuple[Tuple[int, ...], ...]
    num_classes: int
    mode: str = "overlap"
    background: int = -1

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"CONT.MODE={self.mode!r} is not a mode; valid: {', '.join(MODES)}")
        flat = [c for step in self.steps for c in step]
        if any(len(s) == 0 for s in self.steps):
            raise ValueError(f"scenario {self.task!r}: every step needs at least one class")
        bad = [c for c in flat if not 0 <= c < self.num_classes]
        if bad:
            raise ValueError(
                f"scenario {self.task!r}: class ids {bad} do not exist in {self.dataset!r}; "
                f"valid ids are 0..{self.num_classes - 1}"
            )
        dup = sorted({c for c in flat if flat.count(c) > 1})
        if dup:
            raise ValueError(f"scenario {self.task!r}: class ids {dup} appear in more than one step")
        if sorted(flat) != list(range(self.num_classes)):
            missing = sorted(set(range(self.num_classes)) - set(flat))
            raise ValueError(
                f"scenario {self.task!r}: the steps must cover all {self.num_classes} classes of "
                f"{self.dataset!r}; missing: {missing}"
            )
        if self.background >= 0 and self.background not in self.steps[0]:
            raise ValueError(
                f"scenario {self.task!r}: the background class {self.background} must be learned "
                "in step 0"
            )

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def order(self) -> Tuple[int, ...]:
        """Class id of each model index."""
        return tuple(c for step in self.steps for c in step)

    def check_step(self, step: int) -> int:
        if not 0 <= step < self.num_steps:
            raise ValueError(
                f"CONT.STEP={step} is out of range for {self.task!r}: it has {self.num_steps} steps "
                f"(valid: 0..{self.num_steps - 1}, or -1 for all)"
            )
        return step

    def seen_classes(self, step: int) -> Tuple[int, ...]:
        """Class ids learned up to and including ``step``, in class order."""
        self.check_step(step)
        return tuple(c for s in self.steps[: step + 1] for c in s)

    def num_seen(self, step: int) -> int:
        return len(self.seen_classes(step))

    def old_classes(self, step: int) -> Tuple[int, ...]:
        """Classes learned before ``step``."""
        return self.seen_classes(step - 1) if step > 0 else ()

    def future_classes(self, step: int) -> Tuple[int, ...]:
        self.check_step(step)
        return tuple(c for s in self.steps[step + 1 :] for c in s)

    def label_map(self, step: int, train_classes: Optional[Iterable[int]] = None) -> np.ndarray:
        """
        Class id -> model index of the training targets of ``step``.

        Args:
            step: the step.
            train_classes: classes that keep their labels (default: the step's own classes; joint
                training passes every seen class).

        Returns:
            (K,) int64: the model index of each kept class; every other class maps to the background's
            model index when the dataset has a background class (MiB's convention: old and future
            classes look like background), else to ``REMOVED`` (no target: the pixels are left to
            no-object, Mask2Former's convention).
        """
        keep = set(self.steps[self.check_step(step)] if train_classes is None else train_classes)
        if self.background >= 0:
            keep.add(self.background)
        index = {c: i for i, c in enumerate(self.order)}
        fill = index[self.background] if self.background >= 0 else REMOVED
        out = np.full(self.num_classes, fill, dtype=np.int64)
        for c in keep:
            out[c] = index[c]
        return out

    def filter_records(self, records: Sequence[dict], step: int, classes_of: Sequence[set]) -> List[dict]:
        """
        Training images of ``step``: those showing at least one of the step's classes (the
        background does not count); in disjoint mode, without any future class.

        Args:
            records: the dataset's records.
            step: the step.
            classes_of: for each record, the set of class ids its annotation contains.
        """
        current = set(self.steps[self.check_step(step)]) - {self.background}
        future = set(self.future_classes(step))
        kept = []
        for record, present in zip(records, classes_of):
            if not present & current:
                continue
            if self.mode == "disjoint" and present & future:
                continue
            kept.append(record)
        return kept

    def signature(self) -> Dict:
        """What identifies the scenario (stored with results; a different one may not resume)."""
        return {
            "dataset": self.dataset,
            "task": self.task,
            "mode": self.mode,
            "steps": [list(s) for s in self.steps],
        }

    @property
    def tag(self) -> str:
        """Short name used in step dataset names: task, mode when not overlap, order hash."""
        parts = [self.task]
        if self.mode != "overlap":
            parts.append(self.mode)
        default = _default_steps(self.num_classes, [len(s) for s in self.steps], self.background)
        if [list(s) for s in self.steps] != default:
            digest = hashlib.sha1(json.dumps(self.signature()["steps"]).encode()).hexdigest()[:8]
            parts.append(f"ord{digest}")
        return "_".join(parts)


def _default_steps(num_classes: int, sizes: Sequence[int], background: int) -> List[List[int]]:
    classes = [c for c in range(num_classes) if c != background]
    steps, start = [], 0
    for i, n in enumerate(sizes):
        n_fg = n - 1 if (i == 0 and background >= 0) else n
        step = classes[start : start + n_fg]
        if i == 0 and background >= 0:
            step = [background] + step
        steps.append(step)
        start += n_fg
    return steps


def _class_order(cont, num_classes: int, background: int) -> List[int]:
    """The foreground class order from CONT.ORDER / ORDER_FILE / ORDER_SEED (dataset order by default)."""
    chosen = [k for k, v in (("ORDER", cont.ORDER), ("ORDER_FILE", cont.ORDER_FILE)) if v]
    if cont.ORDER_SEED >= 0:
        chosen.append("ORDER_SEED")
    if len(chosen) > 1:
        raise ValueError(f"set at most one of CONT.ORDER, CONT.ORDER_FILE, CONT.ORDER_SEED; got {chosen}")
    foreground = [c for c in range(num_classes) if c != background]
    if cont.ORDER:
        order, source = [int(c) for c in cont.ORDER], "CONT.ORDER"
    elif cont.ORDER_FILE:
        if not os.path.isfile(cont.ORDER_FILE):
            raise FileNotFoundError(f"CONT.ORDER_FILE={cont.ORDER_FILE!r} does not exist")
        with open(cont.ORDER_FILE) as f:
            tokens = f.read().split()
        try:
            order = [int(t) for t in tokens]
        except ValueError as e:
            raise ValueError(
                f"CONT.ORDER_FILE={cont.ORDER_FILE!r} must hold whitespace-separated class ids: {e}"
            ) from None
        source = f"CONT.ORDER_FILE {cont.ORDER_FILE!r}"
    elif cont.ORDER_SEED >= 0:
        rng = np.random.RandomState(cont.ORDER_SEED)
        return [foreground[i] for i in rng.permutation(len(foreground))]
    else:
        return foreground
    if sorted(order) != foreground:
        missing = sorted(set(foreground) - set(order))
        extra = sorted(set(order) - set(foreground))
        raise ValueError(
            f"{source} must list each class id of {foreground[0]}..{foreground[-1]} exactly once"
            + (f" (background {background} excluded)" if background >= 0 else "")
            + f"; missing: {missing[:20]}, unexpected or repeated: "
            f"{extra[:20] or sorted({c for c in order if order.count(c) > 1})[:20]}"
        )
    return order


def build_scenario(cfg, dataset: Optional[str] = None) -> Optional[Scenario]:
    """
    The scenario a config describes, validated, or None when the config is not continual.

    Args:
        cfg: a config with the CONT node; the training dataset is ``dataset`` or cfg.DATASETS.TRAIN[0].
    """
    cont = cfg.CONT
    if not cont.TASK and not cont.STEP_CLASSES:
        return None
    if cont.TASK and cont.STEP_CLASSES:
        raise ValueError("set either CONT.TASK (e.g. '100-10') or CONT.STEP_CLASSES, not both")
    dataset = dataset or (cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else None)
    if not dataset:
        raise ValueError("a continual config needs DATASETS.TRAIN (the dataset the steps split)")
    meta = MetadataCatalog.get(dataset)
    classes = meta.get("stuff_classes", None)
    if classes is None:
        raise ValueError(
            f"dataset {dataset!r} has no 'stuff_classes' metadata (the full class list): is it "
            f"registered? Registered: {len(DatasetCatalog.list())} datasets"
        )
    num_classes = len(classes)
    background = int(meta.get("background_class", -1))
    if cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES != num_classes:
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.NUM_CLASSES={cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES} but {dataset!r} "
            f"has {num_classes} classes; set it to the dataset's class count (each step's model "
            "is sized by the scenario)"
        )
    if cont.STEP_CLASSES:
        steps = [[int(c) for c in step] for step in cont.STEP_CLASSES]
        if background >= 0 and background not in steps[0]:
            steps[0] = [background] + steps[0]
        task = "custom"
        if cont.ORDER or cont.ORDER_FILE or cont.ORDER_SEED >= 0:
            raise ValueError("CONT.STEP_CLASSES already fixes the class order; unset CONT.ORDER*")
    else:
        sizes = parse_task(cont.TASK, num_classes - (1 if background >= 0 else 0))
        order = _class_order(cont, num_classes, background)
        steps, start = [], 0
        for i, n in enumerate(sizes):
            steps.append(([background] if i == 0 and background >= 0 else []) + order[start : start + n])
            start += n
        task = cont.TASK
    scenario = Scenario(
        dataset=dataset,
        task=task,
        steps=tuple(tuple(s) for s in steps),
        num_classes=num_classes,
        mode=cont.MODE,
        background=background,
    )
    if cont.STEP >= 0:
        scenario.check_step(cont.STEP)
    return scenario


# ------------------------------------------------------------------------ classes of each image
def _cache_dir() -> str:
    return os.environ.get("COMFORMER_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "comformer"))


def _semantic_classes(file_name: str, ignore_label: int) -> List[int]:
    from PIL import Image

    try:
        with Image.open(file_name) as im:
            labels = np.unique(np.asarray(im))
    except (OSError, ValueError) as e:
        raise OSError(f"cannot read semantic label map {file_name}: {e}") from e
    return [int(c) for c in labels if c != ignore_label]


def record_classes(records: Sequence[dict], dataset: str) -> List[set]:
    """
    The class ids each record's annotation shows.

    Panoptic records answer from ``segments_info`` (non-crowd segments: crowd regions are not
    training targets). Semantic records need their label maps read once; the answer is cached in
    ``$COMFORMER_CACHE`` (default ~/.cache/comformer), keyed by the label files' names, sizes and
    modification times.
    """
    if all("segments_info" in r for r in records):
        return [{s["category_id"] for s in r["segments_info"] if not s.get("iscrowd", 0)} for r in records]
    missing = [r.get("file_name") for r in records if "sem_seg_file_name" not in r]
    if missing:
        raise KeyError(
            f"dataset {dataset!r}: records need 'segments_info' or 'sem_seg_file_name' to tell which "
            f"classes they show; e.g. {missing[0]} has neither"
        )
    ignore = int(MetadataCatalog.get(dataset).get("ignore_label", 255))
    files = [r["sem_seg_file_name"] for r in records]
    key = hashlib.sha1()
    for f in files:
        st = os.stat(f)
        key.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache = os.path.join(_cache_dir(), f"classes-{dataset}-{key.hexdigest()[:16]}.json")
    if os.path.isfile(cache):
        with open(cache) as fh:
            return [set(c) for c in json.load(fh)]
    logger.info(f"Reading {len(files)} label maps of {dataset!r} to find the classes of each image")
    result = [_semantic_classes(f, ignore) for f in files]
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = f"{cache}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(result, fh)
    os.replace(tmp, cache)
    return [set(c) for c in result]


# ------------------------------------------------------------------------------- step datasets
def step_dataset_name(scenario: Scenario, step: int, joint: bool = False) -> str:
    suffix = "_joint" if joint else ""
    return f"{scenario.dataset}_{scenario.tag}{suffix}_step{scenario.check_step(step)}"


def register_step_dataset(scenario: Scenario, step: int, joint: bool = False) -> str:
    """
    Register the training dataset of ``step`` (idempotent) and return its name.

    Args:
        joint: the joint upper bound: images showing any class seen so far.
    """
    name = step_dataset_name(scenario, step, joint)
    if name in DatasetCatalog.list():
        return name
    base = scenario.dataset

    def load():
        records = DatasetCatalog.get(base)
        classes = record_classes(records, base)
        if joint:
            seen = set(scenario.seen_classes(step)) - {scenario.background}
            kept = [r for r, c in zip(records, classes) if c & seen]
        else:
            kept = scenario.filter_records(records, step, classes)
        if not kept:
            raise ValueError(
                f"step dataset {name!r} is empty: no image of {base!r} shows the classes "
                f"{list(scenario.steps[step])[:20]}"
            )
        return kept

    DatasetCatalog.register(name, load)
    meta = {k: v for k, v in MetadataCatalog.get(base).as_dict().items() if k != "name"}
    MetadataCatalog.get(name).set(**meta, scenario=scenario.signature(), step=step)
    return name


def scenario_summary(scenario: Scenario, image_counts: Optional[Sequence[int]] = None) -> str:
    """A Markdown table: step, number of classes, class ids (and names), training images."""
    names = MetadataCatalog.get(scenario.dataset).get("stuff_classes", None)
    lines = [
        f"Scenario {scenario.task} ({scenario.mode}) on {scenario.dataset}: {scenario.num_steps} steps, "
        f"{scenario.num_classes} classes",
        "",
        "| step | classes | seen | train images | class ids |",
        "|---:|---:|---:|---:|---|",
    ]
    for t, step in enumerate(scenario.steps):
        ids = list(step)
        shown = ", ".join(str(c) for c in ids[:12]) + (", ..." if len(ids) > 12 else "")
        if names is not None and len(ids) <= 6:
            shown = ", ".join(f"{c} {names[c].strip()}" for c in ids)
        count = "" if image_counts is None else str(image_counts[t])
        lines.append(f"| {t} | {len(ids)} | {scenario.num_seen(t)} | {count} | {shown} |")
    return "\n".join(lines)
