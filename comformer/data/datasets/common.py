"""
What every dataset registration shares: the data root, metadata in Mask2Former's panoptic
convention, checked loaders for COCO-panoptic-format and folder-pair semantic datasets, and the two
``register_*`` functions the ``register_<dataset>.py`` modules call.

Paths handed to ``register_*`` are relative to :func:`data_root` (an absolute path is used as is).
The loaders join them with the data root when the dataset is *loaded*, so pointing
``DETECTRON2_DATASETS`` somewhere after ``import comformer`` still finds the data. Metadata cannot
be changed once set in detectron2's MetadataCatalog, though, so the absolute paths stored there for
the evaluators (``panoptic_json``, ``panoptic_root``, ...) are those of registration time: set
``DETECTRON2_DATASETS`` before importing comformer.
"""

import json
import logging
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = [
    "data_root",
    "resolve_data_root",
    "panoptic_metadata",
    "load_panoptic_json",
    "load_sem_seg_folders",
    "register_panoptic",
    "register_sem_seg",
    "check_files_exist",
    "set_sem_seg_metadata",
]

logger = logging.getLogger(__name__)

IGNORE_LABEL = 255
# Panoptic ids of model outputs are category * LABEL_DIVISOR + instance, as in detectron2.
LABEL_DIVISOR = 1000

_CATEGORY_FIELDS = ("id", "name", "isthing", "color")


def data_root() -> str:
    """
    Returns:
        str: ``$DETECTRON2_DATASETS`` if set and non-empty, else the ``datasets/`` folder of the
        source checkout this package lives in, else ``./datasets``. Read at every call.
    """
    env = os.environ.get("DETECTRON2_DATASETS", "")
    if env:
        return os.path.expanduser(env)
    checkout = Path(__file__).resolve().parents[3]
    # An installed package sits in site-packages, where a "datasets" folder would be the unrelated
    # HuggingFace package; only a source checkout (it has setup.py) owns its datasets/ folder.
    if (checkout / "setup.py").is_file() and (checkout / "comformer").is_dir():
        return str(checkout / "datasets")
    return "datasets"


def panoptic_metadata(categories: Sequence[Mapping]) -> dict:
    """
    Metadata of a panoptic dataset in Mask2Former's convention, where the "stuff" lists hold *all*
    classes (things too): the semantic evaluator and semantic inference use them as the full class
    list, and class index ``i`` means ``categories[i]`` everywhere.

    Args:
        categories: COCO panoptic categories in contiguous order, each a dict with ``id`` (the
            dataset id used in the panoptic json), ``name``, ``isthing`` (0/1) and ``color``.

    Returns:
        dict with ``thing_classes``, ``thing_colors`` (things only, in order), ``stuff_classes``,
        ``stuff_colors`` (all K classes), ``thing_dataset_id_to_contiguous_id`` (thing dataset id
        -> index in the full list) and ``stuff_dataset_id_to_contiguous_id`` (every dataset id ->
        index in the full list).

    Raises:
        ValueError: a category misses a field, or two categories share an id.
    """
    thing_map: Dict[int, int] = {}
    stuff_map: Dict[int, int] = {}
    thing_classes, thing_colors, stuff_classes, stuff_colors = [], [], [], []
    for index, cat in enumerate(categories):
        missing = [k for k in _CATEGORY_FIELDS if k not in cat]
        if missing:
            raise ValueError(
                f"category #{index} ({dict(cat)!r}) lacks field(s) {missing}; every category needs "
                f"{list(_CATEGORY_FIELDS)}"
            )
        cat_id = cat["id"]
        if cat_id in stuff_map:
            raise ValueError(
                f"category id {cat_id!r} appears twice: #{stuff_map[cat_id]} "
                f"({stuff_classes[stuff_map[cat_id]]!r}) and #{index} ({cat['name']!r}); ids "
                "must be unique"
            )
        color = list(cat["color"])
        stuff_map[cat_id] = index
        stuff_classes.append(cat["name"])
        stuff_colors.append(color)
        if cat["isthing"]:
            thing_map[cat_id] = index
            thing_classes.append(cat["name"])
            thing_colors.append(color)
    return {
        "thing_classes": thing_classes,
        "thing_colors": thing_colors,
        "stuff_classes": stuff_classes,
        "stuff_colors": stuff_colors,
        "thing_dataset_id_to_contiguous_id": thing_map,
        "stuff_dataset_id_to_contiguous_id": stuff_map,
    }


