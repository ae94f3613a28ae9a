"""Which methods may share a base model.

Papers compare continual methods from one base model per setting, but a base is only a method's
own when it was trained with that method's step-0 losses: CoMFormer trains its base with softmax
masks and the focal loss, MiB and PLOP with Mask2Former's losses. :func:`base_signature` names a
base step's training; runs with equal signatures train bit-identical bases (same config, seed
and losses), so one of them can train it and the others adopt it (``CONT.BASE_WEIGHTS``). The
runner records the signature with the step-0 results and refuses to adopt a base whose signature
differs.
"""
import hashlib
from typing import Dict, Mapping

from ..continual import build_method
from ..data.scenario import build_scenario

__all__ = ["base_signature", "base_owners"]


def base_signature(cfg) -> str:
    """
    A short hash of everything that decides the base step's training: the config without the
    continual keys, output folder and weights to adopt; the base classes and the data mode; and
    the method's :meth:`~comformer.continual.method.ContinualMethod.base_key`.
    """
    scenario = build_scenario(cfg)
    if scenario is None:
        raise ValueError("base_signature needs a continual config (CONT.TASK or CONT.STEP_CLASSES)")
    model_cfg = cfg.clone()
    model_cfg.defrost()
    model_cfg.pop("CONT")
    model_cfg.OUTPUT_DIR = ""
    parts = [
        model_cfg.dump(),
        f"base classes {list(scenario.steps[0])}, mode {scenario.mode}",
        build_method(cfg, scenario, 0).base_key(),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def base_owners(configs: Mapping[str, object]) -> Dict[str, str]:
    """
    For each method (name -> its scenario config), the method whose run trains the base it uses:
    among methods with the same :func:`base_signature`, the first in alphabetical order, so the
    answer does not depend on the order in which methods are listed. An owner maps to itself.
    """
    signatures = {name: base_signature(cfg) for name, cfg in configs.items()}
    owners: Dict[str, str] = {}
    for name in sorted(configs):
        owners[name] = next(m for m in sorted(configs) if signatures[m] == signatures[name])
    return owners
