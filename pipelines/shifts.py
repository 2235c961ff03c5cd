"""Distribution shift at evaluation: distortions of query images by a level, level 0 the identity.

``orch compare --shift shear:0,0.2,0.4`` scores every model on the same episodes with the query
images distorted (the support set stays as it is), to measure how fast accuracy falls when inputs
move away from the training distribution -- the experiment of Finn and Levine (2018, "Meta-Learning
and Universality"), who shear Omniglot queries. The kinds:

- ``shear``: horizontal shear ``x' = x + level * y`` (level is the shear factor, tan of the angle);
- ``rotate``: rotation by ``level`` degrees (a shift only for models not trained with rotations;
  multiples of 90 are seen in training when ``augment_rotations`` is on);
- ``blur``: Gaussian blur with standard deviation ``level`` pixels;
- ``noise``: additive Gaussian noise with standard deviation ``level`` on the [0, 1] pixel scale.

All act on model inputs, which are pixels scaled to [0, 1] and normalised per channel by
``(x - mean) / std``: resampling and blurring are affine combinations with weights summing to one,
so they commute with that normalisation; noise is divided by the channel's ``std`` to stay on the
pixel scale. Geometric shifts repeat the border (the page of an Omniglot image) outside the image.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("shear", "rotate", "blur", "noise")


class ShiftError(ValueError):
    """A ``--shift`` argument orch cannot read; the message is one line."""


def parse_shift(text: str) -> tuple[str, list[float]]:
    """``"shear:0,0.2,0.4"`` -> ``("shear", [0.0, 0.2, 0.4])``; levels in the order given."""
    kind, colon, levels = text.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise ShiftError(f"--shift {text!r}: unknown kind {kind!r}; use one of "
                         f"{', '.join(KINDS)} (e.g. shear:0,0.2,0.4)")
    if not colon or not levels.strip():
        raise ShiftError(f"--shift {text!r}: give the levels after a colon, e.g. {kind}:0,0.2,0.4")
    values = []
    for item in levels.split(","):
        try:
            value = float(item)
        except ValueError:
            raise ShiftError(f"--shift {text!r}: level {item.strip()!r} is not a number") from None
        if not math.isfinite(value) or (kind in ("blur", "noise") and value < 0):
            raise ShiftError(f"--shift {text!r}: level {item.strip()} must be a finite number"
                             f"{' >= 0' if kind in ('blur', 'noise') else ''}")
        values.append(value)
    if len(set(values)) != len(values):
        raise ShiftError(f"--shift {text!r}: a level is given twice")
    return kind, values


def apply_shift(images: Tensor, kind: str, level: float, *,
                preprocessing: Mapping[str, Any] | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """``images`` (N, C, H, W) distorted by ``kind`` at ``level``; level 0 returns them unchanged.
    ``generator`` seeds the noise, so every model sees the same noisy images."""
    if kind not in KINDS:
        raise ShiftError(f"unknown shift {kind!r}; use one of {', '.join(KINDS)}")
    if level == 0:
        return images
    return _SHIFTS[kind](images, level, preprocessing or {}, generator)


def _affine(images: Tensor, matrix: list[list[float]]) -> Tensor:
    """Resample ``images`` at ``matrix @ (x, y, 1)`` in [-1, 1] coordinates, repeating the border."""
    theta = torch.tensor(matrix, dtype=images.dtype).expand(len(images), 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _shear(images: Tensor, level: float, preprocessing: Mapping[str, Any],
           generator: torch.Generator | None) -> Tensor:
    return _affine(images, [[1.0, level, 0.0], [0.0, 1.0, 0.0]])


def _rotate(images: Tensor, level: float, preprocessing: Mapping[str, Any],
            generator: torch.Generator | None) -> Tensor:
    angle = math.radians(level)
    cos, sin = math.cos(angle), math.sin(angle)
    return _affine(images, [[cos, -sin, 0.0], [sin, cos, 0.0]])


def _blur(images: Tensor, level: float, preprocessing: Mapping[str, Any],
          generator: torch.Generator | None) -> Tensor:
    """Separable Gaussian blur, sigma ``level`` pixels, reflecting at the edges."""
    side = min(images.shape[-2:])
    radius = max(1, min(math.ceil(3 * level), side - 1))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets / level) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    rows = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    columns = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    padded = F.pad(images, (radius, radius, 0, 0), mode="reflect")
    blurred = F.conv2d(padded, rows, groups=channels)
    padded = F.pad(blurred, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(padded, columns, groups=channels)


def _noise(images: Tensor, level: float, preprocessing: Mapping[str, Any],
           generator: torch.Generator | None) -> Tensor:
    channels = images.shape[1]
    std = torch.tensor(preprocessing.get("std", [1.0] * channels), dtype=images.dtype)
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
    return images + level * noise / std.view(1, -1, 1, 1)


_SHIFTS: dict[str, Callable[..., Tensor]] = {"shear": _shear, "rotate": _rotate, "blur": _blur,
                                             "noise": _noise}
