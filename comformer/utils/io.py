"""Files that survive a kill at any moment: write to a temporary file, then rename over the target.

Also the safe checkpoint loaders: ``.pth`` checkpoints are read with
``torch.load(weights_only=True)``, which refuses to run code hidden in a pickle. detectron2's
``.pkl`` format (ImageNet backbones, its model zoo) is a plain pickle and stays so: load ``.pkl``
files from trusted places only.
"""

import json
import os
import pickle
import tempfile
from typing import Any, BinaryIO, Callable, Dict

import torch

from detectron2.checkpoint import DetectionCheckpointer

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "load_checkpoint_state",
    "AtomicDetectionCheckpointer",
]


def atomic_write(path: str, write: Callable[[BinaryIO], Any]) -> None:
    """
    Write ``path`` through ``write(f)`` on a temporary file of the same folder, flushed to disk and
    then renamed over ``path``: readers, and a run killed at any moment, see the old file or the
    new one, never a part. A kill leaves at most a ``.<name>.*.tmp`` file behind.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory
    )
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp makes the file private (0600); give it the mode a plain open() would.
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


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
        raise ValueError(
            f"{path} is not a model checkpoint (expected a dict of tensors under 'model')"
        )
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """
    DetectionCheckpointer whose checkpoints and ``last_checkpoint`` tag are written atomically, so
    a training killed while saving leaves the previous checkpoint intact (the checkpoint file is
    complete before the tag names it), and whose torch checkpoints (every format but detectron2's
    ``.pkl``) are read with ``torch.load(weights_only=True)``.
    """

    def load(self, path: str, *args, **kwargs):
        try:
            return super().load(path, *args, **kwargs)
        finally:
            # DetectionCheckpointer leaves this set when loading fails, and asserts on it at the
            # next load.
            self._parsed_url_during_load = None

    def _torch_load(self, f: str) -> Dict[str, Any]:
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"checkpoint {f} holds Python objects other than tensors and plain containers; "
                "comformer loads torch checkpoints with weights_only=True and will not run code "
                f"from a pickle ({e}). If the file comes from a trusted place, re-save its state "
                "dict: torch.save({'model': state_dict}, path)"
            ) from e
        except (RuntimeError, EOFError, OSError) as e:
            raise ValueError(
                f"cannot read checkpoint {f} (truncated or not a torch file?): "
                f"{type(e).__name__}: {e}"
            ) from e

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
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)
