"""Files that survive a kill at any moment: write to a temporary file, then rename over the target.

Also the safe checkpoint loader: checkpoints are read with ``torch.load(weights_only=True)``,
which refuses to run code hidden in a pickle.
"""
import json
import os
import tempfile
from typing import Any, Dict

import torch

from detectron2.checkpoint import DetectionCheckpointer

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "load_checkpoint_state",
    "AtomicDetectionCheckpointer",
]


def _atomic_replace(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    _atomic_replace(path, lambda f: f.write(data))


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def load_checkpoint_state(path: str) -> Dict[str, torch.Tensor]:
    """
    The model state dict of a ``.pth`` checkpoint (detectron2's ``{"model": ...}`` or a bare state
    dict), loaded on the CPU with ``weights_only=True``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a model checkpoint (expected a dict of tensors under 'model')")
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose checkpoints and ``last_checkpoint`` tag are written atomically,
    so a training killed while saving leaves the previous checkpoint intact."""

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        _atomic_replace(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)
