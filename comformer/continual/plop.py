"""PLOP (Douillard et al., CVPR 2021): PLOP as published on the per-pixel head, and CoMFormer's port
on mask classification.

Two variants (``CONT.PLOP.VARIANT``; "" picks "plop" for a per-pixel student, "comformer" for
mask classification), each component overridable by its own key (an empty / negative / None value
takes the variant's):

=====================  =====================================  =====================================
component              "plop": PLOP's code                    "comformer": CoMFormer's port
                       (arthurdouillard/CVPR2021_PLOP)        (fcdl94/CoMFormer, its README)
=====================  =====================================  =====================================
POD maps               backbone res2-res5 and the pixel decoder's mask features (``POD_FEATURES``),
                       plus, per-pixel only, the logits (``POD_LOGITS_WEIGHT``)
``POD_SQUARE``         features squared before pooling        not squared
                       (``prepro="pow"``)
``POD_WEIGHT``         0.01 (argparser, method PLOP; VOC);    0.001 (README: ``POD_WEIGHT 0.001``)
                       0.001 on ADE20K (scripts/ade)
``POD_LOGITS_WEIGHT``  0.0005 (argparser ``pod_options``);    0 (no logits POD)
                       0.00001 on ADE20K (scripts/ade)
``POD_FACTOR``         x sqrt(classes seen / new classes)     x sqrt(new classes / classes seen)
                       (train.py, ``use_pod_schedule``)
``PSEUDO_LABELS``      "entropy"                              "mask" (mask classification),
                                                              "entropy" (per-pixel)
``ENTROPY_MEDIAN``     "plop": thresholds from a pass over    "batch": per-batch medians
                       the step's training set before it
``ADAPTIVE_FACTOR``    on (per-pixel)                         off
``INIT``               MiB's init (``init_balanced``)         none
=====================  =====================================  =====================================

Local POD (:func:`local_pod_embedding`, :func:`pod_loss`, train.py ``features_distillation`` and
``_local_pod``): each map (squared or not) is cut into s x s windows at s = 1, 2, 4; each window is
averaged along its width (one value per channel and row) and along its height (one per channel and
column); the concatenated embeddings of student and teacher are compared by the L2 norm per image
(no normalisation of the embeddings, ``normalize=False``), averaged over images, multiplied by the
map's weight and the factor, summed over maps and divided by their number. The logits map: the
student's low-resolution logits regrouped to the teacher's channels, its background logit plus the
sum of the new classes' logits (PLOP's ``extra_channels: "sum"``). "Classes seen" counts the
per-pixel classifier's channels (PLOP's ``nb_current_classes`` includes the background), the
classes on mask classification.

Entropy pseudo-labels on the per-pixel head (train.py ``entropy`` and ``find_median``): the
teacher's softmax at full resolution gives each pixel a class (argmax) and an uncertainty
``u = -(1/C_t) sum_c p_c log(p_c + 1e-8) / log(C_t + 1e-8) / log(C_s)`` (PLOP's entropy is a mean
over the C_t teacher channels, normalised by log C_t, then divided by log of the student's
channels, ``max_entropy``). Before the step, one pass over the step's training images collects,
per predicted class, the uncertainties of the pixels labelled background in a 100-bin histogram of
[0, 1]; the class threshold is the histogram's "median" by PLOP's loop ("plop": its running sum
adds each bin's index rather than its count, so it stops at the first bin holding about half the
pixels; kept bit for bit), or the median interpolated in a 10,000-bin histogram ("fine": what the
code's comment says it approximates), floored at ``ENTROPY_THRESHOLD`` (0.001, a lower bound:
``max(median, 0.001)``). In training, a pixel labelled background (or an old class) takes the
teacher's class where ``u < threshold[class]`` (possibly the background itself) and is ignored
(255) elsewhere; and with ``ADAPTIVE_FACTOR`` each image's cross-entropy (new-class pixels
included) is multiplied by (its confident background pixels) / (its background pixels + 1e-6).
The cross-entropy is the plain one (PLOP does not use MiB's unbiased one).

On mask classification the entropy pseudo-labels are the port's (``pseudo_labels.py``, per-batch
medians of the teacher's per-pixel distribution) and "mask" CoMFormer's mask-based ones; the
adaptive factor and the logits POD do not apply (no per-pixel cross-entropy, no per-pixel logits).

What differs from PLOP's code on the same inputs: PLOP distils the pre-activation outputs of its
ResNet stages and DeepLab's ASPP output; here detectron2's res2-res5 (after ReLU) and the pixel
decoder's mask features. PLOP cuts windows of ``W // s`` pixels in both directions (its crops are
square); here ``H // s`` x ``W // s``, the same on square maps. Distributed, PLOP computes the
thresholds on each process's share of the data; here the histograms are summed over processes.
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch import distributed as dist

from detectron2.utils import comm

from ..modeling.per_pixel import upsample_logits
from .method import METHOD_REGISTRY, ContinualMethod, Prediction, StepBatch, StepData
from .mib import mib_init_classifier
from .pixel_losses import teacher_background_channel, teacher_channels_in_student
from .pseudo_labels import per_class_median, with_teacher_pseudo_labels

__all__ = [
    "PLOP",
    "local_pod_embedding",
    "pod_loss",
    "plop_entropy",
    "entropy_histograms",
    "plop_histogram_median",
    "histogram_median",
    "plop_pseudo_labels",
    "collapse_new_logits",
    "VARIANTS",
    "PSEUDO_LABEL_KINDS",
    "POD_FACTORS",
    "ENTROPY_MEDIANS",
    "MASK_FEATURES",
]

VARIANTS = ("plop", "comformer")
PSEUDO_LABEL_KINDS = ("mask", "entropy", "none")
POD_FACTORS = ("plop", "comformer")
ENTROPY_MEDIANS = ("plop", "fine", "batch")
# Name of the pixel decoder's per-pixel embeddings in POD_FEATURES; read from the prediction dict
# (the head returns them as outputs["mask_features"]), the other names from the backbone features.
MASK_FEATURES = "mask_features"

# The "plop" variant's POD weights (features, logits): PLOP's argparser for the method PLOP (its
# Pascal VOC scripts use it as is), and its ADE20K scripts (--pod_factor 0.001, pod_options
# factor 0.00001), by the prefix of the scenario's dataset name.
PLOP_POD_WEIGHTS = (0.01, 0.0005)
PLOP_POD_WEIGHTS_BY_DATASET: Dict[str, Tuple[float, float]] = {"ade20k": (0.001, 0.00001)}
# The "comformer" variant's (CoMFormer's README: PLOP ``CONT.DIST.POD_WEIGHT 0.001``).
COMFORMER_POD_WEIGHT = 0.001
# PLOP's find_median: bins of its histogram; "fine": bins of ours.
PLOP_BINS = 100
FINE_BINS = 10000


def local_pod_embedding(x: Tensor, scales: Sequence[int] = (1, 2, 4)) -> Tensor:
    """
    Local POD embedding of a feature map.

    At scale s the map is cut into s x s windows of ``H // s`` x ``W // s`` cells (the last rows
    and columns that do not fill a window are left out, as in PLOP); each window is averaged
    along its width (one value per channel and row) and along its height (one per channel and
    column). A scale whose windows would be empty (H < s or W < s) is skipped.

    Args:
        x: (B, C, H, W) features.
        scales: window grid sizes.

    Returns:
        (B, D) with ``D = C * sum_s s * s * (H // s + W // s)`` over the scales used.
    """
    b, c, height, width = x.shape
    parts = []
    for s in scales:
        kh, kw = height // s, width // s
        if kh == 0 or kw == 0:
            continue
        windows = x[:, :, : s * kh, : s * kw].reshape(b, c, s, kh, s, kw)
        parts.append(windows.mean(dim=5).flatten(1))  # (B, C, s, kh, s): pooled along width
        parts.append(windows.mean(dim=3).flatten(1))  # (B, C, s, s, kw): pooled along height
    if not parts:
        raise ValueError(
            f"local POD: a {height}x{width} feature map is smaller than every scale {list(scales)}"
        )
    return torch.cat(parts, dim=1)


def pod_loss(
    student: Sequence[Tensor],
    teacher: Sequence[Tensor],
    scales: Sequence[int] = (1, 2, 4),
    *,
    square: bool = False,
    layer_weights: Optional[Sequence[float]] = None,
) -> Tensor:
    """
    Local POD distillation: the L2 norm of the difference between the student's and the teacher's
    embeddings, per image, averaged over images, and over the F feature maps.

    Args:
        student: F feature maps (B, C_f, H_f, W_f).
        teacher: the teacher's F feature maps of the same shapes.
        scales: window grid sizes of :func:`local_pod_embedding`.
        square: square the maps before pooling (PLOP's ``prepro="pow"``).
        layer_weights: F weights: ``sum_f w_f mean_b ||...|| / F`` (PLOP's per-map factors);
            None: all 1.

    Returns:
        scalar loss.
    """
    if len(student) != len(teacher) or not student:
        raise ValueError(
            f"POD needs the same non-zero number of student and teacher feature maps, got "
            f"{len(student)} and {len(teacher)}"
        )
    if layer_weights is not None and len(layer_weights) != len(student):
        raise ValueError(f"POD: {len(layer_weights)} layer weights for {len(student)} maps")
    per_map = []
    for s, t in zip(student, teacher):
        if s.shape != t.shape:
            raise ValueError(f"POD: student {tuple(s.shape)} and teacher {tuple(t.shape)} differ")
        s, t = s.float(), t.float()
        if square:
            s, t = s.pow(2), t.pow(2)
        diff = local_pod_embedding(s, scales) - local_pod_embedding(t, scales)
        per_map.append(diff.norm(dim=1))  # (B,)
    if layer_weights is None:
        return torch.stack(per_map).mean()
    weighted = [w * n.mean() for w, n in zip(layer_weights, per_map)]
    return torch.stack(weighted).sum() / len(per_map)


def collapse_new_logits(
    student_logits: Tensor, num_old: int, num_teacher: int, background: int
) -> Tensor:
    """
    The student's per-pixel logits regrouped to the teacher's channels for the logits POD: each old
    class its own logit, the background its logit plus the new classes' logits (PLOP's
    ``extra_channels: "sum"``: a sum of logits, not of probabilities).

    Args:
        student_logits: (B, C_s, h, w).
        num_old: old classes.
        num_teacher: C_t.
        background: the student's background channel.

    Returns:
        (B, C_t, h, w).
    """
    num_student = student_logits.shape[1]
    to_student = teacher_channels_in_student(num_teacher, num_old, num_student)
    index = torch.as_tensor(to_student, device=student_logits.device)
    out = student_logits.index_select(1, index)
    kept = set(to_student)
    new = [c for c in range(num_student) if c not in kept]
    if new:
        t_bg = teacher_background_channel(background, num_old, num_teacher)
        new_sum = student_logits[:, new].sum(dim=1)
        out = torch.cat(
            [out[:, :t_bg], out[:, t_bg : t_bg + 1] + new_sum[:, None], out[:, t_bg + 1 :]], 1
        )
    return out


def plop_entropy(probs: Tensor, num_student: int) -> Tensor:
    """
    PLOP's per-pixel uncertainty of a teacher's softmax (train.py ``entropy(probs) / max_entropy``).

    Args:
        probs: (B, C_t, H, W) probabilities.
        num_student: C_s, the student's channels (PLOP's ``nb_current_classes``).

    Returns:
        (B, H, W): ``-(1 / log(C_t + 1e-8)) mean_c p_c log(p_c + 1e-8) / log(C_s)``.
    """
    scale = 1 / math.log(probs.shape[1] + 1e-8)
    mean = torch.mean(probs * torch.log(probs + 1e-8), dim=1)
    max_entropy = torch.log(torch.tensor(num_student, dtype=torch.float32, device=probs.device))
    return (-scale * mean) / max_entropy


def entropy_histograms(
    values: Tensor, classes: Tensor, num_classes: int, num_bins: int = PLOP_BINS
) -> Tensor:
    """
    Per-class histograms of values in [0, 1] over ``num_bins`` equal bins (the last bin also takes
    values >= 1; values are truncated to their bin as PLOP's ``(v * n).long()``).

    Args:
        values: (n,) values.
        classes: (n,) int64 class of each.
        num_classes: rows.

    Returns:
        (num_classes, num_bins) int64 counts.
    """
    bins = (values * num_bins).long().clamp(max=num_bins - 1)
    flat = classes * num_bins + bins
    counts = torch.bincount(flat, minlength=num_classes * num_bins)
    return counts.view(num_classes, num_bins)


def plop_histogram_median(histograms: Tensor) -> Tensor:
    """
    PLOP's per-class "median" of a histogram of [0, 1] (train.py ``find_median``), bit for bit.

    PLOP walks the bins keeping an offset that grows by each visited bin's *index* (its code adds
    ``lower_border * nb_bins``, which was meant to be the bin's count), and stops at the first bin
    k whose count reaches half the total minus that offset; the bin's index is computed as
    ``int(k / n * n)``, which rounds to k - 1 for some k. Kept as is: it made the published
    numbers. Classes without values get 0.

    Args:
        histograms: (C, n) counts.

    Returns:
        (C,) float32 on the histograms' device.
    """
    counts = histograms.detach().cpu()
    num_bins = counts.shape[1]
    out = torch.zeros(counts.shape[0], dtype=torch.float32)
    for c, row in enumerate(counts):
        total = row.sum()
        if total <= 0:
            continue
        half = total / 2  # float32, as PLOP's tensor division
        offset = 0.0
        for k in range(num_bins):
            start = k / num_bins
            j = int(start * num_bins)
            if offset <= half and half <= offset + row[j]:
                break
            offset += start * num_bins
        out[c] = start + ((half - offset) / row[j]) * (1 / num_bins)
    return out.to(histograms.device)


def histogram_median(histograms: Tensor) -> Tensor:
    """
    The per-class median of a histogram of [0, 1], interpolated linearly inside the bin where the
    cumulative count reaches half the total. Classes without values get 0.

    Args:
        histograms: (C, n) counts.

    Returns:
        (C,) float32.
    """
    counts = histograms.double()
    num_bins = counts.shape[1]
    total = counts.sum(dim=1)
    half = total / 2
    cumulative = counts.cumsum(dim=1)
    k = (cumulative < half[:, None]).sum(dim=1).clamp(max=num_bins - 1)
    in_bin = counts.gather(1, k[:, None])[:, 0]
    below = cumulative.gather(1, k[:, None])[:, 0] - in_bin
    median = (k + (half - below) / in_bin.clamp(min=1)) / num_bins
    return torch.where(total > 0, median, torch.zeros_like(median)).float()


def plop_pseudo_labels(
    labels: Tensor,
    teacher_logits: Tensor,
    thresholds: Tensor,
    *,
    num_old: int,
    background: int,
    num_student: int,
    ignore_value: int = 255,
) -> Tuple[Tensor, Tensor]:
    """
    PLOP's entropy pseudo-labels of one batch (train.py, ``pseudo_labeling == "entropy"``).

    Args:
        labels: (B, H, W) int64 training labels (student channels, ``ignore_value`` ignored).
        teacher_logits: (B, C_t, H, W) at the labels' size.
        thresholds: (C_t,) per teacher channel.
        num_old: old classes.
        background: the student's background channel.
        num_student: C_s.
        ignore_value: label of ignored pixels.

    Returns:
        labels (B, H, W): on pixels labelled background or an old class, the teacher's class
        (in student channels) where its uncertainty is below its class's threshold, else
        ``ignore_value``; and the adaptive factor (B,): confident background pixels /
        (background pixels + 1e-6), per image.
    """
    probs = teacher_logits.float().softmax(dim=1)
    predicted = probs.max(dim=1).indices  # (B, H, W) teacher channels
    uncertainty = plop_entropy(probs, num_student)
    confident = uncertainty < thresholds.to(uncertainty)[predicted]
    on_background = ((labels == background) | (labels < num_old)) & (labels != ignore_value)
    to_student = torch.as_tensor(
        teacher_channels_in_student(probs.shape[1], num_old, num_student), device=labels.device
    )
    out = torch.where(on_background & confident, to_student[predicted], labels)
    out = out.masked_fill(on_background & ~confident, ignore_value)
    num = (on_background & confident).float().sum(dim=(1, 2))
    den = on_background.float().sum(dim=(1, 2))
    return out, num / (den + 1e-6)


@METHOD_REGISTRY.register()
class PLOP(ContinualMethod):
    """PLOP: local POD and pseudo-labels; the variant and its components are in the module
    docstring."""

    needs_teacher = True
    reasons_about_old_classes = True

    def __init__(self, cfg, scenario, step: int):
        super().__init__(cfg, scenario, step)
        p = cfg.CONT.PLOP
        variant = p.VARIANT or ("plop" if self.per_pixel else "comformer")
        _check_choice("VARIANT", variant, VARIANTS)
        self.variant = variant
        self.ignore_value = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        self.no_object = self.per_pixel and not scenario.has_bg_class
        # channels (per-pixel) or classes (mask classification) seen so far
        self.num_seen = self.num_old + self.num_new + int(self.no_object)

        feature_weight, logits_weight = self._variant_pod_weights(scenario)
        pod_weight = feature_weight if p.POD_WEIGHT < 0 else float(p.POD_WEIGHT)
        self.pod_logits_weight = (
            logits_weight if p.POD_LOGITS_WEIGHT < 0 else float(p.POD_LOGITS_WEIGHT)
        )
        if self.pod_logits_weight > 0 and not self.per_pixel:
            raise ValueError(
                f"CONT.PLOP.POD_LOGITS_WEIGHT={p.POD_LOGITS_WEIGHT}: POD on the logits needs the "
                "per-pixel head (MODEL.MASK_FORMER.PER_PIXEL True)"
            )
        pod_factor = p.POD_FACTOR or variant
        _check_choice("POD_FACTOR", pod_factor, POD_FACTORS)
        self.pod_factor_kind = pod_factor
        self.pod_square = (variant == "plop") if p.POD_SQUARE is None else bool(p.POD_SQUARE)
        self.pseudo_labels = p.PSEUDO_LABELS or (
            "mask" if variant == "comformer" and not self.per_pixel else "entropy"
        )
        if self.pseudo_labels not in PSEUDO_LABEL_KINDS:
            raise ValueError(
                f"CONT.PLOP.PSEUDO_LABELS={p.PSEUDO_LABELS!r}; valid: "
                f"{', '.join(PSEUDO_LABEL_KINDS)}"
            )
        if self.pseudo_labels == "mask" and self.per_pixel:
            raise ValueError(
                "CONT.PLOP.PSEUDO_LABELS='mask' needs mask classification; the per-pixel head "
                "takes 'entropy' or 'none'"
            )
        median = p.ENTROPY_MEDIAN or ("plop" if variant == "plop" and self.per_pixel else "batch")
        _check_choice("ENTROPY_MEDIAN", median, ENTROPY_MEDIANS)
        if median != "batch" and not self.per_pixel:
            raise ValueError(
                f"CONT.PLOP.ENTROPY_MEDIAN={median!r} (thresholds from the step's training set) "
                "is implemented for the per-pixel head; mask classification takes 'batch'"
            )
        self.entropy_median = median
        adaptive = p.ADAPTIVE_FACTOR
        if adaptive and not self.per_pixel:
            raise ValueError(
                "CONT.PLOP.ADAPTIVE_FACTOR scales a per-pixel cross-entropy: it needs the "
                "per-pixel head"
            )
        self.adaptive_factor = (
            (variant == "plop" and self.per_pixel) if adaptive is None else bool(adaptive)
        )
        self.init = (variant == "plop") if p.INIT is None else bool(p.INIT)

        if pod_weight < 0 or self.pod_logits_weight < 0:
            raise ValueError("CONT.PLOP.POD_WEIGHT and POD_LOGITS_WEIGHT must be >= 0 (0: off)")
        if not p.POD_SCALES or any(int(s) < 1 for s in p.POD_SCALES):
            raise ValueError(f"CONT.PLOP.POD_SCALES={list(p.POD_SCALES)} must be integers >= 1")
        if pod_weight > 0 and not p.POD_FEATURES:
            raise ValueError("CONT.PLOP.POD_FEATURES is empty while CONT.PLOP.POD_WEIGHT > 0")
        if not 0 <= p.PSEUDO_THRESHOLD <= 1:
            raise ValueError(f"CONT.PLOP.PSEUDO_THRESHOLD={p.PSEUDO_THRESHOLD} must be in [0, 1]")
        if not 0 <= p.ENTROPY_THRESHOLD <= 1:
            raise ValueError(
                f"CONT.PLOP.ENTROPY_THRESHOLD={p.ENTROPY_THRESHOLD} must be a normalised entropy "
                "in [0, 1]"
            )
        self.pod_features = list(p.POD_FEATURES)
        self.pod_scales = [int(s) for s in p.POD_SCALES]
        self.pseudo_threshold = float(p.PSEUDO_THRESHOLD)
        self.entropy_threshold = float(p.ENTROPY_THRESHOLD)
        if pod_factor == "plop":  # PLOP: the fewer new classes, the stronger the distillation
            self.pod_factor = math.sqrt(self.num_seen / self.num_new)
        else:  # CoMFormer's port: the inverse
            self.pod_factor = math.sqrt(self.num_new / self.num_seen)
        # The features' weight times the factor (the whole POD weight without logits POD).
        self.pod_weight = pod_weight * self.pod_factor
        self.needs_teacher = (
            self.pod_weight > 0 or self.pod_logits_weight > 0 or self.pseudo_labels != "none"
        )
        self.needs_step_data = (
            self.per_pixel
            and step > 0
            and self.pseudo_labels == "entropy"
            and self.entropy_median != "batch"
        )
        self.thresholds: Optional[Tensor] = None

    def _variant_pod_weights(self, scenario) -> Tuple[float, float]:
        if self.variant == "comformer":
            return COMFORMER_POD_WEIGHT, 0.0
        weights = PLOP_POD_WEIGHTS
        for prefix, by_dataset in PLOP_POD_WEIGHTS_BY_DATASET.items():
            if scenario.dataset.startswith(prefix):
                weights = by_dataset
        return weights[0], (weights[1] if self.per_pixel else 0.0)

    # ------------------------------------------------------------------ before the step
    def init_new_classes(self, class_embed) -> None:
        if self.init and self.step > 0:
            mib_init_classifier(class_embed, self.num_old, self.num_new, self.background_row)

    @torch.no_grad()
    def before_step(self, data: StepData) -> None:
        """PLOP's class thresholds from one pass of the teacher over the step's training images."""
        if not self.needs_step_data:
            return
        if data.teacher is None:
            raise ValueError("PLOP's entropy thresholds need the teacher")
        num_bins = PLOP_BINS if self.entropy_median == "plop" else FINE_BINS
        histograms = None
        for images, targets in data.batches():
            t_logits = data.teacher(images).outputs["sem_logits"]
            probs = upsample_logits(t_logits, images.tensor.shape[-2:]).float().softmax(dim=1)
            on_background = targets["sem_seg"] == self.background_channel
            values = plop_entropy(probs, self.num_seen)[on_background]
            classes = probs.max(dim=1).indices[on_background]
            counts = entropy_histograms(values, classes, probs.shape[1], num_bins)
            histograms = counts if histograms is None else histograms + counts
        if histograms is None:
            raise ValueError("PLOP's entropy thresholds: the step has no training image")
        if comm.get_world_size() > 1:
            dist.all_reduce(histograms)
        if self.entropy_median == "plop":
            medians = plop_histogram_median(histograms)
        else:
            medians = histogram_median(histograms)
        self.thresholds = medians.clamp(min=self.entropy_threshold)

    # ------------------------------------------------------------------ training
    def losses(self, batch: StepBatch) -> Dict[str, torch.Tensor]:
        teacher = batch.teacher
        if teacher is None:  # the base step, or an ablation without POD and pseudo-labels
            return batch.set_losses(batch.student.outputs, batch.targets)
        if self.per_pixel:
            targets = self._per_pixel_targets(batch)
        elif self.pseudo_labels != "none":
            targets = with_teacher_pseudo_labels(
                batch.targets,
                teacher.outputs,
                batch.images.tensor.shape[-2:],
                kind=self.pseudo_labels,
                mask_activation=teacher.mask_activation,
                threshold=(
                    self.pseudo_threshold
                    if self.pseudo_labels == "mask"
                    else self.entropy_threshold
                ),
            )
        else:
            targets = batch.targets
        losses = batch.set_losses(batch.student.outputs, targets)
        if self.pod_weight > 0 or self.pod_logits_weight > 0:
            losses["loss_pod"] = self._pod(batch.student, teacher)
        return losses

    def _per_pixel_targets(self, batch: StepBatch) -> Dict[str, Tensor]:
        if self.pseudo_labels == "none":
            return batch.targets
        labels = batch.targets["sem_seg"]
        t_logits = upsample_logits(batch.teacher.outputs["sem_logits"], labels.shape[-2:])
        if self.entropy_median == "batch":
            thresholds = self._batch_thresholds(labels, t_logits)
        elif self.thresholds is None:
            raise RuntimeError(
                "PLOP: the entropy thresholds are computed before the step (before_step); the "
                "trainer did not run it"
            )
        else:
            thresholds = self.thresholds
        labels, factor = plop_pseudo_labels(
            labels,
            t_logits,
            thresholds,
            num_old=self.num_old,
            background=self.background_channel,
            num_student=self.num_seen,
            ignore_value=self.ignore_value,
        )
        targets = dict(batch.targets, sem_seg=labels)
        if self.adaptive_factor:
            targets["pixel_weight"] = factor[:, None, None]
        return targets

    @torch.no_grad()
    def _batch_thresholds(self, labels: Tensor, t_logits: Tensor) -> Tensor:
        """The port's thresholds: the lower median per class over this batch's background pixels."""
        probs = t_logits.float().softmax(dim=1)
        on_background = labels == self.background_channel
        values = plop_entropy(probs, self.num_seen)[on_background]
        classes = probs.max(dim=1).indices[on_background]
        return per_class_median(values, classes, probs.shape[1]).clamp(min=self.entropy_threshold)

    def _pod(self, student: Prediction, teacher: Prediction) -> Tensor:
        maps_s = self._pod_inputs(student, "student")
        maps_t = self._pod_inputs(teacher, "teacher")
        if not self.pod_logits_weight > 0:
            # one weight for every map: the port's formula, operation for operation
            return self.pod_weight * pod_loss(
                maps_s, maps_t, self.pod_scales, square=self.pod_square
            )
        weights = [self.pod_weight] * len(maps_s) + [self.pod_logits_weight * self.pod_factor]
        t_logits = teacher.outputs["sem_logits"]
        maps_s.append(
            collapse_new_logits(
                student.outputs["sem_logits"],
                self.num_old,
                t_logits.shape[1],
                self.background_channel,
            )
        )
        maps_t.append(t_logits)
        return pod_loss(
            maps_s, maps_t, self.pod_scales, square=self.pod_square, layer_weights=weights
        )

    def _pod_inputs(self, prediction: Prediction, who: str) -> List[Tensor]:
        if self.pod_weight == 0:
            return []
        features, outputs = prediction.features, prediction.outputs
        maps = []
        for name in self.pod_features:
            source = outputs if name == MASK_FEATURES else features
            if name not in source:
                where = (
                    "the prediction dict (the head must return outputs['mask_features'])"
                    if name == MASK_FEATURES
                    else f"the backbone features ({', '.join(sorted(features))})"
                )
                raise KeyError(f"CONT.PLOP.POD_FEATURES: {name!r} is not in the {who}'s {where}")
            maps.append(source[name])
        return maps

    def extra_repr(self) -> str:
        logits = f", logits {self.pod_logits_weight:.3g}" if self.pod_logits_weight > 0 else ""
        return (
            f"{super().extra_repr()}, variant={self.variant!r}, pod_weight={self.pod_weight:.3g} "
            f"on {self.pod_features}{logits} (factor {self.pod_factor_kind!r}, "
            f"square={self.pod_square}, scales {self.pod_scales}), "
            f"pseudo_labels={self.pseudo_labels!r} (median {self.entropy_median!r}), "
            f"adaptive_factor={self.adaptive_factor}, init={self.init}"
        )


def _check_choice(key: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"CONT.PLOP.{key}={value!r}; valid: {', '.join(valid)}")
