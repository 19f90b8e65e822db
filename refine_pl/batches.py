"""The training batches of the defenses: images with their dataset indices, never labels."""

from typing import NamedTuple

from torch import Tensor


class IndexedImages(NamedTuple):
    """A training batch of un-augmented images with their dataset indices (never labels).

    The index lets :class:`RefineLitModule` compute each image's pseudo-label once: the victim is frozen, so its
    prediction on an un-augmented image never changes. Augmented batches are plain image tensors instead.

    Attributes:
        images: ``[B, C, H, W]`` images in [0, 1] (``[C, H, W]`` for one dataset item).
        indices: ``[B]`` long positions of the images in the training set (an int for one dataset item).
    """

    images: Tensor
    indices: Tensor


class AugmentedViews(NamedTuple):
    """A training batch of augmented images, each with the un-augmented image and the dataset index it comes from.

    The transform trains on ``views``; each view's pseudo-label is the victim's prediction on its un-augmented
    image (computed once per index, as for :class:`IndexedImages`), so an augmentation never changes the class a
    view has to be mapped to. Never labels.

    Attributes:
        views: ``[B, C, H, W]`` augmented images in [0, 1].
        images: ``[B, C, H, W]`` the un-augmented images they were made from.
        indices: ``[B]`` long positions of the images in the training set.
    """

    views: Tensor
    images: Tensor
    indices: Tensor
