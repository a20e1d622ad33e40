"""How a test image is brought to the model's input size: open_clip's three resize modes.

- "shortest": the shorter side resized to the input size, then a centre crop (OpenAI CLIP,
  OpenCLIP, transformers' CLIPImageProcessor; Dassl's own test transform does exactly this);
- "squash": the whole image resized to the input size, its aspect ratio not kept (SigLIP,
  transformers' SiglipImageProcessor and BlipImageProcessor);
- "longest": the longer side resized to the input size (aspect ratio kept), the rest padded
  with black around the centred image (open_clip's "longest" with its default fill).

`ResizeToInput` does "squash" and "longest" on PIL images with PIL's own resampling, the call
torchvision's Resize makes on a PIL image, so its output is what open_clip's own transform gives.
Only PIL is needed here (trainers/config.py reads RESIZE_MODES).
"""

from PIL import Image

RESIZE_MODES = ("shortest", "squash", "longest")
# torchvision / Dassl interpolation names (INPUT.INTERPOLATION) as PIL resampling filters.
_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


class ResizeToInput:
    """PIL image -> a PIL image of exactly `size` (height, width), by `mode` "squash" or "longest"
    (see the module docstring), resampled with `interpolation` ("bicubic", "bilinear", "nearest")."""

    def __init__(self, mode, size, interpolation="bicubic"):
        if mode not in ("squash", "longest"):
            raise ValueError(f"ResizeToInput resizes by 'squash' or 'longest', not {mode!r}")
        self.mode = mode
        self.height, self.width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.interpolation = interpolation
        self.resampling = _RESAMPLING[interpolation]

    def __call__(self, image):
        if self.mode == "squash":
            return self._resized(image, self.width, self.height)
        width, height = image.size
        ratio = max(height / self.height, width / self.width)  # open_clip's rounding of the kept-ratio size
        resized = self._resized(image, round(width / ratio), round(height / ratio))
        if resized.size == (self.width, self.height):
            return resized
        canvas = Image.new(resized.mode, (self.width, self.height))
        canvas.paste(resized, ((self.width - resized.width) // 2, (self.height - resized.height) // 2))
        return canvas

    def _resized(self, image, width, height):
        if image.size == (width, height):
            return image
        return image.resize((width, height), self.resampling)

    def __repr__(self):
        return f"ResizeToInput(mode={self.mode!r}, size=({self.height}, {self.width}), interpolation={self.interpolation!r})"

    def __str__(self):  # what the trainer logs when it applies this to the test images
        if self.mode == "squash":
            return (f"Resizing each test image to {self.height}x{self.width} without keeping its aspect ratio "
                    f"(INPUT.RESIZE_MODE squash, {self.interpolation})")
        return (f"Resizing the longer side of each test image to {max(self.height, self.width)} px and padding it "
                f"to {self.height}x{self.width} (INPUT.RESIZE_MODE longest, {self.interpolation})")


def evaluation_resize(mode, size, interpolation):
    """The transform a test image goes through before Dassl's test transform for INPUT.RESIZE_MODE
    `mode`, or None for "shortest", which Dassl's own resize and centre crop do. After it the image
    has the input size, so Dassl's resize and centre crop leave it as it is."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    return None if mode == "shortest" else ResizeToInput(mode, size, interpolation)


def prepare_evaluation_images(val_loader, test_loader, input_cfg, test_pre_transform=None):
    """Put in front of each evaluation loader's transform what brings its images to INPUT.SIZE the
    backbone's way (INPUT.RESIZE_MODE), after what a test set does first (`test_pre_transform`, e.g.
    ObjectNet's frame cut off). Returns the steps put there, for the log."""
    from torchvision.transforms import Compose  # here: trainers/config.py imports this module for RESIZE_MODES

    resize = evaluation_resize(input_cfg.RESIZE_MODE, input_cfg.SIZE, input_cfg.INTERPOLATION)
    for loader, steps in ((val_loader, [resize]), (test_loader, [test_pre_transform, resize])):
        steps = [step for step in steps if step is not None]
        if loader is not None and steps:
            loader.dataset.transform = Compose([*steps, loader.dataset.transform])
    return [step for step in (test_pre_transform, resize) if step is not None]
