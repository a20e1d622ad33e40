"""Image transforms that belong to a dataset rather than to a method."""


class CropBorder:
    """Cut `pixels` from every side of a PIL image (ObjectNet's red frame)."""

    def __init__(self, pixels):
        self.pixels = pixels

    def __call__(self, image):
        width, height = image.size
        return image.crop((self.pixels, self.pixels, width - self.pixels, height - self.pixels))

    def __repr__(self):
        return f"CropBorder(pixels={self.pixels})"

    def __str__(self):  # what the trainer logs when it applies this to the test images
        return f"Cutting {self.pixels} pixels from every side of each test image"
