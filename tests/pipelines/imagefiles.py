"""Small image files made on the fly for the importer and sampler tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_png(path: Path, pixels, mode: str = "L") -> None:
    """Save a uint8 array as an image file (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode).save(path)


def coded_image(class_index: int, image_index: int, size: int = 8):
    """A greyscale image that says which class and image it is, and which way up it is:
    pixel (0, 0) is the class, (0, 1) the image, and the bottom-right corner is 255."""
    pixels = np.zeros((size, size), np.uint8)
    pixels[0, 0], pixels[0, 1], pixels[-1, -1] = class_index, image_index, 255
    return pixels
