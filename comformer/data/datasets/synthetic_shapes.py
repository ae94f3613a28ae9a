"""Synthetic sets for continual benchmarks, in which every class is a new *kind* of object.

In the first synthetic set (``synthetic.py``) classes are (shape, texture) pairs over a shared colour
palette: a later class re-combines cues of earlier ones, and a small model learns it slowly. Here
each of the 14 thing classes is a shape of its own (circle, square, triangle, cross, ring, crescent,
star, hexagon, diamond, heart, arrow, half disc, L, bar) in a colour of its own with a pattern
(solid, stripes or dots, the second colour a darker shade of the first), so a class learned in a
later step shares no cue that identifies an earlier one, as in real class splits.

Two generators share those things and the writing machinery of ``synthetic.py`` (the same files,
seeded per image, written atomically under a lock):

- :class:`ShapesSpec`, the benchmark (``synthetic_shapes_*``): 20 classes, 14 things and 6 stuff
  (grass, water, sand, brick, sky, road: a texture and colours of their own each), interleaved in
  the class order so that the first 10 classes hold 7 things and 3 stuff, and 10-10 or 10-2 steps
  bring new kinds of things and stuff. An image has 2-3 stuff regions and 3-6 things of any class
  (earlier steps' images show later classes, unlabelled in overlap mode), a third of them a second
  instance of a class already there; half the things are placed against another, so instances
  touch and occlude each other.
- :class:`VocSpec`, semantic segmentation with a background class as in Pascal VOC
  (``synthetic_voc_*``): class 0 is ``background`` (every pixel of no object: a varied scene of
  textures and colours, not void), then 12 object classes (the first 12 things above); 1-3 objects
  per image; a one-pixel void band (255) inside each object's outline, as VOC marks its borders.

Run ``python -m comformer.data.datasets.synthetic --kind shapes|voc --help`` to (re)generate.
"""

import dataclasses
from typing import ClassVar, Dict, List, Tuple

import numpy as np

from .synthetic import (
    GeneratorSpec,
    _grid,
    _shape_mask,
    _stuff_layout,
    _stuff_texture,
    _thing_texture,
    finish_segments,
    interleave_categories,
)

__all__ = [
    "THING_CLASSES",
    "STUFF_CLASSES",
    "ShapesSpec",
    "VocSpec",
    "shapes_categories",
    "voc_categories",
    "render_shapes",
    "render_voc",
]

# Thing classes: (shape, colour, pattern). Shape and colour are unique to the class.
THING_CLASSES: Tuple[Tuple[str, Tuple[int, int, int], str], ...] = (
    ("circle", (220, 40, 40), "solid"),
    ("square", (40, 70, 215), "stripes"),
    ("triangle", (240, 215, 40), "solid"),
    ("cross", (40, 175, 60), "dots"),
    ("ring", (245, 135, 25), "solid"),
    ("crescent", (135, 50, 195), "stripes"),
    ("star", (60, 215, 240), "solid"),
    ("hexagon", (250, 160, 195), "dots"),
    ("diamond", (160, 230, 40), "solid"),
    ("heart", (230, 50, 200), "stripes"),
    ("arrow", (140, 80, 30), "solid"),
    ("half_disc", (30, 150, 140), "dots"),
    ("ell", (245, 245, 245), "stripes"),
    ("bar", (25, 25, 110), "solid"),
)
# Stuff classes: (name, texture of synthetic.py, two colours). Muted colours, unlike the things'.
STUFF_CLASSES: Tuple[Tuple[str, str, Tuple[int, int, int], Tuple[int, int, int]], ...] = (
    ("grass", "blotches", (70, 115, 45), (100, 145, 60)),
    ("water", "waves", (45, 85, 140), (80, 125, 180)),
    ("sand", "dotgrid", (205, 185, 140), (165, 145, 100)),
    ("brick", "checker", (150, 70, 55), (105, 45, 35)),
    ("sky", "gradient", (150, 185, 225), (215, 230, 250)),
    ("road", "hstripes", (95, 95, 100), (130, 130, 135)),
)
# How much darker a pattern's second colour is than the class colour.
_PATTERN_SHADE = 0.55