def _hint(prepare_hint: str) -> str:
    return f"; to prepare the data: {prepare_hint}" if prepare_hint else ""


def resolve_data_root(prepare_hint: str = "") -> str:
    """
    :func:`data_root`, checked.

    Raises:
        FileNotFoundError: the folder does not exist (names it, where it came from, and the hint).
    """
    root = data_root()
    if not os.path.isdir(root):
        source = "$DETECTRON2_DATASETS" if os.environ.get("DETECTRON2_DATASETS") else "the default"
        raise FileNotFoundError(
            f"data root {os.path.abspath(root)} ({source}) does not exist; set DETECTRON2_DATASETS "
            f"to the folder holding the datasets{_hint(prepare_hint)}"
        )
    return root


def _describe_ids(ids: Iterable) -> str:
    ids = sorted(ids)
    if ids and all(isinstance(i, int) for i in ids) and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}..{ids[-1]}"
    return repr(ids)


def _require_dir(path: str, what: str, prepare_hint: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} directory {path} does not exist{_hint(prepare_hint)}")


def check_files_exist(paths: Sequence[str], what: str, prepare_hint: str = "") -> None:
    """
    Check that every path is a file, listing each directory once rather than calling ``stat`` per
    file (COCO has 118k images).

    Raises:
        FileNotFoundError: naming how many are missing, the first few, and ``prepare_hint``.
    """
    by_dir: Dict[str, List[str]] = defaultdict(list)
    for p in paths:
        by_dir[os.path.dirname(p)].append(p)
    missing = []
    for folder, files in by_dir.items():
        try:
            present = set(os.listdir(folder))
        except OSError:
            present = set()
        missing.extend(p for p in files if os.path.basename(p) not in present)
    # a name absent from the listing may still exist on a case-insensitive file system
    missing = [p for p in missing if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} {what} file(s) do not exist: {shown}"
            f"{_hint(prepare_hint)}"
        )


def _convert_segment(
    segment: Mapping, meta: Mapping, json_file: str, ann_index: int, image_id
) -> dict:
    """One ``segments_info`` entry with its dataset category id made contiguous."""
    if "id" not in segment or "category_id" not in segment:
        raise ValueError(
            f"{json_file}: annotation #{ann_index} (image_id {image_id!r}) has a segment without "
            f"'id' or 'category_id': {dict(segment)!r}"
        )
    things = meta["thing_dataset_id_to_contiguous_id"]
    stuff = meta["stuff_dataset_id_to_contiguous_id"]
    cat_id = segment["category_id"]
    converted = dict(segment)
    if cat_id in things:
        converted["category_id"] = things[cat_id]
        converted["isthing"] = True
    elif cat_id in stuff:
        converted["category_id"] = stuff[cat_id]
        converted["isthing"] = False
    else:
        raise ValueError(
            f"{json_file}: annotation #{ann_index} (image_id {image_id!r}), segment id "
            f"{segment['id']!r} has category_id {cat_id!r}, which is not a category of this "
            f"dataset (valid ids: {_describe_ids(stuff)})"
        )
    converted.setdefault("iscrowd", 0)
    return converted


def _check_segment_ids(
    segments: Sequence[Mapping], json_file: str, ann_index: int, png: str
) -> None:
    """Segment ids of one annotation are positive (0 is void in the PNG) and unique: otherwise two
    segments would share one mask, or a segment would claim the void pixels."""
    counts = Counter(s["id"] for s in segments)
    bad = sorted((i for i in counts if not isinstance(i, int) or i <= 0), key=str)
    dup = sorted((i for i, n in counts.items() if n > 1), key=str)
    if bad or dup:
        raise ValueError(
            f"{json_file}: annotation #{ann_index} ({png!r}) has segment ids that are "
            + (f"not positive integers {bad} (0 is void) " if bad else "")
            + (f"repeated {dup}" if dup else "")
        )


