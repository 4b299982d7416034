"""Request images -> 32x32 RGB uint8 HWC arrays. No gRPC here.

Three forms: encoded bytes (PNG, JPEG, BMP, GIF first frame), raw uint8 HWC pixels, and
float32 tensors in [0, 1] (NHWC or NCHW). Any size is resized to 32x32 with Pillow's
bilinear filter (antialiased when shrinking); any mode is converted to RGB.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from serving.errors import InvalidInput

MODEL_SIZE = 32
RESIZE_FILTER = Image.Resampling.BILINEAR
RESIZE_FILTER_NAME = "bilinear"
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "GIF")
SERVER_PREPROCESSING = (
    "encoded images are decoded (PNG, JPEG, BMP, GIF first frame), converted to RGB "
    "(alpha dropped, grey and palette expanded, 16-bit scaled to 8-bit) and resized to 32x32 "
    "with the bilinear filter; float tensors in [0, 1] are scaled by 255 and rounded"
)

# Pillow has its own bomb check (a warning, then an error at 2x); ours is stricter and runs
# on the header, before any pixel is decoded.
Image.MAX_IMAGE_PIXELS = None


def decode_encoded(data: bytes, max_pixels: int) -> np.ndarray:
    if not data:
        raise InvalidInput("image bytes are empty: expected a PNG, JPEG, BMP or GIF file", reason="empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a corrupt-EXIF or truncated warning is a bad image
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidInput(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of "
                    f"{max_pixels} (--max-image-pixels); it was not decoded",
                    reason="too_many_pixels",
                )
            image.seek(0)  # GIF/APNG: the first frame
            image.load()
            rgb = _to_rgb(image)
    except InvalidInput:
        raise
    except UnidentifiedImageError:
        raise InvalidInput(
            f"image bytes ({len(data)} bytes) are not a PNG, JPEG, BMP or GIF file", reason="undecodable_image"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError, Warning, Image.DecompressionBombError) as exc:
        raise InvalidInput(
            f"image could not be decoded ({type(exc).__name__}: {exc}); is the file truncated or corrupt?",
            reason="undecodable_image",
        ) from None
    return resize(np.asarray(rgb, dtype=np.uint8), rgb)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: scale to 8-bit, don't clip
        array = np.asarray(image, dtype=np.uint32) >> 8
        image = Image.fromarray(array.astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def resize(array: np.ndarray, image: Image.Image | None = None) -> np.ndarray:
    if array.shape[:2] == (MODEL_SIZE, MODEL_SIZE):
        return array
    image = image if image is not None else Image.fromarray(array)
    return np.asarray(image.resize((MODEL_SIZE, MODEL_SIZE), RESIZE_FILTER), dtype=np.uint8)


def from_raw_pixels(data: bytes, height: int, width: int, channels: int, max_pixels: int) -> np.ndarray:
    if channels not in (1, 3, 4):
        raise InvalidInput(f"raw pixels: channels is {channels}, expected 1, 3 or 4", reason="bad_shape")
    if height < 1 or width < 1:
        raise InvalidInput(f"raw pixels: height and width must be >= 1, got {height}x{width}", reason="bad_shape")
    if height * width > max_pixels:
        raise InvalidInput(
            f"raw pixels: {width}x{height} is over the limit of {max_pixels} pixels (--max-image-pixels)",
            reason="too_many_pixels",
        )
    expected = height * width * channels
    if len(data) != expected:
        raise InvalidInput(
            f"raw pixels: got {len(data)} bytes, expected height*width*channels = "
            f"{height}*{width}*{channels} = {expected} (uint8, HWC)",
            reason="bad_length",
        )
    array = np.frombuffer(data, dtype=np.uint8).reshape(height, width, channels)
    return _channels_to_rgb(array)


def _channels_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 4:
        array = array[:, :, :3]
    return resize(np.ascontiguousarray(array))


def from_float_tensor(values, shape: list[int], layout: str, max_pixels: int) -> np.ndarray:
    """float32 in [0, 1]; layout "NHWC" ([H,W,C]) or "NCHW" ([C,H,W]), optional leading 1."""
    dims = list(shape)
    if len(dims) == 4 and dims[0] == 1:
        dims = dims[1:]
    if len(dims) != 3:
        raise InvalidInput(
            f"float tensor: shape {list(shape)} is not [H, W, C] (NHWC) or [C, H, W] (NCHW), "
            "with an optional leading batch dimension of 1",
            reason="bad_shape",
        )
    channels = dims[2] if layout == "NHWC" else dims[0]
    height, width = (dims[0], dims[1]) if layout == "NHWC" else (dims[1], dims[2])
    if channels not in (1, 3, 4):
        raise InvalidInput(
            f"float tensor: shape {list(shape)} read as {layout} has {channels} channels, expected 1, 3 or 4"
            + ("; is the layout right?" if (dims[0] in (1, 3, 4)) != (dims[2] in (1, 3, 4)) else ""),
            reason="bad_shape",
        )
    if min(height, width) < 1 or height * width > max_pixels:
        raise InvalidInput(f"float tensor: {height}x{width} pixels is empty or over {max_pixels}", reason="too_many_pixels")
    array = np.asarray(values, dtype=np.float32)
    if array.size != height * width * channels:
        raise InvalidInput(
            f"float tensor: {array.size} values for shape {list(shape)}, expected {height * width * channels}",
            reason="bad_length",
        )
    if not np.isfinite(array).all():
        raise InvalidInput("float tensor: contains NaN or infinity", reason="non_finite")
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise InvalidInput(
            f"float tensor: values span [{low:g}, {high:g}], expected [0, 1] (divide 0..255 pixels by 255)",
            reason="out_of_range",
        )
    array = array.reshape(dims)
    if layout == "NCHW":
        array = array.transpose(1, 2, 0)
    pixels = np.rint(array * 255.0).astype(np.uint8)
    return _channels_to_rgb(pixels)
