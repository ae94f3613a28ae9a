"""
Datasets of your own, without writing Python: a COCO-panoptic-format dataset (json + PNG folder +
images, optional semantic label maps) or a semantic one (images + label PNGs + class list),
registered from the config keys ``DATASETS.CUSTOM.*`` (``comformer/config.py``;
:func:`register_custom_from_config`, called when a config is loaded) or with one call::

    from comformer.data.datasets.register_custom import register_custom_panoptic
    register_custom_panoptic("mydata_train", json_file="/data/mydata/panoptic_train.json",
                             png_root="/data/mydata/panoptic_train",
                             image_root="/data/mydata/images/train")

Then ``DATASETS.TRAIN ("mydata_train",)`` and any scenario (``CONT.TASK``, ``CONT.STEP_CLASSES``)
work on it as on the built-in datasets. Relative paths are relative to the data root
(:func:`~comformer.data.datasets.common.data_root`, ``$DETECTRON2_DATASETS``).

The classes are read when the dataset is registered (the json's ``categories``, or the class list),
since detectron2's metadata cannot change afterwards. The files are checked at the first load in a
process, with the loaders of ``common.py`` (missing files, unknown category ids, repeated segment
ids, ...) and, with ``check_files``, by decoding every file once: PNG segment ids against
``segments_info``, image / PNG / label-map sizes, label values. Every error names the file and the
fault. A check that passed is remembered in ``$COMFORMER_CACHE`` (default ``~/.cache/comformer``)
until a file changes, so a scenario of many steps decodes the dataset once.

A panoptic dataset without semantic label maps gets them derived from its PNGs (class index per
pixel, 255 void) into the same cache folder: the scenario's mIoU needs them.
"""

import hashlib
import json
import logging
import os
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
from panopticapi.utils import rgb2id
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..mappers.panoptic import check_segment_ids
from .common import (
    IGNORE_LABEL,
    check_files_exist,
    data_root,
    load_panoptic_json,
    load_sem_seg_folders,
    panoptic_metadata,
    register_panoptic,
    register_sem_seg,
)

__all__ = [
    "CUSTOM_KINDS",
    "custom_categories",
    "read_class_names",
    "register_custom_panoptic",
    "register_custom_sem_seg",
    "register_custom_from_config",
]

logger = logging.getLogger(__name__)

CUSTOM_KINDS = ("panoptic", "semantic")
_HINT = "see the README, section 'Your own data'"
# name -> the arguments it was registered with: registering again with the same ones is a no-op
# (configs are loaded more than once per process), with others an error.
_REGISTERED: Dict[str, tuple] = {}
# datasets whose files were checked in this process
_CHECKED: set = set()


def _resolve(path: Optional[str]) -> Optional[str]:
    """``path`` under the data root unless absolute (None and "" stay None)."""
    if not path:
        return None
    return os.path.abspath(os.path.join(data_root(), os.path.expanduser(path)))


def _cache_folder(name: str, anchor: str) -> str:
    """The cache folder of one registered dataset (derived label maps, check stamp)."""
    from ..scenario import _cache_dir

    digest = hashlib.sha1(anchor.encode()).hexdigest()[:12]
    return os.path.join(_cache_dir(), "custom", f"{name}-{digest}")


def _files_key(paths: Sequence[str]) -> str:
    """Names, sizes and modification times of ``paths``: changes when any file does."""
    key = hashlib.sha1()
    for p in paths:
        st = os.stat(p)
        key.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return key.hexdigest()


def _read_stamp(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return json.load(f).get("key")
    except (OSError, ValueError):
        return None


def _write_stamp(path: str, key: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"key": key}, f)
    os.replace(tmp, path)


def _palette_color(index: int) -> List[int]:
    from detectron2.utils.colormap import colormap

    colors = colormap(rgb=True, maximum=255)
    return [int(c) for c in colors[index % len(colors)]]


