"""Outputs of MiB's, PLOP's and CoMFormer's own code on small random inputs, for
tests/test_per_pixel.py. Runs the reference repositories' files, not comformer (see README.md).

    python generate.py --mib /path/to/MiB --plop /path/to/CVPR2021_PLOP \
        --comformer /path/to/CoMFormer --out reference.pt
"""

import argparse
import importlib.util
import logging
import sys
import types

import torch


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser()
    for repo in ("mib", "plop", "comformer"):
        parser.add_argument(f"--{repo}", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    mib_loss = load(f"{args.mib}/utils/loss.py", "mib_loss")
    sys.modules["apex"] = types.SimpleNamespace(amp=None)  # train.py imports it; unused here
    sys.path.insert(0, args.plop)
    plop = load(f"{args.plop}/train.py", "plop_train")
    comformer_pod = load(f"{args.comformer}/continual/modeling/pod.py", "comformer_pod")

    g = torch.Generator().manual_seed(0)
    out = {}

    # MiB: 3 old channels (background 0 and classes 1, 2), 2 new ones (3, 4)
    logits = torch.randn(2, 5, 6, 6, generator=g) * 2
    labels = torch.randint(0, 5, (2, 6, 6), generator=g)
    labels[0, :2] = 255
    uce = mib_loss.UnbiasedCrossEntropy(old_cl=3, reduction="none", ignore_index=255)
    teacher = torch.randn(2, 3, 6, 6, generator=g) * 2
    out["mib"] = {
        "logits": logits,
        "labels": labels,
        "teacher": teacher,
        "num_old": 3,
        "uce": uce(logits, labels),
        "ukd": mib_loss.UnbiasedKnowledgeDistillationLoss(alpha=1.0)(logits, teacher),
        "ukd_alpha2": mib_loss.UnbiasedKnowledgeDistillationLoss(alpha=2.0)(logits, teacher),
        "kd": mib_loss.KnowledgeDistillationLoss(alpha=1.0)(logits, teacher),
    }

    # PLOP: a teacher with 4 channels (background + 3 old classes), a student with 6 (2 new)
    batches, t_logits = [], []
    for _ in range(3):
        images = torch.zeros(2, 3, 16, 16)
        lab = torch.randint(0, 3, (2, 16, 16), generator=g)
        lab[lab > 0] += 3  # background 0, new classes 4 and 5
        lab[:, 0] = 255
        batches.append((images, lab))
        t_logits.append(torch.randn(2, 4, 16, 16, generator=g) * torch.rand(1, generator=g) * 6)
    calls = iter(t_logits)
    fake = types.SimpleNamespace(
        nb_current_classes=6,
        device="cpu",
        pseudo_nb_bins=None,
        threshold=0.001,
        step_threshold=None,
        step=1,
        model_old=lambda images, ret_intermediate=False: (next(calls), {}),
    )
    thresholds, max_value = plop.Trainer.find_median(
        fake, batches, "cpu", logging.getLogger("plop"), mode="entropy"
    )
    probs = torch.softmax(t_logits[0], dim=1)
    out["plop_median"] = {
        "labels": torch.stack([b[1] for b in batches]),
        "teacher": torch.stack(t_logits),
        "num_student": 6,
        "thresholds": thresholds,
        "max_value": max_value,
        "entropy": plop.entropy(probs) / max_value,
    }

    feats_old = [torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 4, 4, 4, generator=g)]
    feats_new = [f + 0.3 * torch.randn(f.shape, generator=g) for f in feats_old]
    logits_old = torch.randn(2, 4, 8, 8, generator=g)
    logits_new = torch.randn(2, 6, 8, 8, generator=g)
    pod = plop.features_distillation(
        [f.clone() for f in feats_old] + [logits_old.clone()],
        [f.clone() for f in feats_new] + [logits_new.clone()],
        collapse_channels="local",
        labels=torch.zeros(2, 32, 32, dtype=torch.long),
        index_new_class=4,
        pod_factor=0.01,
        prepro="pow",
        spp_scales=[1, 2, 4],
        pod_options={
            "switch": {"after": {"extra_channels": "sum", "factor": 0.0005, "type": "local"}}
        },
        use_pod_schedule=True,
        nb_current_classes=6,
        nb_new_classes=2,
    )
    out["plop_pod"] = {
        "feats_old": feats_old,
        "feats_new": feats_new,
        "logits_old": logits_old,
        "logits_new": logits_new,
        "loss": pod,
        "comformer_loss": comformer_pod.func_pod_loss(feats_new, feats_old, scales=[1, 2, 4]),
    }
    torch.save(out, args.out)


if __name__ == "__main__":
    main()
