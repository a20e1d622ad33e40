"""Small image files written in the on-disk layouts of real datasets.

Each image is a flat colour derived from a key (by default its class folder) plus noise, so
images of one class look alike and a classifier has something to learn.
"""

import hashlib
import os

import numpy as np
from PIL import Image


def _colour(key):
    digest = hashlib.sha256(key.encode()).digest()
    return np.array(digest[:3], dtype=np.float32)


def write_images(root, relpaths, size=32, seed=0, key_of=os.path.dirname):
    """Write one small image per relative path under root; returns the absolute paths."""
    rng = np.random.default_rng(seed)
    written = []
    for relpath in relpaths:
        path = os.path.join(str(root), relpath)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pixels = _colour(key_of(relpath) or relpath) + rng.normal(0, 20, (size, size, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
        written.append(path)
    return written


def write_class_folders(root, counts, pattern="image_{:04d}.jpg", seed=0):
    """Write `counts[folder]` images into root/folder/; returns the relative paths."""
    relpaths = [
        os.path.join(folder, pattern.format(index + 1))
        for folder, count in counts.items()
        for index in range(count)
    ]
    write_images(root, relpaths, seed=seed)
    return relpaths