def _check(spec, rules) -> None:
    for ok, rule in rules:
        if not ok:
            raise ValueError(f"invalid {type(spec).__name__} {spec}: need {rule}")


@dataclasses.dataclass(frozen=True)
class ShapesSpec(GeneratorSpec):
    """Every count and size of the benchmark set; the defaults are the registered dataset."""

    kind: ClassVar[str] = "shapes"
    version: ClassVar[int] = 1
    default_folder: ClassVar[str] = "synthetic_shapes"

    num_train: int = 2000
    num_val: int = 200
    image_size: int = 96
    num_thing_classes: int = 14
    num_stuff_classes: int = 6
    # Stuff regions and thing instances per image (inclusive ranges).
    min_regions: int = 2
    max_regions: int = 3
    min_things: int = 3
    max_things: int = 6
    # Probability that a thing is another instance of a class already in the image.
    repeat_prob: float = 0.35
    # Probability that a thing is placed against an earlier one (touching or occluding it).
    near_prob: float = 0.5
    # Object radius as a fraction of the image size.
    min_scale: float = 0.11
    max_scale: float = 0.22
    # A thing segment left with fewer visible pixels than this becomes void.
    min_segment_area: int = 16
    # Standard deviation of additive pixel noise (0-255 scale).
    noise_std: float = 6.0
    seed: int = 0

    def __post_init__(self):
        _check(
            self,
            [
                (
                    1 <= self.num_thing_classes <= len(THING_CLASSES),
                    f"num_thing_classes in [1, {len(THING_CLASSES)}]",
                ),
                (
                    1 <= self.num_stuff_classes <= len(STUFF_CLASSES),
                    f"num_stuff_classes in [1, {len(STUFF_CLASSES)}]",
                ),
                (self.num_train >= 0 and self.num_val >= 0, "num_train, num_val >= 0"),
                (self.image_size >= 32, "image_size >= 32"),
                (1 <= self.min_regions <= self.max_regions, "1 <= min_regions <= max_regions"),
                (0 <= self.min_things <= self.max_things, "0 <= min_things <= max_things"),
                (0 < self.min_scale <= self.max_scale < 0.5, "0 < min_scale <= max_scale < 0.5"),
                (
                    0 <= self.repeat_prob <= 1 and 0 <= self.near_prob <= 1,
                    "probabilities in [0, 1]",
                ),
            ],
        )

    @property
    def num_classes(self) -> int:
        return self.num_thing_classes + self.num_stuff_classes

    def categories(self) -> List[Dict]:
        return shapes_categories(self)

    def render(self, index: int, split: str):
        return render_shapes(self, index, split)


@dataclasses.dataclass(frozen=True)
class VocSpec(GeneratorSpec):
    """Every count and size of the background-class set; the defaults are the registered dataset."""

    kind: ClassVar[str] = "voc"
    version: ClassVar[int] = 1
    default_folder: ClassVar[str] = "synthetic_voc"

    num_train: int = 300
    num_val: int = 60
    image_size: int = 64
    # Object classes, besides the background (class 0).
    num_object_classes: int = 12
    min_objects: int = 1
    max_objects: int = 3
    repeat_prob: float = 0.3
    near_prob: float = 0.4
    min_scale: float = 0.14
    max_scale: float = 0.28
    min_segment_area: int = 12
    # Void (255) band, in pixels, inside each object's outline (0: none).
    border_void: int = 1
    noise_std: float = 6.0
    seed: int = 0

    def __post_init__(self):
        _check(
            self,
            [
                (
                    1 <= self.num_object_classes <= len(THING_CLASSES),
                    f"num_object_classes in [1, {len(THING_CLASSES)}]",
                ),
                (self.num_train >= 0 and self.num_val >= 0, "num_train, num_val >= 0"),
                (self.image_size >= 32, "image_size >= 32"),
                (1 <= self.min_objects <= self.max_objects, "1 <= min_objects <= max_objects"),
                (0 < self.min_scale <= self.max_scale < 0.5, "0 < min_scale <= max_scale < 0.5"),
                (self.border_void >= 0, "border_void >= 0"),
            ],
        )

    @property
    def num_classes(self) -> int:
        return self.num_object_classes + 1

    def categories(self) -> List[Dict]:
        return voc_categories(self)

    def render(self, index: int, split: str):
        return render_voc(self, index, split)


