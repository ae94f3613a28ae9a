"""The built-in synthetic panoptic dataset: deterministic, small, learnable on CPU, not trivial.

Classes are designed so that colour alone never decides: every object and region draws its colours
from one shared palette, each palette colour being the usual colour of 2-3 classes, and 30% of
objects wear any colour. *Things* are instances of a shape (circle, square, triangle, cross, ring,
crescent) filled with a texture (solid, stripes, dots); the class is the (shape, texture) pair.
*Stuff* classes are large regions told apart only by their texture (stripes of three orientations,
checkerboard, grid of dots, waves, blotchy noise, smooth gradient). Images add per-image brightness
changes, pixel noise, small clutter specks, a wide range of object scales, and objects that overlap,
touch and occlude each other; segments occluded below a minimum area become void.

The files follow ADE20K panoptic as prepared for Mask2Former::

    <root>/synthetic/
        images/{train,val}/NNNNNN.png                RGB
        panoptic_{train,val}/NNNNNN.png              segment ids as RGB (panopticapi id2rgb), 0 = void
        panoptic_{train,val}.json                    COCO panoptic: images, annotations, categories
        semantic_{train,val}/NNNNNN.png              contiguous class ids, 255 = void
        generator.json                               the parameters the files were made with

Generation is seeded per image, written to a temporary folder and renamed into place, under a file
lock, so concurrent first uses (several test workers, several ranks) generate it once. That machinery
(:func:`generate`, :func:`ensure_generated`) writes any *spec*: an object with ``num_images(split)``,
``categories()``, ``render(index, split)`` (as :func:`render_image`) and ``record()`` (what the
cached copy must match). This module's :class:`SyntheticSpec` is one; the benchmark and the
background-class sets of ``synthetic_shapes.py`` are others.

Run as a script to (re)generate: ``python -m comformer.data.datasets.synthetic --help``.
"""
import argparse
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import sys
import tempfile
from typing import ClassVar, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

__all__ = [
    "GeneratorSpec",
    "SyntheticSpec",
    "SHAPES",
    "THING_TEXTURES",
    "STUFF_TEXTURES",
    "PALETTE",
    "synthetic_categories",
    "render_image",
    "interleave_categories",
    "finish_segments",
    "generate",
    "ensure_generated",
    "spec_kinds",
]

logger = logging.getLogger(__name__)

# Version of the drawing code: bump it when rendering changes so cached copies are regenerated.
GENERATOR_VERSION = 4

SHAPES = ("circle", "square", "triangle", "cross", "ring", "crescent")
THING_TEXTURES = ("solid", "stripes", "dots")
STUFF_TEXTURES = (
    "hstripes",
    "vstripes",
    "dstripes",
    "checker",
    "dotgrid",
    "waves",
    "blotches",
    "gradient",
)
# One palette shared by every class, so that no class owns a colour.
PALETTE = np.array(
    [
        [200, 60, 50],
        [60, 170, 70],
        [50, 90, 200],
        [220, 200, 60],
        [170, 80, 190],
        [70, 190, 200],
        [235, 235, 235],
        [40, 40, 40],
    ],
    dtype=np.float32,
)


