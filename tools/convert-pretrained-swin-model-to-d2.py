#!/usr/bin/env python
"""Convert an official Swin Transformer ImageNet checkpoint into a detectron2 weights file.

    python tools/convert-pretrained-swin-model-to-d2.py swin_tiny_patch4_window7_224.pth \\
        swin_tiny_patch4_window7_224.pkl

then point MODEL.WEIGHTS at the .pkl. Parameter names are kept as they are: ``D2SwinTransformer``
uses the official layout, and detectron2's checkpointer adds the ``backbone.`` prefix by its
matching heuristics (enabled in the written file).

Dropped:
  head.*                         the ImageNet classifier
  norm.weight, norm.bias         the norm before the classifier's pooling (the backbone has one
                                 norm per returned stage instead, norm0..norm3, trained from scratch)
  *.attn_mask                    shifted-window masks precomputed for the 224 / 384 pretraining
                                 resolution; the backbone computes them for each input size
"""

import argparse
import pickle
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

__all__ = ["convert", "convert_state_dict", "main"]

# A key that every Swin checkpoint has; used to reject files that are not Swin checkpoints.
_SWIN_SENTINEL = "patch_embed.proj.weight"


def _dropped(key: str) -> bool:
    return (
        key.startswith("head.") or key in ("norm.weight", "norm.bias") or key.endswith(".attn_mask")
    )


def convert_state_dict(
    state_dict: Dict[str, torch.Tensor],
) -> Tuple[Dict[str, np.ndarray], List[str]]:
    """
    Args:
        state_dict: the official checkpoint's ``"model"`` entry.
    Returns:
        the kept entries as numpy arrays (names unchanged), and the names that were dropped.
    """
    if _SWIN_SENTINEL not in state_dict:
        raise ValueError(
            f"not a Swin Transformer state dict: no {_SWIN_SENTINEL!r} among its "
            f"{len(state_dict)} keys (first: {sorted(state_dict)[:5]})"
        )
    kept, dropped = {}, []
    for key, value in state_dict.items():
        if _dropped(key):
            dropped.append(key)
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"entry {key!r} is a {type(value).__name__}, expected a tensor")
        kept[key] = value.detach().cpu().numpy()
    return kept, dropped


def convert(src: str, dst: str) -> Tuple[Dict[str, np.ndarray], List[str]]:
    """
    Read the official checkpoint ``src`` (a ``.pth`` holding ``{"model": state_dict}``) and write
    the detectron2 pickle ``dst``.

    Returns:
        what :func:`convert_state_dict` returns.
    """
    src_path = Path(src)
    if not src_path.is_file():
        raise FileNotFoundError(f"Swin checkpoint {src} does not exist")
    try:
        # weights_only: a checkpoint from the internet must not be able to run code on load
        checkpoint = torch.load(src_path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ValueError(f"{src} is not a loadable PyTorch checkpoint: {e}") from e
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"{src}: expected an official Swin checkpoint, a dict with a 'model' state dict; "
            f"found {found}"
        )
    if not isinstance(checkpoint["model"], dict):
        raise ValueError(
            f"{src}: 'model' is a {type(checkpoint['model']).__name__}, not a state dict"
        )
    kept, dropped = convert_state_dict(checkpoint["model"])
    with open(dst, "wb") as f:
        pickle.dump({"model": kept, "__author__": "third_party", "matching_heuristics": True}, f)
    return kept, dropped


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="official Swin checkpoint (.pth)")
    parser.add_argument("output", help="detectron2 weights file to write (.pkl)")
    args = parser.parse_args(argv)
    kept, dropped = convert(args.source, args.output)
    print(f"wrote {len(kept)} tensors to {args.output}; dropped {len(dropped)}: ", end="")
    print(", ".join(dropped[:6]) + (" ..." if len(dropped) > 6 else ""))


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
