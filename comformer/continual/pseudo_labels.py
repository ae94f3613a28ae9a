"""Pseudo-labels of the old classes from the teacher, added to the step's ground truth.

At step t the ground truth only shows the new classes; the old classes in the images are
unlabelled, and without pseudo-labels the student learns to call them no-object. The teacher's
confident segments of old classes, outside the ground-truth pixels, become extra targets that
join the ground truth before matching.

Shapes: B images, Q queries, K_old teacher classes (+1 no-object), (h, w) the mask-prediction
size, (H, W) the padded image size of the targets, n pseudo segments.
"""

import math
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.nn import functional as F

from ..modeling.inference import MASK_ACTIVATIONS, mask_probabilities
from ..utils.timing import timed_function

__all__ = [
    "covered_by_targets",
    "per_class_median",
    "mask_pseudo_labels",
    "entropy_pseudo_labels",
    "add_pseudo_labels",
    "with_teacher_pseudo_labels",
]

PseudoLabels = List[Tuple[Tensor, Tensor]]


@timed_function("pseudo-labels")
def covered_by_targets(targets: List[Dict[str, Tensor]], size: Tuple[int, int]) -> Tensor:
    """
    Pixels of each image covered by some ground-truth segment.

    Args:
        targets: B dicts with "masks" (N_b, H, W).
        size: (H, W), the padded image size the targets must have.

    Returns:
        (B, H, W) bool.
    """
    covered = []
    for i, t in enumerate(targets):
        masks = t["masks"]
        if tuple(masks.shape[-2:]) != tuple(size):
            raise ValueError(
                f"pseudo-labels: targets[{i}]['masks'] is {tuple(masks.shape[-2:])}, expected the "
                f"padded image size {tuple(size)}"
            )
        covered.append(masks.bool().any(0))
    return torch.stack(covered)


def _split_per_image(
    batch_idx: Tensor, labels: Tensor, masks: Tensor, num_images: int
) -> PseudoLabels:
    """Group the n selected segments (sorted by image) into one (labels, masks) pair per image."""
    counts = torch.bincount(batch_idx, minlength=num_images).tolist()  # one host sync
    return list(zip(labels.split(counts), masks.split(counts)))


@torch.no_grad()
@timed_function("pseudo-labels")
def mask_pseudo_labels(
    pred_logits: Tensor,
    pred_masks: Tensor,
    covered: Tensor,
    *,
    mask_activation: str,
    score_threshold: float = 0.0,
    mask_threshold: float = 0.5,
) -> PseudoLabels:
    """
    CoMFormer's mask-based pseudo-labels, bit for bit those of the official code
    (``make_pseudolabels2``, continual/method_wrapper/maskformer.py in fcdl94/CoMFormer).

    Per query: score = its highest class probability, label = that class; queries whose label is
    no-object or whose score is not above ``score_threshold`` (strictly, as the official code)
    are dropped. The mask logits are upsampled to the image size (bilinear) and normalised (a
    softmax across ALL queries for softmax masks, before any is dropped). Each pixel not covered
    by the ground truth goes to the kept query maximising score x mask probability (the first one
    on ties). A query becomes a pseudo segment when the pixels it wins that also lie in its
    binarised mask (probability >= ``mask_threshold``) are not empty, and it wins more than half
    of its binarised area; the segment is those pixels, with the query's label.

    How (no (B, Q, H, W) stack is made): images without a kept query cost nothing; the others
    are processed one by one. On CPU, at the usual sizes (masks at 1/4 of the padded image),
    bounds on each low-resolution cell decide most pixels (:func:`_cell_decisions`); the
    others get the exact probabilities, upsampled band by band (:func:`_upsampled_bands`):
    the kept queries' masks only (all of them for softmax masks, whose normaliser needs every
    query). Otherwise each image is upsampled whole, as by the official code.

    Equal to the official code with one torch thread (as the tests and the bench run). With
    several, ATen computes the values at the ends of its threads' chunks with scalar code that
    can round differently, so any of the implementations can change a value with the thread
    count. On CUDA, where ATen's kernels differ, equality has not been tested.

    Args:
        pred_logits: (B, Q, K_old+1) teacher class logits.
        pred_masks: (B, Q, h, w) teacher mask logits.
        covered: (B, H, W) bool, pixels of ground-truth segments (see :func:`covered_by_targets`).
        mask_activation: the teacher's, "sigmoid" or "softmax".
        score_threshold: a query's class score must be above it.
        mask_threshold: probability that binarises a mask.

    Returns:
        B pairs (labels (n_b,) int64 teacher class indices, masks (n_b, H, W) bool).
    """
    if mask_activation not in MASK_ACTIVATIONS:
        raise ValueError(f"mask activation {mask_activation!r} is not one of {MASK_ACTIVATIONS}")
    size = tuple(covered.shape[-2:])
    masks = pred_masks.float()
    scores, labels = pred_logits.float().softmax(-1).max(-1)  # (B, Q)
    no_object = pred_logits.shape[-1] - 1
    keep = (labels != no_object) & (scores > score_threshold)
    geometry = _band_geometry(masks, size)
    out = []
    for b, row in enumerate(keep.tolist()):  # one host sync
        kept = [q for q, k in enumerate(row) if k]
        if not kept:
            out.append((labels.new_zeros(0), covered.new_zeros((0,) + size)))
            continue
        kept = torch.tensor(kept, device=masks.device)
        winners, selected = _image_segments(
            masks, b, kept, scores[b, kept], covered[b], geometry, mask_activation, mask_threshold
        )
        out.append((labels[b, kept[selected]], winners[None] == selected[:, None, None]))
    return out


