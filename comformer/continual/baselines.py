"""The bounds every continual method is compared with: fine-tuning (lower) and joint training
(upper), and fine-tuning on all the data seen so far (a cheaper, weaker reference)."""
from .method import METHOD_REGISTRY, ContinualMethod

__all__ = ["FT", "Joint", "JointFT"]


@METHOD_REGISTRY.register()
class FT(ContinualMethod):
    """Plain fine-tuning on the new classes: the lower bound (forgets the old classes)."""


@METHOD_REGISTRY.register()
class Joint(ContinualMethod):
    """
    The papers' upper bound: at every step a new model is trained offline, from MODEL.WEIGHTS
    with the base step's schedule, on all images and all labels of the classes seen so far. It
    owes nothing to the previous step, and it sees the old data, which continual methods may not.
    """

    trains_on_all_seen = True
    offline = True


@METHOD_REGISTRY.register()
class JointFT(ContinualMethod):
    """
    Fine-tuning of the previous step's model with the incremental schedule on all images and
    labels of the classes seen so far (``CONT.METHOD jointft``). Cheaper than :class:`Joint` and
    not an upper bound: a short fine-tune may fall short of a model trained on everything.
    """

    trains_on_all_seen = True
