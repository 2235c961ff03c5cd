"""The data augmentation of pretraining on colour images: a random resized crop and a horizontal flip.

Chen et al. (2019, "A Closer Look at Few-shot Classification", ``--train_aug``) and Wang et al.
(2019, SimpleShot) pretrain on mini-ImageNet with torchvision's ``RandomResizedCrop`` (a crop of
8% to 100% of the area, aspect ratio 3/4 to 4/3, resized back) and ``RandomHorizontalFlip``;
Chen et al. add a colour jitter, left out here. orch has no torchvision, so the same two steps
are written over a batch tensor, drawn from a ``torch.Generator`` so that a shard's augmentation
is a pure function of its seed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

AREA = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
# As torchvision: after this many boxes that do not fit, take the whole image.
ATTEMPTS = 10


def crop_and_flip(images: Tensor, generator: torch.Generator) -> Tensor:
    """``images`` ([N, C, H, W]), each cropped to a random box resized back to H x W (bilinear)
    and flipped left-right with probability one half."""
    height, width = images.shape[-2:]
    out = torch.empty_like(images)
    for i, image in enumerate(images):
        top, left, h, w = _box(height, width, generator)
        crop = image[:, top:top + h, left:left + w].unsqueeze(0)
        resized = torch.nn.functional.interpolate(crop, size=(height, width), mode="bilinear",
                                                  align_corners=False)[0]
        flip = bool(torch.rand((), generator=generator) < 0.5)
        out[i] = resized.flip(-1) if flip else resized
    return out


def _box(height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, box height, box width) of a random crop of ``AREA`` and ``RATIO``."""
    area = height * width
    for _ in range(ATTEMPTS):
        target = area * float(torch.empty(()).uniform_(*AREA, generator=generator))
        log_ratio = torch.empty(()).uniform_(math.log(RATIO[0]), math.log(RATIO[1]),
                                             generator=generator)
        ratio = math.exp(float(log_ratio))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    return 0, 0, height, width