def _image_segments(
    masks: Tensor,
    b: int,
    kept: Tensor,
    scores: Tensor,
    covered: Tensor,
    geometry: Optional["_Geometry"],
    mask_activation: str,
    mask_threshold: float,
) -> Tuple[Tensor, Tensor]:
    """
    The pseudo segments of image ``b`` (one with kept queries).

    Args:
        masks: (B, Q, h, w) float mask logits of the batch.
        kept: (n,) indices of the kept queries, increasing.
        scores: (n,) their class scores.
        covered: (H, W) bool.
        geometry: see :func:`_band_geometry`; None: the image is upsampled whole.

    Returns:
        winners (H, W) int64: at each uncovered pixel inside the binarised mask of the kept
            query that wins it, that query's position in ``kept``; -1 elsewhere;
        selected (n_b,) int64: positions in ``kept`` of the queries that become segments.
    """
    n = kept.numel()
    size = tuple(covered.shape)
    num_pixels = size[0] * size[1]
    softmax = mask_activation == "softmax"
    if softmax:
        channels = None  # the normaliser needs every query
    elif geometry is None and not _bilinear_kernel_is_generic(masks, size):
        channels = None  # ATen's other kernel: upsampled as the official code does
    elif geometry is None and n == 3 and torch.get_num_threads() == 1:
        channels = torch.cat([kept, kept[:1]])  # 3 channels would switch ATen's kernel
    else:
        channels = kept
    magnitude = _magnitude(masks[b] if softmax else masks[b, kept])
    finite = math.isfinite(magnitude)

    decided = None
    if geometry is not None and geometry.cells is not None and finite:
        decided = _cell_decisions(
            masks[b], kept, scores, covered, geometry, softmax, mask_threshold, magnitude
        )
    if decided is not None:
        exact, win, win_bin, bin_area = decided
    else:
        exact = None
        win = torch.empty(num_pixels, dtype=torch.int64, device=masks.device)
        win_bin = torch.empty(num_pixels, dtype=torch.bool, device=masks.device)
        bin_area = kept.new_zeros(n)
    weights = scores[:, None]
    for logits, pixels, count in _upsampled_bands(masks, b, channels, size, geometry, exact):
        probs = logits.softmax(0) if softmax else logits.sigmoid_()
        probs = probs[:n] if channels is not None else probs.index_select(0, kept)
        pixel_win = _first_argmax(probs * weights, finite)[:count]
        probs = probs[:, :count]
        # uint8 summed as int32: 4x faster than summing bools (which go through int64)
        bin_area += (probs >= mask_threshold).view(torch.uint8).sum(1, dtype=torch.int32)
        win[pixels] = pixel_win
        win_bin[pixels] = probs.gather(0, pixel_win[None])[0] >= mask_threshold
        del probs

    uncovered = ~covered.reshape(-1)
    won_area = torch.bincount(win.masked_select(uncovered), minlength=n)
    segment = win_bin & uncovered
    won_in_bin = torch.bincount(win.masked_select(segment), minlength=n)
    selected = ((won_in_bin > 0) & (2 * won_area > bin_area)).nonzero()[:, 0]
    # A query's segment: the pixels it wins inside its own binarised mask.
    return torch.where(segment, win, -1).view(size), selected


