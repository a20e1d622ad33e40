"""A small synthetic image dataset in CoOp's layout, for the offline CPU demo.

`python -m datasets.synthetic --root DIR` writes DIR/synthetic_shapes/ with one folder of
96x96 JPEGs per class and split_zhou_SyntheticShapes.json, the same layout as DTD or
Food101, so it loads through the same code as the real datasets (Dassl name
`SyntheticShapes`, config configs/datasets/synthetic_shapes.yaml).

Class names are colour + shape phrases a real CLIP recognises ("red circle"). Each colour
and each shape occurs in two or three classes, so neither colour nor shape alone separates
the classes; position, size, rotation, tint and background vary per image. Generation is
deterministic (one seed per image) and skipped when the dataset is already complete.
"""

import argparse
import json
import logging
import math
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

from datasets.specs import SPECS

logger = logging.getLogger(__name__)

SPEC = SPECS["SyntheticShapes"]
IMAGE_SIZE = 96
IMAGES_PER_CLASS = (("train", 20), ("val", 8), ("test", 20))  # 16-shot train, 4-shot val

COLOURS = {
    "red": (215, 35, 35),
    "blue": (35, 75, 215),
    "green": (35, 160, 55),
    "yellow": (235, 205, 30),
    "purple": (135, 55, 175),
}
# Circumradius factors giving the shapes similar areas, so size does not hint at the shape.
SHAPE_SCALE = {"circle": 1.0, "square": 1.25, "triangle": 1.4, "star": 1.45}
CLASSES = (
    ("red", "circle"),
    ("red", "triangle"),
    ("blue", "square"),
    ("blue", "star"),
    ("green", "circle"),
    ("green", "star"),
    ("yellow", "square"),
    ("yellow", "triangle"),
    ("purple", "circle"),
    ("purple", "square"),
)


def class_folder(colour, shape):
    return f"{colour}_{shape}"


def _polygon(shape, centre, radius, angle):
    """Vertices of a triangle, square or five-pointed star."""
    if shape == "star":
        corners = [(radius if k % 2 == 0 else 0.45 * radius, angle + k * math.pi / 5) for k in range(10)]
    else:
        count = 3 if shape == "triangle" else 4
        corners = [(radius, angle + k * 2 * math.pi / count) for k in range(count)]
    return [(centre[0] + r * math.cos(a), centre[1] + r * math.sin(a)) for r, a in corners]


def draw_shape_image(colour, shape, rng, size=IMAGE_SIZE):
    """One image: a tinted shape of random size, position and rotation on a noisy background."""
    background = rng.uniform(70, 235) + rng.normal(0, 12, (size, size, 3)) + rng.uniform(-15, 15, 3)
    image = Image.fromarray(background.clip(0, 255).astype(np.uint8))
    radius = rng.uniform(0.15, 0.3) * size * SHAPE_SCALE[shape]
    centre = rng.uniform(radius, size - radius, 2)
    fill = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + rng.integers(-25, 26, 3), 0, 255))
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse([centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius], fill=fill)
    else:
        draw.polygon(_polygon(shape, centre, radius, rng.uniform(0, 2 * math.pi)), fill=fill)
    return image


def _planned_split(seed):
    """{split: [(relpath, label, classname, per-image seed)]} for every image to write."""
    split = {name: [] for name, _ in IMAGES_PER_CLASS}
    for label, (colour, shape) in enumerate(CLASSES):
        folder = class_folder(colour, shape)
        index = 0
        for split_name, count in IMAGES_PER_CLASS:
            for _ in range(count):
                index += 1
                split[split_name].append((f"{folder}/{folder}_{index:04d}.jpg", label, f"{colour} {shape}", (seed, label, index)))
    return split


def is_complete(root):
    """True when the split file exists and names only existing images."""
    split_path = SPEC.path(root, SPEC.split_file)
    if not os.path.isfile(split_path):
        return False
    with open(split_path, encoding="utf-8") as file:
        split = json.load(file)
    image_dir = SPEC.path(root, SPEC.image_dir)
    return all(os.path.isfile(os.path.join(image_dir, entry[0])) for entries in split.values() for entry in entries)


def generate(root, seed=0, force=False):
    """Write the dataset under root (skipped when complete unless force); returns its folder."""
    dataset_dir = SPEC.dataset_dir(root)
    if not force and is_complete(root):
        logger.info("%s is already complete.", dataset_dir)
        return dataset_dir
    image_dir = SPEC.path(root, SPEC.image_dir)
    planned = _planned_split(seed)
    for entries in planned.values():
        for relpath, _, classname, image_seed in entries:
            path = os.path.join(image_dir, relpath)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            colour, shape = classname.split(" ")
            draw_shape_image(colour, shape, np.random.default_rng(image_seed)).save(path, quality=90)
    split = {name: [list(entry[:3]) for entry in entries] for name, entries in planned.items()}
    # The split file goes last: its presence marks a complete dataset.
    partial = SPEC.path(root, SPEC.split_file + ".partial")
    with open(partial, "w", encoding="utf-8") as file:
        json.dump(split, file, indent=1)
    os.replace(partial, SPEC.path(root, SPEC.split_file))
    logger.info("Wrote %d images to %s", sum(len(e) for e in planned.values()), dataset_dir)
    return dataset_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the synthetic colour-shape dataset in CoOp's layout.")
    parser.add_argument("--root", required=True, help="DATASET.ROOT; the data goes to ROOT/synthetic_shapes/")
    parser.add_argument("--seed", type=int, default=0, help="image seed (default 0)")
    parser.add_argument("--force", action="store_true", help="rewrite even when the dataset is complete")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        dataset_dir = generate(args.root, seed=args.seed, force=args.force)
    except OSError as error:
        print(f"Cannot write the synthetic dataset under {args.root}: {error}", file=sys.stderr)
        return 1
    print(f"{dataset_dir} is ready: use --root {args.root} --dataset-config-file configs/datasets/{SPEC.stem}.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