class GeneratorSpec:
    """
    What the writing machinery needs of a spec, besides ``num_train`` / ``num_val`` fields and
    ``categories()`` / ``render(index, split)`` methods: the split sizes, and the record stored in
    ``generator.json`` that a cached copy must match (a spec's fields, its kind and the version of
    its drawing code, so that a change of either regenerates the data).
    """

    # Name of the generator (stored in generator.json) and version of its drawing code.
    kind: ClassVar[str] = ""
    version: ClassVar[int] = 0
    # Folder under the data root of the registered copy.
    default_folder: ClassVar[str] = ""

    def num_images(self, split: str) -> int:
        if split not in ("train", "val"):
            raise ValueError(f"unknown synthetic split {split!r}; valid: 'train', 'val'")
        return self.num_train if split == "train" else self.num_val

    def record(self) -> Dict:
        return {"kind": self.kind, "version": self.version, "spec": dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class SyntheticSpec(GeneratorSpec):
    """Every count and size of the synthetic dataset; the defaults are the registered dataset."""

    kind: ClassVar[str] = "mixed"
    version: ClassVar[int] = GENERATOR_VERSION
    default_folder: ClassVar[str] = "synthetic"

    num_train: int = 300
    num_val: int = 100
    image_size: int = 96
    # Things are (shape, texture) pairs taken in order: shape-major over SHAPES x THING_TEXTURES.
    num_thing_classes: int = 12
    num_stuff_classes: int = 8
    # Stuff regions per image and thing instances per image (inclusive ranges).
    min_regions: int = 2
    max_regions: int = 4
    min_things: int = 2
    max_things: int = 5
    # Object radius as a fraction of the image size (scale changes).
    min_scale: float = 0.12
    max_scale: float = 0.28
    # A thing segment left with fewer visible pixels than this becomes void.
    min_segment_area: int = 12
    # Standard deviation of additive pixel noise (0-255 scale).
    noise_std: float = 8.0
    # Small specks of random colour that belong to whatever region they fall on.
    max_clutter: int = 5
    # Probability that an object wears its class's palette colour (shared by 2-3 classes).
    colour_bias: float = 0.7
    seed: int = 0

    def __post_init__(self):
        max_things = len(SHAPES) * len(THING_TEXTURES)
        checks = [
            (1 <= self.num_thing_classes <= max_things, f"num_thing_classes in [1, {max_things}]"),
            (
                1 <= self.num_stuff_classes <= len(STUFF_TEXTURES),
                f"num_stuff_classes in [1, {len(STUFF_TEXTURES)}]",
            ),
            (self.num_train >= 0 and self.num_val >= 0, "num_train, num_val >= 0"),
            (self.image_size >= 32, "image_size >= 32"),
            (1 <= self.min_regions <= self.max_regions, "1 <= min_regions <= max_regions"),
            (0 <= self.min_things <= self.max_things, "0 <= min_things <= max_things"),
            (0 < self.min_scale <= self.max_scale < 0.5, "0 < min_scale <= max_scale < 0.5"),
            (0.0 <= self.colour_bias <= 1.0, "0 <= colour_bias <= 1"),
        ]
        for ok, rule in checks:
            if not ok:
                raise ValueError(f"invalid SyntheticSpec {self}: need {rule}")

    @property
    def num_classes(self) -> int:
        return self.num_thing_classes + self.num_stuff_classes

    def categories(self) -> List[Dict]:
        return synthetic_categories(self)

    def render(self, index: int, split: str):
        return render_image(self, index, split)

    def record(self) -> Dict:
        # The first generator's record, kept so that existing copies stay valid.
        return {"version": GENERATOR_VERSION, "spec": dataclasses.asdict(self)}


def synthetic_categories(spec: SyntheticSpec = SyntheticSpec()) -> List[Dict]:
    """
    COCO-panoptic categories of the dataset in contiguous order (things and stuff interleaved).

    Returns:
        list of {"id" (1-based dataset id), "name", "isthing" (0/1), "color" [r, g, b]}.
    """
    things = [(s, t) for s in SHAPES for t in THING_TEXTURES][: spec.num_thing_classes]
    thing_cats = [
        {"name": f"{shape}_{texture}" if texture != "solid" else shape, "isthing": 1}
        for shape, texture in things
    ]
    stuff_cats = [{"name": t, "isthing": 0} for t in STUFF_TEXTURES[: spec.num_stuff_classes]]
    cats = interleave_categories(thing_cats, stuff_cats)
    # Visualisation colours, distinct per class (unlike the rendering palette).
    rng = np.random.RandomState(1234)
    for i, cat in enumerate(cats):
        cat["id"] = i + 1
        cat["color"] = [int(c) for c in rng.randint(30, 256, size=3)]
    return [{k: c[k] for k in ("id", "name", "isthing", "color")} for c in cats]


def interleave_categories(things: List[Dict], stuff: List[Dict]) -> List[Dict]:
    """
    Things and stuff interleaved in proportion (like ADE20K's order), so that any prefix of the
    classes, e.g. a continual scenario's base step, holds both kinds. Each list keeps its order;
    on a tie the thing comes first.
    """
    keyed = [((i + 0.5) / len(things), 0, c) for i, c in enumerate(things)]
    keyed += [((i + 0.5) / len(stuff), 1, c) for i, c in enumerate(stuff)]
    return [c for _, _, c in sorted(keyed, key=lambda k: (k[0], k[1]))]


# --------------------------------------------------------------------------------------- drawing
def _grid(size: int) -> Tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return ys + 0.5, xs + 0.5


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of a shape of radius r in its own rotated, centred coordinates (u, v)."""
    rho = np.sqrt(u * u + v * v)
    if shape == "circle":
        return rho <= r
    if shape == "square":
        half = r * 0.8
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if shape == "triangle":
        # Equilateral triangle pointing up (in v), inscribed in the circle of radius r.
        return (v >= -0.5 * r) & (np.sqrt(3) * u + v <= r) & (-np.sqrt(3) * u + v <= r)
    if shape == "cross":
        arm = r * 0.33
        return ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))
    if shape == "ring":
        return (rho <= r) & (rho >= 0.55 * r)
    if shape == "crescent":
        shifted = np.sqrt((u - 0.45 * r) ** 2 + v * v)
        return (rho <= r) & (shifted > 0.8 * r)
    raise ValueError(f"unknown shape {shape!r}; valid: {SHAPES}")


def _two_colours(
    rng: np.random.RandomState, class_index: int, colour_bias: float
) -> Tuple[np.ndarray, np.ndarray]:
    """The main and second colour of an object. With probability ``colour_bias`` the main colour
    is the class's own palette entry (index mod the palette size, so 2-3 classes share each
    colour), otherwise any palette entry: colour narrows the candidates, never decides."""
    if rng.rand() < colour_bias:
        a = class_index % len(PALETTE)
    else:
        a = rng.randint(len(PALETTE))
    b = (a + 1 + rng.randint(len(PALETTE) - 1)) % len(PALETTE)
    return PALETTE[a], PALETTE[b]


def _thing_texture(texture, u, v, r, rng, colours) -> np.ndarray:
    """(H, W, 3) colours of a thing's texture in its own coordinates."""
    c1, c2 = colours
    if texture == "solid":
        sel = np.zeros(u.shape, dtype=bool)
    elif texture == "stripes":
        period = max(5.0, r * rng.uniform(0.4, 0.6))
        sel = np.floor(u / period * 2).astype(np.int64) % 2 == 0
    elif texture == "dots":
        period = max(6.0, r * rng.uniform(0.45, 0.65))
        du = (u / period) - np.round(u / period)
        dv = (v / period) - np.round(v / period)
        sel = du * du + dv * dv <= 0.09
    else:
        raise ValueError(f"unknown thing texture {texture!r}; valid: {THING_TEXTURES}")
    return np.where(sel[..., None], c2, c1)