# ------------------------------------------------------------------ decisions by cells
class _Geometry(NamedTuple):
    """Where the bilinear upsampling of an image's masks takes each pixel from."""

    factor: int  # image height / mask height: a power of two >= 2
    cells: Optional[Tensor]  # (H * W) int64 cell i * w + j of each pixel; None: unknown
    cell_pixels: Optional[Tensor]  # (h * w) int64 pixels per cell


def _band_geometry(masks: Tensor, size: Tuple[int, int]) -> Optional[_Geometry]:
    """
    None when the images are upsampled whole; else the height ratio for the bands
    (:func:`_separable_factor`) and, when the width ratio is a power of two too, the cell of
    each pixel: cell (i, j) holds the pixels interpolated from mask rows i, i + 1 and columns
    j, j + 1 (clamped to the last), so that ATen takes mask row and column c from output
    index c * f + f // 2 on (from 0 for c = 0).
    """
    factor = _separable_factor(masks, size)
    if factor is None:
        return None
    (h, w), (height, width) = masks.shape[-2:], size
    width_factor = width // w
    if width != width_factor * w or width_factor < 2 or width_factor & (width_factor - 1):
        return _Geometry(factor, None, None)

    def cell_index(length: int, ratio: int, last: int) -> Tensor:
        out = torch.arange(length, device=masks.device)
        return ((out - ratio // 2).clamp(min=0) // ratio).clamp(max=last)

    cells = cell_index(height, factor, h - 1)[:, None] * w + cell_index(width, width_factor, w - 1)
    cells = cells.reshape(-1)
    return _Geometry(factor, cells, torch.bincount(cells, minlength=h * w))


# Below this share of pixels decided by the cells, an image is computed whole, band by band.
_MIN_DECIDED = 0.25

# Decisions closer to a threshold or a tie than this (in log space) are computed exactly: far
# above the relative rounding of the official code's probabilities (a softmax sums Q
# exponentials; exp is accurate to some ulps) and of the bounds computed here.
_MARGIN = 2.0**-10


def _cell_decisions(
    logits: Tensor,
    kept: Tensor,
    scores: Tensor,
    covered: Tensor,
    geometry: _Geometry,
    softmax: bool,
    mask_threshold: float,
    magnitude: float,
) -> Optional[Tuple[Tensor, Tensor, Tensor, Tensor]]:
    """
    The pixels whose outcome bounds decide, without their probabilities.

    An upsampled logit is a convex combination of the 4 mask logits of its cell (up to a few
    ulps of rounding), so a cell's minimum and maximum bound every query's logit on its pixels.
    From them, for each cell: whether each kept query's probability is surely above or below the
    threshold (p >= t is logit - logsumexp(other queries' logits) >= logit(t) for softmax masks,
    logit >= logit(t) for sigmoid ones), and whether one kept query surely wins (score x
    probability ordered as log score + logit for softmax masks, their normaliser being common).
    A cell is decided when every kept query's binarisation is, and its winner with its
    binarisation (or all its pixels are ground truth): its pixels take those outcomes.

    Args:
        logits: (Q, h, w) mask logits of the image.
        kept, scores: (n,) kept queries and their class scores.
        covered: (H, W) bool.
        magnitude: the largest absolute logit (of the kept queries for sigmoid masks).

    Returns:
        None (bounds unusable: threshold not in (0, 1), huge logits; or too few pixels decided),
        or
        exact (H * W) bool: the pixels left to compute exactly;
        win (H * W) int64, win_bin (H * W) bool: the winner (position in ``kept``) and whether
            the pixel is in its binarised mask, on decided pixels;
        bin_area (n,) int64: binarised area of each kept query on decided pixels.
    """
    num_queries, h, w = logits.shape
    n = kept.numel()
    if not 0 < mask_threshold < 1 or magnitude > 300:
        return None
    # Up to 40, logit differences stay above float32's smallest normal exp(-87).
    dtype = torch.float32 if magnitude <= 40 else torch.float64
    theta = math.log(mask_threshold) - math.log1p(-mask_threshold)
    margin = _MARGIN + num_queries * 2.0**-20 + magnitude * 2.0**-16
    bin_margin = margin * (1 + 1 / (1 - mask_threshold))
    slack = magnitude * 2.0**-20  # the interpolation's rounding

    logits = logits.to(dtype)
    # The rounding slack of both bounds is folded into the constants compared with.
    if softmax:
        low, high = _cell_bounds(logits)  # (Q, h * w)
        low_k, high_k = low.index_select(0, kept), high.index_select(0, kept)  # (n, h * w)
        # p >= t surely when low - logsumexp(others' high) >= logit(t) + margin, surely not
        # when high - logsumexp(others' low) <= logit(t) - margin.
        true_above = _others_logsumexp(high, kept, True, theta + bin_margin + 2 * slack)
        false_below = _others_logsumexp(low, kept, False, theta - bin_margin - 2 * slack)
        bin_true = low_k >= true_above
        bin_known = bin_true | (high_k <= false_below)
        # Score x probability ordered by log score + logit: the normaliser is common.
        log_score = scores.to(dtype).log()[:, None]
        value_low, value_high = low_k + log_score, high_k + log_score
        best = _first_argmax(value_low, finite=True)  # (h * w)
        best_low = value_low.gather(0, best[None])[0]
        rivals = value_high > (best_low - margin - 2 * slack)
        # log p >= -softplus(logsumexp(others' high) - low), the best's far above log(1e-35)
        # (products that underflowed would tie at 0).
        gap = (
            true_above.gather(0, best[None])[0]
            - theta
            - bin_margin
            - low_k.gather(0, best[None])[0]
        )
        floor_ok = log_score[:, 0].index_select(0, best) - F.softplus(gap) > -80
    else:
        low_k, high_k = _cell_bounds(logits.index_select(0, kept))
        bin_true = low_k >= theta + bin_margin + slack
        bin_known = bin_true | (high_k <= theta - bin_margin - slack)
        # Score x probability itself (its rounding is relative).
        scores = scores.to(dtype)[:, None]
        value_low, value_high = low_k.sigmoid_().mul_(scores), high_k.sigmoid_().mul_(scores)
        best = _first_argmax(value_low, finite=True)
        best_low = value_low.gather(0, best[None])[0]
        rivals = value_high > best_low * math.exp(-margin - 2 * slack)
        floor_ok = best_low > math.exp(slack - 80)
    # The best query surely wins when no other can come within the margin ...
    win_known = rivals.view(torch.uint8).sum(0, dtype=torch.int32) == 1
    if n > 1:
        win_known &= floor_ok  # ... and its product cannot tie with others at 0
    win_bin = bin_true.gather(0, best[None])[0]
    win_known &= bin_known.gather(0, best[None])[0]

    cells, cell_pixels = geometry.cells, geometry.cell_pixels
    uncovered = torch.bincount(cells.masked_select(~covered.reshape(-1)), minlength=h * w)
    decided = bin_known.all(0) & ((uncovered == 0) | win_known)
    if float((decided * cell_pixels).sum()) < _MIN_DECIDED * cells.numel():
        return None  # whole bands cost less than gathering most of their pixels
    # Exact sums of integers (float64 below 2^53).
    decided_pixels = (decided * cell_pixels).to(torch.float64)
    bin_area = torch.mv(bin_true.to(torch.float64), decided_pixels).long()
    # index_select: 7x faster than indexing with a tensor
    return (
        ~decided.index_select(0, cells),
        best.index_select(0, cells),
        win_bin.index_select(0, cells),
        bin_area,
    )


def _cell_bounds(logits: Tensor) -> Tuple[Tensor, Tensor]:
    """
    Minimum and maximum of ``logits`` (C, h, w) over each cell, rows i, i + 1 and columns
    j, j + 1 (the last row and column are their own next one).

    Returns:
        low, high: (C, h * w).
    """
    num, h, w = logits.shape
    bounds = []
    for reduce in (torch.minimum, torch.maximum):
        rows = logits.new_empty(num, h, w)
        reduce(logits[:, :-1], logits[:, 1:], out=rows[:, :-1])
        rows[:, -1] = logits[:, -1]
        cells = logits.new_empty(num, h, w)
        reduce(rows[:, :, :-1], rows[:, :, 1:], out=cells[:, :, :-1])
        cells[:, :, -1] = rows[:, :, -1]
        bounds.append(cells.view(num, h * w))
    return bounds[0], bounds[1]


def _others_logsumexp(values: Tensor, kept: Tensor, upper: bool, shift: float) -> Tensor:
    """
    ``shift`` plus a bound (upper or lower) on logsumexp over q != k of ``values`` (Q, L), for
    each k in ``kept``: the total minus the k-th exponential, widened by the float error of
    the total (relative (Q + 2) ulps, which bounds the subtraction's cancellation).

    Returns:
        (n, L).
    """
    top = values.amax(0)
    exps = torch.sub(values, top).exp_()
    total = exps.sum(0)
    others = total - exps.index_select(0, kept)
    error = 2 * (values.shape[0] + 2) * torch.finfo(values.dtype).eps * total
    others = others.add_(error) if upper else others.sub_(error).clamp_(min=0)
    return others.log_().add_(top + shift)


# ------------------------------------------------------------------ exact upsampling, by bands
# Mask logits of a band computed at once: about this many (query, pixel) values (4 MB in float32),
# which stay in cache through the softmax and the selection; whole (Q, H, W) stacks made the
# upsampling and the softmax 3-5x slower per value.
_BAND_VALUES = 1 << 20


def _bilinear_kernel_is_generic(masks: Tensor, size: Tuple[int, int]) -> bool:
    """
    Whether ATen's CPU bilinear upsampling of ``masks`` (N, C, h, w) to ``size`` runs its generic
    kernel (every output value from its own two rows and columns) rather than its channels-last
    one, which rounds differently. The rule of ``upsample_bilinear2d_kernel_impl_float``
    (aten/src/ATen/native/cpu/UpSampleKernel.cpp).
    """
    channels = masks.shape[1]
    if masks.is_contiguous(memory_format=torch.channels_last) and channels > 3:
        return False
    if size[0] + size[1] <= 128:
        return False
    return not (torch.get_num_threads() == 1 and channels == 3)


def _separable_factor(masks: Tensor, size: Tuple[int, int]) -> Optional[int]:
    """
    The height ratio f (image / masks) when the upsampled masks can be computed by bands of rows
    with :func:`_separable_rows`, else None (each image is upsampled whole, as by the official
    code): on CPU, with ATen's generic kernel, f a power of two >= 2 (its row weights are then
    exact dyadic numbers, also in the kernel's float arithmetic) and the construction checked
    exact on this machine (:func:`_separable_upsampling_is_exact`). Any width ratio works.
    """
    h, height = masks.shape[-2], size[0]
    factor = height // h
    if (
        masks.device.type != "cpu"
        or height != factor * h
        or factor < 2
        or factor & (factor - 1)
        or not _bilinear_kernel_is_generic(masks, size)
        or not _separable_upsampling_is_exact()
    ):
        return None
    return factor


def _separable_rows(image: Tensor, lo: int, hi: int, width: int, factor: int, out: Tensor) -> None:
    """
    The rows of the bilinear upsampling (``align_corners=False``) of ``image`` (C, h, w) by
    ``factor`` f (a power of two >= 2) whose top source row is in [lo, hi), into ``out``
    (C, rows, W): image rows from ``lo * f + f // 2`` (from 0 when lo = 0) to
    ``hi * f + f // 2`` (to h * f when hi = h).

    ATen's generic kernel computes an output value as fma(t0, w_top, t1 * w_bottom), where t0 and
    t1 are its two source rows interpolated across (fma(a, w_left, b * w_right)). Here the across
    part is ATen's own linear kernel (the same code, on 1/f of the values) and the vertical part
    ``addcmul``, a fused multiply-add on CPU: the same roundings, twice as fast as the 2-D kernel,
    and bands need no overlap. Output row i * f + f // 2 + p (0 <= p < f) lies (p + 0.5) / f
    below source row i; rows above the first source row's centre take it alone (weights 1, 0),
    rows below the last one's take it twice (its row below is clamped to itself).
    """
    num_channels, h, w = image.shape
    rows_in = min(hi + 1, h) - lo
    across = F.interpolate(
        image[:, lo : lo + rows_in].reshape(1, num_channels * rows_in, w),
        size=width,
        mode="linear",
        align_corners=False,
    ).view(num_channels, rows_in, width)
    half = factor // 2
    w_bottom = ((torch.arange(factor, dtype=torch.float64) + 0.5) / factor).float()  # exact
    w_bottom = w_bottom.to(image.device)[:, None]
    w_top = 1 - w_bottom
    row = 0
    if lo == 0:
        top = out[:, :half]
        below = across[:, min(1, rows_in - 1), None].expand(-1, half, -1)
        torch.mul(below, w_bottom.new_zeros(()), out=top)
        top.addcmul_(across[:, :1], w_bottom.new_ones(()))
        row = half
    inner = min(hi, h - 1) - lo  # source rows with a row below them: all f phases
    if inner > 0:
        block = out[:, row : row + inner * factor].view(num_channels, inner, factor, width)
        torch.mul(across[:, 1 : inner + 1, None], w_bottom, out=block)
        block.addcmul_(across[:, :inner, None], w_top)
        row += inner * factor
    if hi == h:
        last = across[:, h - 1 - lo, None]
        bottom = out[:, row:]
        torch.mul(last, w_bottom[:half], out=bottom)
        bottom.addcmul_(last, w_top[:half])


def _plane_length(pixels: int) -> int:
    """
    Values per query in a band's buffer. ATen's softmax across queries and its sigmoid compute
    the last values of a call that do not fill a SIMD vector with scalar code, which can round
    differently: with a multiple of 16 (AVX-512) every pixel takes the vector path, as in a whole
    (Q, H, W) stack at the sizes Mask2Former pads images to (multiples of 32). The 16 values past
    a multiple of 64 start the queries' planes at different offsets modulo 4 KiB: planes at one
    offset share cache sets, which made the softmax across queries 1.5x slower.
    """
    return pixels + (-pixels) % 64 + 16


def _upsampled_bands(
    masks: Tensor,
    b: int,
    channels: Optional[Tensor],
    size: Tuple[int, int],
    geometry: Optional[_Geometry],
    exact: Optional[Tensor],
) -> Iterator[Tuple[Tensor, Union[slice, Tensor], int]]:
    """
    Upsampled mask logits of image ``b``, bit for bit those of one bilinear interpolation of the
    whole batch, band by band.

    Args:
        masks: (B, Q, h, w) float mask logits.
        channels: the queries to upsample, None for all.
        size: (H, W).
        geometry: see :func:`_band_geometry`; None: the whole image in one band.
        exact: (H * W) bool, the pixels wanted; None: all.

    Yields:
        logits (C, L): the wanted pixels of a band, first in each query's plane (the rest of a
            plane is scratch), in a buffer that the next band may overwrite;
        pixels: where they are in the image (row-major), a slice or an index;
        count: how many.
    """
    height, width = size
    if geometry is None:
        image = masks[b : b + 1] if channels is None else masks[b : b + 1].index_select(1, channels)
        logits = F.interpolate(image, size=size, mode="bilinear", align_corners=False)[0]
        # (C, H * W) contiguous, as the official code's per-image stack.
        num_pixels = height * width
        yield logits.reshape(logits.shape[0], num_pixels), slice(0, num_pixels), num_pixels
        return
    factor = geometry.factor
    image = masks[b] if channels is None else masks[b].index_select(0, channels)
    num_channels, h = image.shape[:2]
    cells = max(1, _BAND_VALUES // max(1, num_channels * factor * width))
    buffers: Dict[int, Tensor] = {}
    for lo in range(0, h, cells):
        hi = min(lo + cells, h)
        # Mask row c >= 1 is the top row of output rows from c * f + f // 2 on.
        out_lo = lo * factor + factor // 2 if lo > 0 else 0
        out_hi = hi * factor + factor // 2 if hi < h else height
        band = slice(out_lo * width, out_hi * width)
        if exact is not None:
            wanted = exact[band].nonzero()[:, 0]
            if wanted.numel() == 0:
                continue
        rows = out_hi - out_lo
        if rows not in buffers:
            buffers[rows] = image.new_empty(num_channels, _plane_length(rows * width))
        buffer = buffers[rows]
        _separable_rows(
            image, lo, hi, width, factor, buffer[:, : rows * width].view(-1, rows, width)
        )
        if exact is None:
            yield buffer, band, rows * width
        else:
            count = wanted.numel()
            columns = F.pad(wanted, (0, _plane_length(count) - count))
            yield buffer.index_select(1, columns), wanted + band.start, count


_SEPARABLE_EXACT: Optional[bool] = None


def _separable_upsampling_is_exact() -> bool:
    """
    Whether :func:`_separable_rows` reproduces ATen's bilinear kernel on this machine: both rely
    on how the kernels were compiled (fused multiply-adds). Checked once, on random logits of
    mixed magnitudes whose rows and columns end off the SIMD width; a single different rounding
    would show on a few percent of such values.
    """
    global _SEPARABLE_EXACT
    if _SEPARABLE_EXACT is None:
        g = torch.Generator().manual_seed(0)
        magnitude = 10.0 ** torch.randint(-3, 4, (1, 5, 24, 1), generator=g)
        logits = torch.randn(1, 5, 24, 21, generator=g) * magnitude
        size, factor = (96, 84), 4  # Hout + Wout > 128: ATen's generic kernel
        expected = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0]
        got = torch.empty_like(expected)
        for lo, hi in ((0, 5), (5, 13), (13, 23), (23, 24)):
            out_lo = lo * factor + factor // 2 if lo > 0 else 0
            out_hi = hi * factor + factor // 2 if hi < 24 else size[0]
            _separable_rows(logits[0], lo, hi, size[1], factor, got[:, out_lo:out_hi])
        _SEPARABLE_EXACT = torch.equal(got, expected)
    return _SEPARABLE_EXACT


def _magnitude(values: Tensor) -> float:
    """The largest absolute value, NaN if there is a NaN (one pass, unlike isfinite + amax)."""
    if values.numel() == 0:
        return 0.0
    low, high = torch.aminmax(values)
    return float(torch.maximum(-low, high))  # NaN propagates


def _first_argmax(values: Tensor, finite: bool) -> Tensor:
    """
    ``values.argmax(0)`` of (n, L) values: the first maximal row of each column. For finite
    values, from the maximum and a comparison: 4x faster on CPU than ``max(0).indices`` (itself
    2-3x faster than ``argmax(0)`` along a strided dimension), which handles NaNs as argmax.
    """
    if not finite:
        return values.max(0).indices
    n = values.shape[0]
    is_max = values == values.amax(0)
    # Ranks n (first row) down to 1 (last row): the largest rank of a maximal row is the first.
    dtype = torch.uint8 if n < 2**8 else torch.int16 if n < 2**15 else torch.int64
    rank = torch.arange(n, 0, -1, dtype=dtype, device=values.device)[:, None]
    return n - (is_max.to(dtype) * rank).amax(0).long()


def per_class_median(values: Tensor, classes: Tensor, num_classes: int) -> Tensor:
    """
    Lower median of ``values`` (in [0, 1]) within each class, vectorised by one sort.

    Args:
        values: (n,) values in [0, 1].
        classes: (n,) int64 class of each value, in [0, num_classes).

    Returns:
        (num_classes,) medians; +inf for classes without values.
    """
    medians = values.new_full((num_classes,), float("inf"))
    if values.numel() == 0:
        return medians
    # Sorting class + value/2 orders by class, then by value within the class.
    order = torch.argsort(classes.double() + values.double().clamp(0, 1) / 2)
    sorted_values = values[order]
    counts = torch.bincount(classes, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    present = counts > 0
    medians[present] = sorted_values[(starts + (counts - 1) // 2)[present]]
    return medians


@torch.no_grad()
@timed_function("pseudo-labels")
def entropy_pseudo_labels(
    pred_logits: Tensor,
    pred_masks: Tensor,
    covered: Tensor,
    *,
    mask_activation: str,
    base_threshold: float = 0.001,
) -> PseudoLabels:
    """
    PLOP's entropy-based pseudo-labels, on the teacher's per-pixel class distribution.

    The teacher's per-pixel distribution over [old classes, no-object] is
    ``p(c | x) = sum_q p_q(c) m_q(x)`` (normalised over classes; exact for softmax masks). A pixel
    outside the ground truth whose most likely class c is an old class is pseudo-labelled c when
    its normalised entropy ``H(p) / log(K_old + 1)`` is below the threshold of c: the median
    normalised entropy of the batch's candidate pixels of class c, but at least
    ``base_threshold`` (PLOP computes the medians once over the step's dataset; here they come
    from the batch, which needs no pass over the data before training). Uncertain pixels stay
    unlabelled. Each image gets one pseudo segment per old class with confident pixels.

    Args:
        pred_logits: (B, Q, K_old+1) teacher class logits.
        pred_masks: (B, Q, h, w) teacher mask logits.
        covered: (B, H, W) bool, pixels of ground-truth segments.
        mask_activation: the teacher's, "sigmoid" or "softmax".
        base_threshold: the lowest per-class entropy threshold.

    Returns:
        B pairs (labels (n_b,) int64, masks (n_b, H, W) bool).
    """
    num_images = pred_logits.shape[0]
    num_labels = pred_logits.shape[-1]  # K_old + 1, no-object last
    size = covered.shape[-2:]
    masks = F.interpolate(pred_masks.float(), size=size, mode="bilinear", align_corners=False)
    probs = mask_probabilities(masks, mask_activation, query_dim=1)
    del masks
    cls_probs = pred_logits.float().softmax(-1)
    pixel_probs = torch.einsum("bqc,bqhw->bchw", cls_probs, probs)
    del probs
    pixel_probs = pixel_probs / pixel_probs.sum(1, keepdim=True).clamp(min=1e-12)
    entropy = -(pixel_probs * pixel_probs.clamp(min=1e-12).log()).sum(1)
    entropy = entropy / math.log(num_labels)  # (B, H, W) in [0, 1]
    pixel_label = pixel_probs.max(1).indices  # (B, H, W), = argmax(1), faster (see above)
    del pixel_probs

    candidate = ~covered & (pixel_label != num_labels - 1)
    thresholds = per_class_median(entropy[candidate], pixel_label[candidate], num_labels)
    thresholds = thresholds.clamp(min=base_threshold)
    confident = candidate & (entropy < thresholds[pixel_label])

    # One segment per (image, class) with confident pixels.
    label_map = torch.where(confident, pixel_label, torch.full_like(pixel_label, num_labels - 1))
    flat = label_map + torch.arange(num_images, device=label_map.device)[:, None, None] * num_labels
    present = torch.bincount(flat[confident], minlength=num_images * num_labels)
    present = present.view(num_images, num_labels) > 0
    batch_idx, class_idx = present.nonzero(as_tuple=True)
    seg_masks = (label_map[batch_idx] == class_idx[:, None, None]) & confident[batch_idx]
    return _split_per_image(batch_idx, class_idx, seg_masks, num_images)


@timed_function("pseudo-labels")
def add_pseudo_labels(
    targets: List[Dict[str, Tensor]], pseudo: PseudoLabels
) -> List[Dict[str, Tensor]]:
    """
    Ground truth plus pseudo segments, as new target dicts (the inputs are not modified).

    Args:
        targets: B dicts {"labels" (N_b,), "masks" (N_b, H, W)}.
        pseudo: B pairs (labels (n_b,), masks (n_b, H, W)).

    Returns:
        B dicts {"labels" (N_b + n_b,), "masks" (N_b + n_b, H, W)} with the targets' dtypes.
    """
    if len(targets) != len(pseudo):
        raise ValueError(f"{len(pseudo)} pseudo-label sets for {len(targets)} images")
    out = []
    for t, (labels, masks) in zip(targets, pseudo):
        merged = dict(t)
        merged["labels"] = torch.cat([t["labels"], labels.to(t["labels"])])
        merged["masks"] = torch.cat([t["masks"], masks.to(t["masks"])])
        out.append(merged)
    return out


def with_teacher_pseudo_labels(
    targets: List[Dict[str, Tensor]],
    t_outputs: Dict,
    image_size: Tuple[int, int],
    *,
    kind: str,
    mask_activation: str,
    threshold: float,
) -> List[Dict[str, Tensor]]:
    """
    Ground truth plus the teacher's pseudo segments on the pixels no target covers.

    Args:
        targets: B dicts {"labels", "masks"} of the step's ground truth.
        t_outputs: the teacher's predictions ("pred_logits", "pred_masks").
        image_size: (H, W) of the padded batch.
        kind: "mask" (:func:`mask_pseudo_labels`, ``threshold`` is the score threshold) or
            "entropy" (:func:`entropy_pseudo_labels`, ``threshold`` is the base threshold).
        mask_activation: the teacher's mask activation.
        threshold: see ``kind``.

    Returns:
        the targets with the pseudo segments appended (:func:`add_pseudo_labels`).
    """
    covered = covered_by_targets(targets, image_size)
    args = (t_outputs["pred_logits"], t_outputs["pred_masks"], covered)
    if kind == "mask":
        pseudo = mask_pseudo_labels(
            *args, mask_activation=mask_activation, score_threshold=threshold
        )
    elif kind == "entropy":
        pseudo = entropy_pseudo_labels(
            *args, mask_activation=mask_activation, base_threshold=threshold
        )
    else:
        raise ValueError(f"pseudo-label kind {kind!r}; valid: mask, entropy")
    return add_pseudo_labels(targets, pseudo)
