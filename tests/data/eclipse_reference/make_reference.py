"""Writes the ECLIPSE reference outputs of tests/test_eclipse.py from clovaai/ECLIPSE's own code.

Run from a checkout of clovaai/ECLIPSE (see README.md here), not from this repository:

    python make_reference.py OUT_DIR
"""

import sys

import torch

from continual.method_wrapper.loss import sigmoid_focal_loss
from mask2former.modeling.transformer_decoder.mask2former_transformer_decoder import (
    MultiScaleMaskedTransformerDecoder,
)

CONFIGS = {
    # name: (deltas, deep prompts)
    "decoder_deltas_pos": ([0.4, 0.5], True),
    "decoder_deltas_neg": ([-0.4, -0.6], True),
    "decoder_shallow_nodelta": ([0.0], False),
}


def decoder_case(deltas, deep):
    torch.manual_seed(0)
    decoder = MultiScaleMaskedTransformerDecoder(
        32,
        True,
        num_classes=9,
        hidden_dim=32,
        num_queries=5,
        nheads=4,
        dim_feedforward=64,
        dec_layers=3,
        pre_norm=False,
        mask_dim=16,
        enforce_input_project=False,
        num_prompts=3,
        prompt_deep=deep,
        softmask=False,
        classes=[4, 3, 2],
        prompt_mask_mlp=True,
        prompt_no_obj_mlp=False,
        deep_cls=True,
        deltas=deltas,
    ).eval()
    x = [torch.randn(2, 32, s, s) for s in (4, 8, 16)]
    mask_features = torch.randn(2, 16, 16, 16)
    with torch.no_grad():
        out = decoder(x, mask_features)
    return {
        "state": decoder.state_dict(),
        "x": x,
        "mask_features": mask_features,
        "deltas": decoder.deltas,
        "pred_logits": out["pred_logits"],
        "pred_masks": out["pred_masks"],
    }


def loss_case():
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 10) * 3  # (B, Q, K+1)
    targets = torch.randint(0, 10, (2, 6))
    # the code calls it on (B, K+1, Q) logits (SetCriterion.loss_labels), alpha 5 and gamma 1
    # (mask2former/config.py FOCAL_ALPHA / FOCAL_GAMMA)
    loss = sigmoid_focal_loss(logits.transpose(1, 2), targets, alpha=5.0, gamma=1.0)
    return {"logits": logits, "targets": targets, "loss": loss}


if __name__ == "__main__":
    out = sys.argv[1]
    for name, (deltas, deep) in CONFIGS.items():
        torch.save(decoder_case(deltas, deep), f"{out}/{name}.pt")
    torch.save(loss_case(), f"{out}/sigmoid_focal_loss.pt")