# ------------------------------------------------------------------------------------ classes
def _thing_category(index: int) -> Dict:
    shape, colour, _ = THING_CLASSES[index]
    return {"name": shape, "isthing": 1, "color": list(colour)}


def shapes_categories(spec: ShapesSpec = ShapesSpec()) -> List[Dict]:
    """
    COCO-panoptic categories of the benchmark in contiguous order (things and stuff interleaved).

    Returns:
        list of {"id" (1-based dataset id), "name", "isthing" (0/1), "color" [r, g, b]}; the
        visualisation colour of a thing is the colour it is drawn in.
    """
    things = [_thing_category(i) for i in range(spec.num_thing_classes)]
    stuff = [
        {"name": name, "isthing": 0, "color": list(c1)}
        for name, _, c1, _ in STUFF_CLASSES[: spec.num_stuff_classes]
    ]
    cats = interleave_categories(things, stuff)
    return [{"id": i + 1, **c} for i, c in enumerate(cats)]


def voc_categories(spec: VocSpec = VocSpec()) -> List[Dict]:
    """
    Categories of the background-class set: ``background`` (id 1, contiguous 0, a stuff class),
    then the objects (things), in the format of :func:`shapes_categories`.
    """
    cats = [{"name": "background", "isthing": 0, "color": [0, 0, 0]}]
    cats += [_thing_category(i) for i in range(spec.num_object_classes)]
    return [{"id": i + 1, **c} for i, c in enumerate(cats)]


# ------------------------------------------------------------------------------------ drawing
def _thing_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of a thing class's shape of radius r in its rotated, centred coordinates."""
    rho = np.sqrt(u * u + v * v)
    if shape == "star":
        # Five points: the radius swings between 0.45 r (between points) and r (at a point).
        phi = np.arctan2(v, u)
        swing = np.abs(((phi * 5 / (2 * np.pi)) % 1.0) - 0.5) * 2  # 1 at a point, 0 between
        return rho <= r * (0.45 + 0.55 * swing)
    if shape == "hexagon":
        half = r * np.sqrt(3) / 2
        return np.all(
            [np.abs(np.cos(a) * u + np.sin(a) * v) <= half for a in np.deg2rad([0, 60, 120])],
            axis=0,
        )
    if shape == "diamond":
        return np.abs(u) / r + np.abs(v) / (0.55 * r) <= 1
    if shape == "heart":
        x, y = u / (0.8 * r), -v / (0.8 * r) + 0.15
        return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0
    if shape == "arrow":
        shaft = (u >= -r) & (u <= 0.1 * r) & (np.abs(v) <= 0.22 * r)
        head = (u >= 0.1 * r) & (u <= r) & (np.abs(v) <= (r - u) * 0.9)
        return shaft | head
    if shape == "half_disc":
        return (rho <= r) & (v >= -0.2 * r)
    if shape == "ell":
        upright = (u >= -0.8 * r) & (u <= -0.2 * r) & (np.abs(v) <= 0.85 * r)
        foot = (np.abs(u) <= 0.8 * r) & (v >= 0.25 * r) & (v <= 0.85 * r)
        return upright | foot
    if shape == "bar":
        return (np.abs(u) <= r) & (np.abs(v) <= 0.3 * r)
    return _shape_mask(shape, u, v, r)