def load_panoptic_json(
    json_file: str,
    image_dir: str,
    panoptic_dir: str,
    semseg_dir: Optional[str],
    meta: Mapping,
    *,
    prepare_hint: str = "",
) -> List[dict]:
    """
    Load a COCO-panoptic-format dataset into detectron2 dicts (Mask2Former's record layout).

    The image of an annotation is the ``file_name`` of the json ``images`` entry with the same
    ``id`` (so any image extension works); its panoptic PNG is the annotation's ``file_name`` in
    ``panoptic_dir``, and its semantic label map the same name in ``semseg_dir``.

    Args:
        json_file: the panoptic json (``images``, ``annotations``; ``categories`` is not read,
            ``meta`` defines the classes).
        image_dir: folder of the images.
        panoptic_dir: folder of the panoptic PNGs (segment id = R + 256 G + 256^2 B).
        semseg_dir: folder of semantic label maps (class index of the full list, 255 void), or
            None for records without ``sem_seg_file_name``.
        meta: has ``thing_dataset_id_to_contiguous_id`` and ``stuff_dataset_id_to_contiguous_id``
            as built by :func:`panoptic_metadata`.
        prepare_hint: the command that creates the data, quoted in errors.

    Returns:
        list[dict]: one per annotation, in json order: ``file_name``, ``image_id``,
        ``pan_seg_file_name``, ``sem_seg_file_name`` (if ``semseg_dir``), ``height``/``width``
        (if the images entry has them), ``segments_info`` (``id``, contiguous ``category_id``,
        ``isthing``, ``iscrowd`` (0 when absent), and ``area``/``bbox`` as given).

    Raises:
        FileNotFoundError: the json, a folder or a referenced file does not exist.
        ValueError: the json is malformed (bad JSON, missing keys, an annotation whose image_id
            has no image entry, an unknown category id, segment ids repeated or not positive).

    Checks that need the files decoded (PNG segment ids against ``segments_info``, sizes, label
    values) are the training mapper's, at read time: doing them here would decode every PNG of
    the dataset at each load.
    """
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"panoptic json {json_file} does not exist{_hint(prepare_hint)}")
    _require_dir(image_dir, "image", prepare_hint)
    _require_dir(panoptic_dir, "panoptic PNG", prepare_hint)
    if semseg_dir is not None:
        _require_dir(semseg_dir, "semantic label", prepare_hint)

    with open(json_file) as f:
        try:
            content = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{json_file} is not valid JSON ({e}){_hint(prepare_hint)}") from e
    if not isinstance(content, dict) or not all(
        isinstance(content.get(k), list) for k in ("images", "annotations")
    ):
        raise ValueError(
            f"{json_file}: a COCO panoptic json is an object with lists 'images' and "
            "'annotations'"
        )

    images = {}
    for index, image in enumerate(content["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise ValueError(f"{json_file}: images entry #{index} needs 'id' and 'file_name'")
        if image["id"] in images:
            raise ValueError(f"{json_file}: images entry #{index} repeats id {image['id']!r}")
        images[image["id"]] = image

    records = []
    for index, ann in enumerate(content["annotations"]):
        missing = [
            k
            for k in ("image_id", "file_name", "segments_info")
            if not isinstance(ann, dict) or k not in ann
        ]
        if missing:
            raise ValueError(f"{json_file}: annotation #{index} lacks key(s) {missing}")
        image_id = ann["image_id"]
        if image_id not in images:
            raise ValueError(
                f"{json_file}: annotation #{index} ({ann['file_name']!r}) has image_id "
                f"{image_id!r}, which no 'images' entry has ({len(images)} image ids)"
            )
        image = images[image_id]
        record = {
            "file_name": os.path.join(image_dir, image["file_name"]),
            "image_id": image_id,
            "pan_seg_file_name": os.path.join(panoptic_dir, ann["file_name"]),
        }
        if semseg_dir is not None:
            record["sem_seg_file_name"] = os.path.join(semseg_dir, ann["file_name"])
        for key in ("height", "width"):
            if key in image:
                record[key] = image[key]
        record["segments_info"] = [
            _convert_segment(s, meta, json_file, index, image_id) for s in ann["segments_info"]
        ]
        _check_segment_ids(record["segments_info"], json_file, index, ann["file_name"])
        records.append(record)
    if not records:
        raise ValueError(f"{json_file} has no annotations{_hint(prepare_hint)}")

    check_files_exist([r["file_name"] for r in records], "image", prepare_hint)
    check_files_exist([r["pan_seg_file_name"] for r in records], "panoptic PNG", prepare_hint)
    if semseg_dir is not None:
        check_files_exist([r["sem_seg_file_name"] for r in records], "semantic label", prepare_hint)
    return records


def _files_by_stem(folder: str, ext: str) -> Dict[str, str]:
    return {
        name[: -len(ext)]: os.path.join(folder, name)
        for name in os.listdir(folder)
        if name.endswith(ext) and os.path.isfile(os.path.join(folder, name))
    }


def load_sem_seg_folders(
    image_dir: str,
    gt_dir: str,
    *,
    image_ext: str = ".jpg",
    gt_ext: str = ".png",
    prepare_hint: str = "",
) -> List[dict]:
    """
    detectron2's ``load_sem_seg`` with errors instead of silent intersection: every image
    ``<stem><image_ext>`` in ``image_dir`` must have the label map ``<stem><gt_ext>`` in ``gt_dir``
    and the other way round.

    Returns:
        list[dict]: ``file_name``, ``sem_seg_file_name``, ``image_id`` (the stem), sorted by stem
        (the order of detectron2's loader, which image-to-step assignment files rely on).

    Raises:
        FileNotFoundError: a folder is missing or holds no image.
        ValueError: an image has no label map, or a label map no image (both paths named).
    """
    _require_dir(image_dir, "image", prepare_hint)
    _require_dir(gt_dir, "semantic label", prepare_hint)
    images = _files_by_stem(image_dir, image_ext)
    labels = _files_by_stem(gt_dir, gt_ext)
    if not images:
        raise FileNotFoundError(f"no *{image_ext} images in {image_dir}{_hint(prepare_hint)}")
    for stems, have, lack, need_dir, need_ext, kind in (
        (sorted(set(images) - set(labels)), images, "label map", gt_dir, gt_ext, "image"),
        (sorted(set(labels) - set(images)), labels, "image", image_dir, image_ext, "label map"),
    ):
        if stems:
            raise ValueError(
                f"{len(stems)} {kind}(s) without a {lack}, e.g. {have[stems[0]]} has no "
                f"{os.path.join(need_dir, stems[0] + need_ext)}{_hint(prepare_hint)}"
            )
    return [
        {"file_name": images[s], "sem_seg_file_name": labels[s], "image_id": s}
        for s in sorted(images)
    ]


def _under_root(path: Optional[str], root: str) -> Optional[str]:
    # os.path.join keeps an absolute path as is
    return None if path is None else os.path.join(root, path)


def register_panoptic(
    name: str,
    *,
    metadata: dict,
    image_root: str,
    panoptic_root: str,
    panoptic_json: str,
    sem_seg_root: Optional[str],
    prepare_hint: str,
    evaluator_type: str = "coco_panoptic_seg",
    before_load: Optional[Callable[[], None]] = None,
) -> None:
    """
    Register a COCO-panoptic-format dataset: DatasetCatalog ``name`` loads it with
    :func:`load_panoptic_json`, MetadataCatalog ``name`` holds ``metadata`` (from
    :func:`panoptic_metadata`) plus ``image_root``, ``panoptic_root``, ``panoptic_json``,
    ``json_file`` (= panoptic_json), ``sem_seg_root`` (if given), ``evaluator_type``,
    ``ignore_label`` 255 and ``label_divisor`` 1000.

    Args:
        name: the catalog name (registering a name twice is an error in detectron2).
        metadata: class metadata, see :func:`panoptic_metadata`.
        image_root, panoptic_root, panoptic_json, sem_seg_root: paths relative to
            :func:`data_root`, joined when the dataset is loaded; the metadata gets them joined
            with the data root of registration time. ``sem_seg_root`` None: no semantic maps.
        prepare_hint: the command that creates the data, quoted in errors.
        evaluator_type: picks the evaluator and the training mapper.
        before_load: called before each load (e.g. to generate the data on first use).
    """
    registered_root = data_root()

    def load() -> List[dict]:
        if before_load is not None:
            before_load()
        root = resolve_data_root(prepare_hint)
        if root != registered_root:
            logger.warning(
                f"dataset {name!r} loads from {root}, but its metadata (used by evaluators) was "
                f"registered under {registered_root}: set DETECTRON2_DATASETS before importing "
                "comformer"
            )
        return load_panoptic_json(
            _under_root(panoptic_json, root),
            _under_root(image_root, root),
            _under_root(panoptic_root, root),
            _under_root(sem_seg_root, root),
            metadata,
            prepare_hint=prepare_hint,
        )

    DatasetCatalog.register(name, load)
    paths = {
        "image_root": _under_root(image_root, registered_root),
        "panoptic_root": _under_root(panoptic_root, registered_root),
        "panoptic_json": _under_root(panoptic_json, registered_root),
        "json_file": _under_root(panoptic_json, registered_root),
    }
    if sem_seg_root is not None:
        paths["sem_seg_root"] = _under_root(sem_seg_root, registered_root)
    MetadataCatalog.get(name).set(
        **paths,
        evaluator_type=evaluator_type,
        ignore_label=IGNORE_LABEL,
        label_divisor=LABEL_DIVISOR,
        **metadata,
    )


def register_sem_seg(
    name: str,
    *,
    metadata: dict,
    image_root: str,
    sem_seg_root: str,
    prepare_hint: str,
    image_ext: str = ".jpg",
    gt_ext: str = ".png",
    evaluator_type: str = "sem_seg",
    before_load: Optional[Callable[[], None]] = None,
) -> None:
    """
    Register a semantic dataset stored as an image folder and a label-map folder with matching
    file stems (see :func:`load_sem_seg_folders`). MetadataCatalog ``name`` holds ``metadata``
    (which must have ``stuff_classes``, all K classes, and usually ``stuff_colors``) plus
    ``image_root``, ``sem_seg_root``, ``evaluator_type`` and ``ignore_label`` 255.

    Args:
        name: the catalog name.
        metadata: class metadata.
        image_root, sem_seg_root: paths relative to :func:`data_root` (see
            :func:`register_panoptic` for when they are resolved).
        prepare_hint: the command that creates the data, quoted in errors.
        image_ext, gt_ext: file extensions of images and label maps.
        evaluator_type: picks the evaluator and the training mapper.
        before_load: called before each load (e.g. to generate the data on first use).
    """
    if "stuff_classes" not in metadata:
        raise ValueError(
            f"metadata of {name!r} needs 'stuff_classes' (the names of all classes, index = label)"
        )

    def load() -> List[dict]:
        if before_load is not None:
            before_load()
        root = resolve_data_root(prepare_hint)
        return load_sem_seg_folders(
            _under_root(image_root, root),
            _under_root(sem_seg_root, root),
            image_ext=image_ext,
            gt_ext=gt_ext,
            prepare_hint=prepare_hint,
        )

    DatasetCatalog.register(name, load)
    set_sem_seg_metadata(
        name,
        metadata=metadata,
        image_root=_under_root(image_root, data_root()),
        sem_seg_root=_under_root(sem_seg_root, data_root()),
        evaluator_type=evaluator_type,
    )


def set_sem_seg_metadata(
    name: str, *, metadata: dict, image_root: str, sem_seg_root: str, evaluator_type: str
) -> None:
    """The MetadataCatalog entry of a semantic dataset (shared with list-file loaders)."""
    MetadataCatalog.get(name).set(
        image_root=image_root,
        sem_seg_root=sem_seg_root,
        evaluator_type=evaluator_type,
        ignore_label=IGNORE_LABEL,
        **metadata,
    )
