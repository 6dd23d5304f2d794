"""Image preprocessing shared by training and evaluation, so both feed the vision tower the same pixels.

`image_aspect_ratio` (LLaVA's setting):
  pad     expand to a square filled with the image processor's mean colour, then the processor (LLaVA-1.5's
          choice: nothing is cropped away);
  resize  stretch to the processor's output size, ignoring the aspect ratio (nothing cropped, shapes distorted);
  native  the processor alone (CLIP: shortest side to size, centre crop: the borders of wide images are lost).
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

ASPECT_RATIOS = ("pad", "resize", "native")


def expand_to_square(img: Image.Image, background_rgb: tuple[int, int, int]) -> Image.Image:
    """Paste `img` centred on a square canvas of its longer side (LLaVA's expand2square)."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    canvas = Image.new(img.mode, (side, side), background_rgb)
    canvas.paste(img, ((side - width) // 2, (side - height) // 2))
    return canvas


def mean_color(image_processor) -> tuple[int, int, int]:
    """The processor's normalisation mean as 0-255 RGB: padding of this colour normalises to zero."""
    return tuple(int(round(x * 255)) for x in image_processor.image_mean)


def output_size(image_processor) -> tuple[int, int]:
    """(width, height) of the processor's pixel_values: its crop size when it crops, else its resize size."""
    size = getattr(image_processor, "crop_size", None) if getattr(image_processor, "do_center_crop", False) else None
    size = size or image_processor.size
    get = size.get if isinstance(size, dict) else (lambda k, d=None: getattr(size, k, d))
    height, width = get("height"), get("width")
    if height is None or width is None:
        edge = get("shortest_edge")
        if edge is None:
            raise ValueError(f"cannot tell the output size of {type(image_processor).__name__} (size={size})")
        height = width = edge
    return int(width), int(height)


def process_images(images: Sequence[Image.Image], image_processor, aspect_ratio: str = "pad") -> torch.Tensor:
    """RGB PIL images -> pixel_values (N, C, H, W) for the vision tower."""
    if aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"image_aspect_ratio must be one of {ASPECT_RATIOS}, got {aspect_ratio!r}")
    images = [img.convert("RGB") for img in images]
    if aspect_ratio == "pad":
        background = mean_color(image_processor)
        images = [expand_to_square(img, background) for img in images]
    elif aspect_ratio == "resize":
        size = output_size(image_processor)
        images = [img.resize(size, Image.BICUBIC) for img in images]
    return image_processor(images=images, return_tensors="pt")["pixel_values"]


def image_token_count(processor, pixel_values: torch.Tensor) -> int:
    """How many <image> tokens one image of these pixel_values becomes in HF LLaVA's input ids.

    The same rule as transformers' LlavaProcessor: one per patch, plus the tower's extra tokens (CLIP's CLS),
    minus the CLS again when the "default" feature strategy drops it.
    """
    height, width = pixel_values.shape[-2:]
    count = (height // processor.patch_size) * (width // processor.patch_size)
    count += getattr(processor, "num_additional_image_tokens", 0) or 0
    if getattr(processor, "vision_feature_select_strategy", None) == "default":
        count -= 1
    return count