def custom_categories(json_file: str) -> List[dict]:
    """
    The categories of a COCO panoptic json, checked: each needs ``id``, ``name`` and ``isthing``;
    a missing ``color`` is taken from detectron2's colour map.

    Raises:
        FileNotFoundError: the json does not exist.
        ValueError: not JSON, no ``categories`` list, or a malformed category (file and # named).
    """
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"panoptic json {json_file} does not exist ({_HINT})")
    with open(json_file) as f:
        try:
            content = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{json_file} is not valid JSON ({e})") from None
    categories = content.get("categories") if isinstance(content, dict) else None
    if not isinstance(categories, list) or not categories:
        raise ValueError(
            f"{json_file} has no 'categories' list: a COCO panoptic json lists its classes as "
            "categories [{'id', 'name', 'isthing', 'color'}]"
        )
    out = []
    for index, cat in enumerate(categories):
        missing = [
            k for k in ("id", "name", "isthing") if not isinstance(cat, dict) or k not in cat
        ]
        if missing:
            raise ValueError(f"{json_file}: category #{index} ({cat!r}) lacks {missing}")
        if not isinstance(cat["id"], int) or isinstance(cat["id"], bool):
            raise ValueError(f"{json_file}: category #{index} has id {cat['id']!r}, not an integer")
        color = cat.get("color") or _palette_color(index)
        if len(color) != 3:
            raise ValueError(f"{json_file}: category #{index} has color {color!r}, not [r, g, b]")
        out.append(
            {"id": cat["id"], "name": str(cat["name"]), "isthing": int(bool(cat["isthing"])),
             "color": [int(c) for c in color]}
        )  # fmt: skip
    return out


def read_class_names(classes: Union[str, Sequence[str]]) -> List[str]:
    """
    Class names of a semantic dataset: a list, or a text file with one name per line (blank lines
    skipped); index = label value.
    """
    if isinstance(classes, str):
        if not os.path.isfile(classes):
            raise FileNotFoundError(f"class list {classes} does not exist ({_HINT})")
        with open(classes) as f:
            names = [line.strip() for line in f if line.strip()]
        where = classes
    else:
        names, where = [str(c) for c in classes], "the class list"
    if not names:
        raise ValueError(f"{where} names no class")
    if len(names) >= IGNORE_LABEL:
        raise ValueError(
            f"{where} names {len(names)} classes; label values must stay below the ignore label "
            f"{IGNORE_LABEL}"
        )
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{where} repeats class name(s) {dup}")
    return names


def _check_once(name: str, check: Callable[[], None]) -> Callable[[], None]:
    def before_load() -> None:
        if name not in _CHECKED:
            check()
            _CHECKED.add(name)

    return before_load


def _needs_registering(name: str, args: tuple) -> bool:
    """Whether ``name`` must be registered now: False when it already is, with ``args``."""
    if name in _REGISTERED:
        if _REGISTERED[name] == args:
            return False
        raise ValueError(
            f"dataset {name!r} is already registered with other files ({_REGISTERED[name]}); "
            "choose another name (DATASETS.CUSTOM.NAME)"
        )
    if name in DatasetCatalog.list():
        raise ValueError(
            f"dataset name {name!r} is taken (a built-in dataset, or registered by your code); "
            "choose another name (DATASETS.CUSTOM.NAME)"
        )
    return True


def _image_size(path: str):
    try:
        with Image.open(path) as im:
            return im.size  # (width, height), from the header only
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path} ({e})") from None