def _stuff_texture(texture, ys, xs, size, rng, colours) -> np.ndarray:
    """(H, W, 3) colours of a stuff texture over the whole image."""
    c1, c2 = colours
    period = rng.uniform(0.07, 0.12) * size
    phase = rng.uniform(0, period)
    if texture == "hstripes":
        t = (np.floor((ys + phase) / period * 2) % 2).astype(np.float32)
    elif texture == "vstripes":
        t = (np.floor((xs + phase) / period * 2) % 2).astype(np.float32)
    elif texture == "dstripes":
        t = (np.floor((xs + ys + phase) / period * 1.4) % 2).astype(np.float32)
    elif texture == "checker":
        t = ((np.floor((xs + phase) / period) + np.floor((ys + phase) / period)) % 2).astype(
            np.float32
        )
    elif texture == "dotgrid":
        dx = (xs + phase) / period - np.round((xs + phase) / period)
        dy = (ys + phase) / period - np.round((ys + phase) / period)
        t = (dx * dx + dy * dy <= 0.06).astype(np.float32)
    elif texture == "waves":
        t = (np.sin(ys / period * 2 * np.pi + 2.5 * np.sin(xs / (2 * period) * np.pi)) > 0).astype(
            np.float32
        )
    elif texture == "blotches":
        t = (_smooth_noise(size, cells=int(size / period) + 1, rng=rng) > 0.5).astype(np.float32)
    elif texture == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        proj = np.cos(angle) * xs + np.sin(angle) * ys
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
    else:
        raise ValueError(f"unknown stuff texture {texture!r}; valid: {STUFF_TEXTURES}")
    return c1 * (1 - t[..., None]) + c2 * t[..., None]


