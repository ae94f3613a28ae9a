"""The two bounds every continual method is compared with: fine-tuning and joint training."""

from .method import METHOD_REGISTRY, ContinualMethod

__all__ = ["FT", "Joint"]


@METHOD_REGISTRY.register()
class FT(ContinualMethod):
    """Plain fine-tuning on the new classes: the lower bound (forgets the old classes)."""


@METHOD_REGISTRY.register()
class Joint(ContinualMethod):
    """Joint training: every step trains on all images and labels of every class seen so far
    (the upper bound; it sees the old data, which continual methods may not)."""

    trains_on_all_seen = True