def _draw_things(
    rng: np.random.RandomState,
    image: np.ndarray,
    seg: np.ndarray,
    seg_category: Dict[int, int],
    thing_ids: List[int],
    thing_index: Dict[int, int],
    count: int,
    spec,
) -> None:
    """Draw ``count`` things over ``image`` / ``seg`` (in place); later ones occlude earlier ones."""
    size = image.shape[0]
    ys, xs = _grid(size)
    placed: List[int] = []
    centres: List[Tuple[float, float]] = []
    next_id = max(seg_category, default=0) + 1
    for _ in range(count):
        if placed and rng.rand() < spec.repeat_prob:
            cat = placed[rng.randint(len(placed))]
        else:
            cat = int(rng.choice(thing_ids))
        shape, colour, pattern = THING_CLASSES[thing_index[cat]]
        r = rng.uniform(spec.min_scale, spec.max_scale) * size
        if centres and rng.rand() < spec.near_prob:
            py, px = centres[rng.randint(len(centres))]
            ang = rng.uniform(0, 2 * np.pi)
            dist = r * rng.uniform(0.7, 1.6)
            cy, cx = py + dist * np.sin(ang), px + dist * np.cos(ang)
        else:
            cy, cx = rng.uniform(0.12 * size, 0.88 * size, size=2)
        theta = rng.uniform(0, 2 * np.pi)
        dy, dx = ys - cy, xs - cx
        u = np.cos(theta) * dx + np.sin(theta) * dy
        v = -np.sin(theta) * dx + np.cos(theta) * dy
        sel = _thing_mask(shape, u, v, r)
        if not sel.any():
            continue
        # Per-instance brightness: the class keeps its hue.
        c1 = np.clip(np.array(colour, dtype=np.float32) * rng.uniform(0.85, 1.1), 0, 255)
        image[sel] = _thing_texture(pattern, u, v, r, rng, (c1, c1 * _PATTERN_SHADE))[sel]
        seg[sel] = next_id
        seg_category[next_id] = cat
        placed.append(cat)
        centres.append((cy, cx))
        next_id += 1