def _smooth_noise(size: int, cells: int, rng: np.random.RandomState) -> np.ndarray:
    """Value noise in [0, 1]: random values on a coarse grid, bilinearly upsampled."""
    coarse = rng.rand(cells + 2, cells + 2).astype(np.float32)
    img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def _stuff_layout(num_regions: int, size: int, rng) -> np.ndarray:
    """(H, W) region index in [0, num_regions): a Voronoi partition with wobbly borders."""
    ys, xs = _grid(size)
    centres = rng.uniform(0, size, size=(num_regions, 2))
    dist = np.stack([(ys - cy) ** 2 + (xs - cx) ** 2 for cy, cx in centres])
    wobble = np.stack([_smooth_noise(size, 3, rng) for _ in range(num_regions)])
    dist = np.sqrt(dist) + wobble * size * 0.35
    return dist.argmin(0)


def render_image(
    spec: SyntheticSpec, index: int, split: str
) -> Tuple[np.ndarray, np.ndarray, List[Dict]]:
    """
    Draw one image. Deterministic in (spec, split, index).

    Returns:
        image (H, W, 3) uint8; segment id map (H, W) int32 with 0 = void; and segments
        [{"id", "category_id" (1-based dataset id), "iscrowd": 0, "area", "bbox" [x, y, w, h]}].
    """
    split_offset = {"train": 0, "val": 1}[split]
    rng = np.random.RandomState([spec.seed, split_offset, index])
    size = spec.image_size
    ys, xs = _grid(size)
    cats = synthetic_categories(spec)
    thing_ids = [c["id"] for c in cats if c["isthing"]]
    stuff_ids = [c["id"] for c in cats if not c["isthing"]]
    names = {c["id"]: c["name"] for c in cats}

    image = np.zeros((size, size, 3), dtype=np.float32)
    seg = np.zeros((size, size), dtype=np.int32)
    seg_category: Dict[int, int] = {}
    next_id = 1

    # Stuff: a few distinct textures, each one connected-ish region of a Voronoi partition.
    num_regions = rng.randint(spec.min_regions, spec.max_regions + 1)
    num_regions = min(num_regions, len(stuff_ids))
    region_cats = rng.choice(stuff_ids, size=num_regions, replace=False)
    layout = _stuff_layout(num_regions, size, rng)
    for region, cat in enumerate(region_cats):
        sel = layout == region
        if not sel.any():
            continue
        texture = names[int(cat)]
        colours = _two_colours(rng, int(cat) - 1, spec.colour_bias)
        image[sel] = _stuff_texture(texture, ys, xs, size, rng, colours)[sel]
        seg[sel] = next_id
        seg_category[next_id] = int(cat)
        next_id += 1

    # Clutter: specks painted over stuff that keep the region's label.
    for _ in range(rng.randint(0, spec.max_clutter + 1)):
        cy, cx = rng.uniform(0, size, size=2)
        rad = rng.uniform(1.0, 2.5)
        sel = (ys - cy) ** 2 + (xs - cx) ** 2 <= rad * rad
        image[sel] = PALETTE[rng.randint(len(PALETTE))]

    # Things: later instances occlude earlier ones; centres may sit near others so they touch.
    num_things = rng.randint(spec.min_things, spec.max_things + 1)
    centres: List[Tuple[float, float]] = []
    for _ in range(num_things):
        cat = int(rng.choice(thing_ids))
        shape, _, texture = names[cat].partition("_")
        texture = texture or "solid"
        r = rng.uniform(spec.min_scale, spec.max_scale) * size
        if centres and rng.rand() < 0.5:
            # Place next to an existing object: overlapping or touching instances.
            py, px = centres[rng.randint(len(centres))]
            ang = rng.uniform(0, 2 * np.pi)
            dist = r * rng.uniform(0.6, 1.6)
            cy, cx = py + dist * np.sin(ang), px + dist * np.cos(ang)
        else:
            cy, cx = rng.uniform(0.1 * size, 0.9 * size, size=2)
        centres.append((cy, cx))
        theta = rng.uniform(0, 2 * np.pi)
        dy, dx = ys - cy, xs - cx
        u = np.cos(theta) * dx + np.sin(theta) * dy
        v = -np.sin(theta) * dx + np.cos(theta) * dy
        sel = _shape_mask(shape, u, v, r)
        if not sel.any():
            continue
        colours = _two_colours(rng, cat - 1, spec.colour_bias)
        image[sel] = _thing_texture(texture, u, v, r, rng, colours)[sel]
        seg[sel] = next_id
        seg_category[next_id] = cat
        next_id += 1

    # Photometric changes: brightness/contrast per image, then pixel noise.
    gain, bias = rng.uniform(0.75, 1.2), rng.uniform(-20, 20)
    image = image * gain + bias + rng.normal(0, spec.noise_std, size=image.shape)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)

    segments = finish_segments(seg, seg_category, set(thing_ids), spec.min_segment_area)
    return image, seg, segments