def _decode(path: str, what: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot decode {what} {path} ({e}: corrupt or truncated file?)") from None


def _check_size(image_file: str, label_file: str, label_hw, what: str, record: dict) -> None:
    width, height = _image_size(image_file)
    if tuple(label_hw) != (height, width):
        raise ValueError(
            f"{what} {label_file} is {label_hw[1]}x{label_hw[0]} but its image {image_file} is "
            f"{width}x{height} (width x height)"
        )
    if "height" in record and (record["height"], record["width"]) != (height, width):
        raise ValueError(
            f"image {image_file} is {width}x{height} but its json entry says "
            f"{record['width']}x{record['height']}"
        )


def _check_label_values(labels: np.ndarray, path: str, num_classes: int) -> None:
    if labels.ndim != 2:
        raise ValueError(
            f"label map {path} has shape {labels.shape}: it must be single-channel (class index "
            "per pixel), not RGB"
        )
    values = np.unique(labels)
    bad = values[(values >= num_classes) & (values != IGNORE_LABEL)]
    if bad.size:
        raise ValueError(
            f"label map {path} has value(s) {bad[:10].tolist()}, neither class ids "
            f"(0..{num_classes - 1}) nor the ignore label {IGNORE_LABEL}"
        )


def register_custom_panoptic(
    name: str,
    *,
    json_file: str,
    png_root: str,
    image_root: str,
    sem_seg_root: Optional[str] = None,
    check_files: bool = True,
) -> None:
    """
    Register a COCO-panoptic-format dataset as ``name`` (one split), its classes read from the
    json's ``categories`` in the order listed (class index i = category #i).

    Args:
        name: the catalog name, e.g. "mydata_train".
        json_file: the panoptic json (``images``, ``annotations``, ``categories``).
        png_root: folder of the panoptic PNGs (segment id = R + 256 G + 256^2 B, 0 void).
        image_root: folder of the images (any format PIL reads; named by the json's ``images``).
        sem_seg_root: folder of semantic label maps named like the PNGs (class index per pixel,
            255 void); None: derived from the PNGs into the cache.
        check_files: decode every file once at the first load (see the module docstring).

    Raises:
        ValueError, FileNotFoundError: the json's categories are malformed or the json missing;
            the name is taken. File faults are raised at the first load, naming the file.
    """
    json_file, png_root, image_root = _resolve(json_file), _resolve(png_root), _resolve(image_root)
    sem_seg_root = _resolve(sem_seg_root)
    args = ("panoptic", json_file, png_root, image_root, sem_seg_root, check_files)
    if not _needs_registering(name, args):
        return
    categories = custom_categories(json_file)
    meta = panoptic_metadata(categories)
    num_classes = len(categories)
    cache = _cache_folder(name, json_file)
    derived = sem_seg_root is None
    if derived and num_classes >= IGNORE_LABEL:
        raise ValueError(
            f"{json_file} has {num_classes} categories: semantic label maps cannot be derived with "
            f"the ignore label {IGNORE_LABEL}; give a folder of label maps"
        )
    semantic = os.path.join(cache, "semantic") if derived else sem_seg_root

    def check() -> None:
        if not (check_files or derived):
            return  # the loader's own checks only
        records = load_panoptic_json(
            json_file, image_root, png_root, None, meta, prepare_hint=_HINT
        )
        pngs = [r["pan_seg_file_name"] for r in records]
        inputs = [json_file] + pngs + [r["file_name"] for r in records]
        if not derived:
            labels = [os.path.join(sem_seg_root, os.path.basename(p)) for p in pngs]
            check_files_exist(labels, "semantic label", _HINT)
            inputs += labels
        stamp = os.path.join(cache, "checked.json" if check_files else "derived.json")
        key = _files_key(inputs)
        if _read_stamp(stamp) == key and (not derived or os.path.isdir(semantic)):
            return
        jobs = ["check them"] * check_files + ["derive semantic label maps"] * derived
        logger.info(f"Reading the {len(records)} PNGs of {name!r} once to {' and '.join(jobs)}")
        if derived:
            os.makedirs(semantic, exist_ok=True)
        for record in records:
            png = record["pan_seg_file_name"]
            ids = rgb2id(_decode(png, "panoptic PNG"))
            if check_files:
                check_segment_ids(ids, record["segments_info"], png)
                _check_size(record["file_name"], png, ids.shape, "panoptic PNG", record)
            if derived:
                sem = np.full(ids.shape, IGNORE_LABEL, dtype=np.uint8)
                for s in record["segments_info"]:
                    sem[ids == s["id"]] = s["category_id"]
                out = os.path.join(semantic, os.path.basename(png))
                tmp = f"{out}.tmp{os.getpid()}.png"  # processes of one run may derive at once
                Image.fromarray(sem).save(tmp)
                os.replace(tmp, out)
            elif check_files:
                label_file = os.path.join(sem_seg_root, os.path.basename(png))
                labels = _decode(label_file, "semantic label map")
                _check_label_values(labels, label_file, num_classes)
                _check_size(record["file_name"], label_file, labels.shape[:2], "label map", record)
        _write_stamp(stamp, key)

    register_panoptic(
        name,
        metadata=meta,
        image_root=image_root,
        panoptic_root=png_root,
        panoptic_json=json_file,
        sem_seg_root=semantic,
        prepare_hint=_HINT,
        before_load=_check_once(name, check),
    )
    _REGISTERED[name] = args
    logger.info(f"Registered dataset {name!r}: {num_classes} classes from {json_file}")


def register_custom_sem_seg(
    name: str,
    *,
    image_root: str,
    sem_seg_root: str,
    classes: Union[str, Sequence[str]],
    image_ext: str = ".jpg",
    background_class: int = -1,
    check_files: bool = True,
) -> None:
    """
    Register a semantic dataset as ``name`` (one split): images ``<stem><image_ext>`` and label maps
    ``<stem>.png`` (class index per pixel, 255 void) in two folders.

    Args:
        name: the catalog name, e.g. "mydata_train".
        image_root: folder of the images.
        sem_seg_root: folder of the label maps.
        classes: the class names (index = label value), or a text file with one name per line.
        image_ext: the images' extension.
        background_class: the class id of a background class (as Pascal VOC's 0; see
            ``CONT.BACKGROUND``), -1 for none.
        check_files: decode every label map once at the first load (see the module docstring).
    """
    image_root, sem_seg_root = _resolve(image_root), _resolve(sem_seg_root)
    if isinstance(classes, str):
        classes = _resolve(classes)
    args = ("semantic", image_root, sem_seg_root, classes if isinstance(classes, str) else
            tuple(classes), image_ext, background_class, check_files)  # fmt: skip
    if not _needs_registering(name, args):
        return
    names = read_class_names(classes)
    if not -1 <= background_class < len(names):
        raise ValueError(
            f"background class {background_class} of {name!r} is not a class id "
            f"(0..{len(names) - 1}) nor -1 (none)"
        )
    metadata = {
        "stuff_classes": names,
        "stuff_colors": [_palette_color(i) for i in range(len(names))],
    }
    if background_class >= 0:
        metadata["background_class"] = background_class
    cache = _cache_folder(name, f"{image_root}|{sem_seg_root}")

    def check() -> None:
        records = load_sem_seg_folders(
            image_root, sem_seg_root, image_ext=image_ext, prepare_hint=_HINT
        )
        labels = [r["sem_seg_file_name"] for r in records]
        stamp = os.path.join(cache, "checked.json")
        key = _files_key(labels + [r["file_name"] for r in records])
        if not check_files or _read_stamp(stamp) == key:
            return
        logger.info(f"Checking the {len(records)} label maps of {name!r} once")
        for record, label_file in zip(records, labels):
            values = _decode(label_file, "label map")
            _check_label_values(values, label_file, len(names))
            _check_size(record["file_name"], label_file, values.shape[:2], "label map", record)
        _write_stamp(stamp, key)

    register_sem_seg(
        name,
        metadata=metadata,
        image_root=image_root,
        sem_seg_root=sem_seg_root,
        prepare_hint=_HINT,
        image_ext=image_ext,
        before_load=_check_once(name, check),
    )
    _REGISTERED[name] = args
    logger.info(f"Registered dataset {name!r}: {len(names)} classes")


def register_custom_from_config(cfg) -> List[str]:
    """
    Register ``<NAME>_train`` and ``<NAME>_val`` from ``cfg.DATASETS.CUSTOM`` (nothing when NAME is
    empty; a split whose IMAGES is empty is skipped). Registering the same again is a no-op.

    Returns:
        the names registered (or already registered by an equal config).
    """
    custom = cfg.DATASETS.CUSTOM
    if not custom.NAME:
        return []
    if custom.KIND not in CUSTOM_KINDS:
        raise ValueError(f"DATASETS.CUSTOM.KIND={custom.KIND!r}; valid: {', '.join(CUSTOM_KINDS)}")
    if not custom.ROOT:
        raise ValueError("DATASETS.CUSTOM.ROOT is empty: set it to the folder of your dataset")
    root = _resolve(custom.ROOT)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"DATASETS.CUSTOM.ROOT folder {root} does not exist")

    def under_root(path: str) -> Optional[str]:
        return os.path.join(root, path) if path else None

    names = []
    for split, files in (("train", custom.TRAIN), ("val", custom.VAL)):
        if not files.IMAGES:
            continue
        name = f"{custom.NAME}_{split}"
        if custom.KIND == "panoptic":
            register_custom_panoptic(
                name,
                json_file=under_root(files.PANOPTIC_JSON),
                png_root=under_root(files.PANOPTIC_PNGS),
                image_root=under_root(files.IMAGES),
                sem_seg_root=under_root(files.SEM_SEG),
                check_files=custom.CHECK_FILES,
            )
        else:
            if not files.SEM_SEG:
                raise ValueError(
                    f"DATASETS.CUSTOM.{split.upper()}.SEM_SEG is empty: a semantic dataset needs "
                    "its folder of label maps"
                )
            if bool(custom.CLASSES) == bool(custom.CLASSES_FILE):
                raise ValueError(
                    "a semantic DATASETS.CUSTOM needs its class names: set exactly one of "
                    "DATASETS.CUSTOM.CLASSES (a list) and DATASETS.CUSTOM.CLASSES_FILE"
                )
            register_custom_sem_seg(
                name,
                image_root=under_root(files.IMAGES),
                sem_seg_root=under_root(files.SEM_SEG),
                classes=list(custom.CLASSES) or under_root(custom.CLASSES_FILE),
                image_ext=custom.IMAGE_EXT,
                background_class=custom.BACKGROUND_CLASS,
                check_files=custom.CHECK_FILES,
            )
        names.append(name)
    classes = {n: MetadataCatalog.get(n).stuff_classes for n in names}
    if len({tuple(c) for c in classes.values()}) > 1:
        a, b = names
        raise ValueError(
            f"the splits of DATASETS.CUSTOM have different classes: {a!r} {classes[a][:8]}..., "
            f"{b!r} {classes[b][:8]}... (their categories / class lists must be the same)"
        )
    return names