def _photometric(rng: np.random.RandomState, image: np.ndarray, noise_std: float) -> np.ndarray:
    """Per-image brightness / contrast, then pixel noise; uint8."""
    gain, bias = rng.uniform(0.85, 1.15), rng.uniform(-15, 15)
    image = image * gain + bias + rng.normal(0, noise_std, size=image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _rng(spec, index: int, split: str) -> np.random.RandomState:
    if split not in ("train", "val"):
        raise ValueError(f"unknown synthetic split {split!r}; valid: 'train', 'val'")
    return np.random.RandomState([spec.seed, {"train": 0, "val": 1}[split], index])


def render_shapes(
    spec: ShapesSpec, index: int, split: str
) -> Tuple[np.ndarray, np.ndarray, List[Dict]]:
    """
    Draw one image of the benchmark set. Deterministic in (spec, split, index).

    Returns:
        image (H, W, 3) uint8; segment id map (H, W) int32 with 0 = void; and segments
        [{"id", "category_id" (1-based dataset id), "iscrowd": 0, "area", "bbox" [x, y, w, h]}].
    """
    rng = _rng(spec, index, split)
    size = spec.image_size
    ys, xs = _grid(size)
    cats = shapes_categories(spec)
    thing_ids = [c["id"] for c in cats if c["isthing"]]
    stuff_ids = [c["id"] for c in cats if not c["isthing"]]
    # dataset id -> row of THING_CLASSES / STUFF_CLASSES (both lists keep the tables' order)
    thing_index = {cat: i for i, cat in enumerate(thing_ids)}
    stuff_index = {cat: i for i, cat in enumerate(stuff_ids)}

    image = np.zeros((size, size, 3), dtype=np.float32)
    seg = np.zeros((size, size), dtype=np.int32)
    seg_category: Dict[int, int] = {}

    num_regions = min(rng.randint(spec.min_regions, spec.max_regions + 1), len(stuff_ids))
    region_cats = rng.choice(stuff_ids, size=num_regions, replace=False)
    layout = _stuff_layout(num_regions, size, rng)
    for region, cat in enumerate(region_cats):
        sel = layout == region
        if not sel.any():
            continue
        _, texture, c1, c2 = STUFF_CLASSES[stuff_index[int(cat)]]
        shade = rng.uniform(0.9, 1.1)
        colours = (np.array(c1, np.float32) * shade, np.array(c2, np.float32) * shade)
        image[sel] = _stuff_texture(texture, ys, xs, size, rng, colours)[sel]
        seg_id = len(seg_category) + 1
        seg[sel] = seg_id
        seg_category[seg_id] = int(cat)

    count = rng.randint(spec.min_things, spec.max_things + 1)
    _draw_things(rng, image, seg, seg_category, thing_ids, thing_index, count, spec)
    image = _photometric(rng, image, spec.noise_std)
    segments = finish_segments(seg, seg_category, set(thing_ids), spec.min_segment_area)
    return image, seg, segments


# Textures a VOC-style background is made of (all labelled background).
_BACKGROUND_TEXTURES = ("blotches", "waves", "gradient", "checker", "hstripes", "vstripes")


def _border(seg: np.ndarray, ids: np.ndarray, width: int) -> np.ndarray:
    """Pixels of the segments ``ids`` at most ``width`` 4-neighbourhood steps inside their outline
    (where another segment starts; the image edge is no outline)."""
    inside = np.isin(seg, ids)
    border = np.zeros(seg.shape, dtype=bool)
    current = seg
    for _ in range(width):
        padded = np.pad(current, 1, mode="edge")
        differs = np.zeros(seg.shape, dtype=bool)
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            differs |= padded[dy : dy + seg.shape[0], dx : dx + seg.shape[1]] != current
        border |= differs & inside
        current = np.where(border, -1, seg)
    return border


def render_voc(spec: VocSpec, index: int, split: str) -> Tuple[np.ndarray, np.ndarray, List[Dict]]:
    """
    Draw one image of the background-class set: a background scene (segment 1, category
    ``background``) and objects over it, with a void band inside each object's outline.

    Returns:
        as :func:`render_shapes`.
    """
    rng = _rng(spec, index, split)
    size = spec.image_size
    ys, xs = _grid(size)
    cats = voc_categories(spec)
    background_id = cats[0]["id"]
    thing_ids = [c["id"] for c in cats[1:]]
    thing_index = {cat: i for i, cat in enumerate(thing_ids)}

    # The background is a scene, not a colour: regions of random textures in random muted
    # colours, so that "background" has to be learned as "none of the objects".
    image = np.zeros((size, size, 3), dtype=np.float32)
    num_regions = rng.randint(1, 4)
    layout = _stuff_layout(num_regions, size, rng)
    for region in range(num_regions):
        sel = layout == region
        texture = _BACKGROUND_TEXTURES[rng.randint(len(_BACKGROUND_TEXTURES))]
        base = rng.uniform(40, 200, size=3).astype(np.float32)
        base = 0.5 * base + 0.5 * base.mean()  # muted
        colours = (base, np.clip(base * rng.uniform(0.6, 1.4), 0, 255))
        image[sel] = _stuff_texture(texture, ys, xs, size, rng, colours)[sel]
    seg = np.ones((size, size), dtype=np.int32)
    seg_category: Dict[int, int] = {1: background_id}

    count = rng.randint(spec.min_objects, spec.max_objects + 1)
    _draw_things(rng, image, seg, seg_category, thing_ids, thing_index, count, spec)
    image = _photometric(rng, image, spec.noise_std)
    if spec.border_void > 0:
        objects = np.array([s for s, c in seg_category.items() if c != background_id])
        seg[_border(seg, objects, spec.border_void)] = 0
    segments = finish_segments(seg, seg_category, set(thing_ids), spec.min_segment_area)
    return image, seg, segments