def finish_segments(
    seg: np.ndarray, seg_category: Dict[int, int], thing_ids: set, min_thing_area: int
) -> List[Dict]:
    """
    The ``segments_info`` of a drawn segment id map. Thing segments that occlusion left with
    fewer than ``min_thing_area`` pixels become void (0) in ``seg``, in place: too ambiguous to be
    labelled. Segments without a pixel are left out.

    Args:
        seg: (H, W) int32 segment ids, 0 = void.
        seg_category: segment id -> 1-based dataset category id.
        thing_ids: the dataset ids of thing categories.
        min_thing_area: minimum visible pixels of a thing segment.

    Returns:
        [{"id", "category_id", "iscrowd": 0, "area", "bbox" [x, y, w, h]}] in segment id order.
    """
    segments = []
    for seg_id, cat in seg_category.items():
        sel = seg == seg_id
        area = int(sel.sum())
        if area == 0:
            continue
        if cat in thing_ids and area < min_thing_area:
            seg[sel] = 0
            continue
        rows, cols = np.nonzero(sel)
        x0, y0 = int(cols.min()), int(rows.min())
        bbox = [x0, y0, int(cols.max()) - x0 + 1, int(rows.max()) - y0 + 1]
        segments.append(
            {"id": int(seg_id), "category_id": cat, "iscrowd": 0, "area": area, "bbox": bbox}
        )
    return segments


# ------------------------------------------------------------------------------------ writing
def _id2rgb(seg: np.ndarray) -> np.ndarray:
    rgb = np.zeros(seg.shape + (3,), dtype=np.uint8)
    for channel in range(3):
        rgb[..., channel] = (seg >> (8 * channel)) & 255
    return rgb


