"""Image preprocessing shared by training and evaluation, so both feed the vision tower the same pixels.

`image_aspect_ratio` (LLaVA's setting):
  pad     expand to a square filled with the image processor's mean colour, then the processor (LLaVA-1.5's
          choice: nothing is cropped away);
  resize  stretch to the processor's output size, ignoring the aspect ratio (nothing cropped, shapes distorted);
  native  the processor alone (CLIP: shortest side to size, centre crop: the borders of wide images are lost).

Hostile images are bounded here, the one place every image is decoded (training, data_prep, eval): a file whose
header declares more than `max_pixels` pixels is refused before decoding (PIL's DecompressionBombError /
Warning are refused the same way), and no mode builds anything larger than the processor's output before the
processor runs: "pad" first shrinks the image so its long side fits the output size, then pads; "native" first
crops the centre square the processor's centre crop would keep. Both equal LLaVA's order (pad or crop, then
resize) up to resampling at the borders. Paths are confined to the image folder (`resolve_image_path`).
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Sequence

from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:  # records.py (and so data_prep) imports this module: no torch import at start-up
    import torch

from .skips import SkipSample

ASPECT_RATIOS = ("pad", "resize", "native")
# Default decode limit: 40 megapixels (an 8K photo is 33 MP; LLaVA's images are under 1 MP). One RGB image at
# the limit takes 120 MB. PIL's own hard limit (an error above 2 x Image.MAX_IMAGE_PIXELS, 179 MP) still applies
# above it; with max_pixels None, PIL's warning limit (89 MP) refuses too.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000


def resolve_image_path(image: str, image_folder: str | os.PathLike | None, confine: bool = False) -> str:
    """The file a record's `image` names: relative to `image_folder` when one is given.

    confine: the resolved path (symlinks followed) must lie inside `image_folder`, so a record cannot make
    training read `../x.png`, an absolute path or a symlink out of the folder (SkipSample "image_outside_folder").
    """
    if "\0" in image:  # the OS refuses such a path (ValueError from every os call), so it names no file
        raise SkipSample("bad_image_field", f"field 'image' {image[:200]!r} holds a NUL character")
    if image_folder is None:
        return image
    path = os.path.join(image_folder, image)  # an absolute `image` replaces the folder here
    if confine:
        root, real = os.path.realpath(image_folder), os.path.realpath(path)
        if os.path.commonpath([root, real]) != root:
            raise SkipSample("image_outside_folder", f"field 'image' {image!r} resolves to {real}, outside the image "
                           f"folder {root} (allow it with data.allow_images_outside_folder / "
                           "--allow-images-outside-folder)")
    return path


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _to_rgb(img: Image.Image) -> Image.Image:
    """img as 8-bit RGB. PIL's convert("RGB") (LLaVA's call) clips wide grey modes at 255, so a 16-bit PNG comes
    out almost white: those are rescaled first (16-bit, and 32-bit "I" holding 16-bit values: / 257; float "F"
    holding [0, 1]: x 255). Every 8-bit mode, all LLaVA's data, goes straight to convert("RGB")."""
    if img.mode in _SIXTEEN_BIT or img.mode in ("I", "F"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        low, high = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if img.mode in _SIXTEEN_BIT or (img.mode == "I" and low >= 0 and 255 < high <= 65535):
            arr = arr / 257.0
        elif img.mode == "F" and low >= 0 and high <= 1:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))  # 2-D uint8: mode "L"
    return img.convert("RGB")


def load_image(path: str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image fully (truncated files fail here, not later in a worker) and return it as RGB.

    Raises SkipSample (so training and data_prep count it as a bad record) naming the path: missing_image, corrupt_image, or image_too_large (more than `max_pixels`
    pixels declared, checked before any pixel is decoded; None: PIL's limits only).
    """
    if not os.path.isfile(path):
        raise SkipSample("missing_image", f"image file not found: {path}")
    try:
        with warnings.catch_warnings():
            # PIL warns above Image.MAX_IMAGE_PIXELS: with a limit of ours, ours decides; without, PIL's warning does.
            warnings.simplefilter("ignore" if max_pixels is not None else "error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if max_pixels is not None and width * height > max_pixels:
                    raise SkipSample("image_too_large", f"{path}: {width}x{height} = {width * height} pixels > "
                                   f"max_image_pixels {max_pixels} (raise data.max_image_pixels / --max-image-pixels "
                                   "if the image is genuine)")
                img.load()
                return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipSample("image_too_large", f"{path}: {e} (PIL's limit, 2 x PIL.Image.MAX_IMAGE_PIXELS, applies above "
                       f"max_image_pixels {max_pixels})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, SkipSample):
            raise
        raise SkipSample("corrupt_image", f"cannot decode {path}: {e}") from None


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


def shrink_to_fit(img: Image.Image, side: int, resample: int) -> Image.Image:
    """`img` scaled down (aspect kept) so that its long side is at most `side`; unchanged when it already is."""
    width, height = img.size
    long_side = max(width, height)
    if long_side <= side:
        return img
    size = (max(1, round(width * side / long_side)), max(1, round(height * side / long_side)))
    return img.resize(size, resample)


def centre_square(img: Image.Image) -> Image.Image:
    """The centre square of side min(width, height): what a shortest-edge resize plus square centre crop keeps."""
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return img.crop((left, top, left + side, top + side))


def process_images(images: Sequence[Image.Image], image_processor, aspect_ratio: str = "pad") -> torch.Tensor:
    """RGB PIL images -> pixel_values (N, C, H, W) for the vision tower."""
    if aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"image_aspect_ratio must be one of {ASPECT_RATIOS}, got {aspect_ratio!r}")
    images = [img.convert("RGB") for img in images]
    resample = int(getattr(image_processor, "resample", None) or Image.BICUBIC)
    if aspect_ratio == "pad":
        # Shrink first: padding a 20000x1 image would build a 20000x20000 canvas only to resize it away.
        background, side = mean_color(image_processor), max(output_size(image_processor))
        images = [expand_to_square(shrink_to_fit(img, side, resample), background) for img in images]
    elif aspect_ratio == "native" and getattr(image_processor, "do_center_crop", False):
        # The processor would scale the short side up to its size first (a 20000x1 image: 4.5 million x 224).
        crop = output_size(image_processor)
        if crop[0] == crop[1]:
            images = [centre_square(img) for img in images]
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
