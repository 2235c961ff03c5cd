"""How a raw image becomes a model input: one recorded treatment, applied at import and at serving.

An import stores each image as uint8 pixels after the *stored* steps (colour mode, resize,
inversion) and records the whole treatment in its manifest; the sampler applies the *per-episode*
step (scaling to [0, 1] and normalisation) when it builds tensors. ``preprocess_image`` runs both
on a raw file, so a model trained on an import sees a new image exactly as it saw its training data:

    {"mode": "L", "channels": 1, "size": 28, "resample": "lanczos", "invert": true,
     "normalization": "none", "mean": [0.0], "std": [1.0]}

``invert`` turns dark strokes on a light page (Omniglot) into strokes 1 on 0.
"""

from __future__ import annotations

import io
import os
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from pipelines.dataset import DatasetError

RESAMPLE = {"lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX}
MODES = {"L": 1, "RGB": 3}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# PIL raises these for files that are not images or are damaged.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def make_preprocessing(*, size: int, mode: str, invert: bool, resample: str = "lanczos",
                       mean: list[float] | None = None, std: list[float] | None = None,
                       normalization: str = "none") -> dict[str, Any]:
    """A preprocessing record; ``mean``/``std`` default to the identity (values stay in [0, 1])."""
    if mode not in MODES:
        raise ValueError(f"unknown colour mode {mode!r}; allowed: {', '.join(MODES)}")
    if resample not in RESAMPLE:
        raise ValueError(f"unknown resampling {resample!r}; allowed: {', '.join(RESAMPLE)}")
    channels = MODES[mode]
    return {"mode": mode, "channels": channels, "size": size, "resample": resample,
            "invert": invert, "normalization": normalization,
            "mean": list(mean) if mean is not None else [0.0] * channels,
            "std": list(std) if std is not None else [1.0] * channels}


def decode(data: bytes, *, name: str) -> Image.Image:
    """The image in ``data`` (the bytes of file ``name``), fully loaded; ``DatasetError`` if not one."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except _DECODE_ERRORS as error:
        raise DatasetError(f"{name}: not a readable PNG/JPEG image ({error})") from None
    return image


def to_pixels(image: Image.Image, preprocessing: Mapping[str, Any]) -> np.ndarray:
    """The stored steps: colour mode, square resize, inversion -> uint8 ``[C, H, W]``."""
    size = int(preprocessing["size"])
    image = image.convert(preprocessing["mode"])  # one-bit Omniglot PNGs become 0/255 greyscale
    if image.size != (size, size):
        image = image.resize((size, size), RESAMPLE[preprocessing["resample"]])
    pixels = np.asarray(image, dtype=np.uint8)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    if preprocessing["invert"]:
        pixels = 255 - pixels
    return np.ascontiguousarray(pixels)


def normalise(pixels: np.ndarray, preprocessing: Mapping[str, Any]) -> np.ndarray:
    """The per-episode step: uint8 ``[..., C, H, W]`` -> float32 scaled to [0, 1] and normalised.

    NumPy rather than torch: on a busy machine torch's intra-op thread pool makes this small
    element-wise work tens of times slower than it is single-threaded.
    """
    channels = int(preprocessing["channels"])
    mean = np.asarray(preprocessing["mean"], np.float32).reshape(channels, 1, 1)
    scale = (1.0 / (255.0 * np.asarray(preprocessing["std"], np.float32))).reshape(channels, 1, 1)
    shift = mean * (255.0 * scale)
    return pixels.astype(np.float32) * scale - shift


def preprocess_image(image: str | os.PathLike[str] | Image.Image,
                     preprocessing: Mapping[str, Any]) -> Tensor:
    """A raw image file (or PIL image) as the float ``[C, H, W]`` tensor a model trained with
    ``preprocessing`` expects: exactly the treatment its training images had."""
    if not isinstance(image, Image.Image):
        try:
            with open(image, "rb") as handle:
                data = handle.read()
        except OSError as error:
            raise DatasetError(f"{image}: cannot read ({error.strerror})") from None
        image = decode(data, name=str(image))
    return torch.from_numpy(normalise(to_pixels(image, preprocessing), preprocessing))