def _write_split(folder: str, spec: GeneratorSpec, split: str, categories: List[Dict]) -> None:
    contiguous = {c["id"]: i for i, c in enumerate(categories)}
    image_dir = os.path.join(folder, "images", split)
    pan_dir = os.path.join(folder, f"panoptic_{split}")
    sem_dir = os.path.join(folder, f"semantic_{split}")
    for d in (image_dir, pan_dir, sem_dir):
        os.makedirs(d, exist_ok=True)
    images, annotations = [], []
    for index in range(spec.num_images(split)):
        image, seg, segments = spec.render(index, split)
        stem = f"{index:06d}"
        Image.fromarray(image).save(os.path.join(image_dir, stem + ".png"))
        Image.fromarray(_id2rgb(seg)).save(os.path.join(pan_dir, stem + ".png"))
        sem = np.full(seg.shape, 255, dtype=np.uint8)
        for s in segments:
            sem[seg == s["id"]] = contiguous[s["category_id"]]
        Image.fromarray(sem).save(os.path.join(sem_dir, stem + ".png"))
        images.append(
            {"id": stem, "file_name": stem + ".png", "height": seg.shape[0], "width": seg.shape[1]}
        )
        annotations.append({"image_id": stem, "file_name": stem + ".png", "segments_info": segments})
    with open(os.path.join(folder, f"panoptic_{split}.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def generate(folder: str, spec: GeneratorSpec = SyntheticSpec()) -> str:
    """
    Write the whole dataset into ``folder`` (replacing it), atomically: the files are written to a
    temporary sibling folder that is renamed into place at the end, so an interrupted run leaves
    either the previous copy or none, never half of one.

    Returns:
        ``folder``.
    """
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".synthetic-tmp-", dir=parent)
    try:
        categories = spec.categories()
        for split in ("train", "val"):
            _write_split(tmp, spec, split, categories)
        with open(os.path.join(tmp, "generator.json"), "w") as f:
            json.dump(spec.record(), f, indent=1)
        if os.path.exists(folder):
            old = tempfile.mkdtemp(prefix=".synthetic-old-", dir=parent)
            os.rename(folder, os.path.join(old, "data"))
            os.rename(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def is_generated(folder: str, spec: GeneratorSpec = SyntheticSpec()) -> bool:
    """Whether ``folder`` holds a complete copy made with exactly ``spec`` and this code version."""
    record = os.path.join(folder, "generator.json")
    if not os.path.isfile(record):
        return False
    try:
        with open(record) as f:
            return json.load(f) == spec.record()
    except (OSError, json.JSONDecodeError):
        return False


def ensure_generated(folder: str, spec: GeneratorSpec = SyntheticSpec()) -> str:
    """
    Generate the dataset into ``folder`` unless a matching copy is already there.

    Safe to call from several processes at once: one generates while the others wait on a lock file.
    """
    if is_generated(folder, spec):
        return folder
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    with open(os.path.join(parent, ".synthetic.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not is_generated(folder, spec):
                logger.info(f"Generating the synthetic dataset ({spec.kind}) into {folder} ...")
                generate(folder, spec)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return folder


def spec_kinds() -> Dict[str, type]:
    """Spec class of each generator, by ``kind``."""
    from .synthetic_shapes import ShapesSpec, VocSpec

    return {cls.kind: cls for cls in (SyntheticSpec, ShapesSpec, VocSpec)}


def main(argv: Optional[List[str]] = None) -> int:
    from .common import data_root

    kinds = spec_kinds()
    chooser = argparse.ArgumentParser(add_help=False)
    chooser.add_argument("--kind", choices=sorted(kinds), default=SyntheticSpec.kind)
    kind = chooser.parse_known_args(argv)[0].kind
    spec_cls = kinds[kind]

    parser = argparse.ArgumentParser(
        description="Generate one of comformer's synthetic datasets: 'mixed' (synthetic_*, "
        "the first set), 'shapes' (synthetic_shapes_*, the benchmark), 'voc' (synthetic_voc_*, "
        "semantic with a background class). Pass --kind first to see its options.",
        parents=[chooser],
    )
    parser.add_argument(
        "--output",
        default=None,
        help=f"destination folder (default: $DETECTRON2_DATASETS/{spec_cls.default_folder} or "
        f"datasets/{spec_cls.default_folder})",
    )
    for field in dataclasses.fields(spec_cls):
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            type=type(field.default),
            default=field.default,
            help=f"(default: {field.default})",
        )
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = parser.parse_args(argv)
    spec = spec_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(spec_cls)})
    folder = args.output or os.path.join(data_root(), spec_cls.default_folder)
    if args.force:
        generate(folder, spec)
    else:
        ensure_generated(folder, spec)
    print(
        f"synthetic dataset ({kind}) ready in {folder}: {spec.num_train} train, "
        f"{spec.num_val} val images"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
