"""What the client accepts as an image, and the `Image` message each form becomes.

Files and bytes travel encoded, as they are: the server decodes PNG, JPEG, BMP and GIF and
resizes to 32x32 (docs/api.md), so the client never decodes or re-encodes. Arrays travel as raw
pixels (uint8) or as a float tensor (values in [0, 1]); a PIL image as its RGB pixels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import numpy as np

from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb

# A path (str or os.PathLike), encoded bytes, a uint8 (or float in [0, 1]) array [H, W], [H, W, C]
# or [1, H, W, C], a PIL image, or an Image message.
ImageLike = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, pb.Image, Any]


def array_message(pixels: np.ndarray) -> pb.Image:
    if pixels.ndim == 4 and pixels.shape[0] == 1:
        pixels = pixels[0]
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3, 4):
        raise ValueError(f"an image array is [height, width] or [height, width, 1|3|4], not {list(pixels.shape)}")
    height, width, channels = pixels.shape
    if pixels.dtype == np.uint8:
        return pb.Image(raw=pb.RawPixels(data=np.ascontiguousarray(pixels).tobytes(), height=height, width=width,
                                         channels=channels))
    if np.issubdtype(pixels.dtype, np.floating):
        return pb.Image(tensor=pb.FloatTensor(data=pixels.astype(np.float32).ravel(), shape=[height, width, channels],
                                              layout=pb.LAYOUT_NHWC))
    raise ValueError(f"an image array is uint8 (0..255) or float (0..1), not {pixels.dtype}")


def image_message(image: ImageLike) -> pb.Image:
    """The Image message for one image; OSError for a file that cannot be read, ValueError or
    TypeError for something that is no image."""
    if isinstance(image, pb.Image):
        return image
    if isinstance(image, (bytes, bytearray, memoryview)):
        return pb.Image(encoded=bytes(image))
    if isinstance(image, (str, os.PathLike)):
        return pb.Image(encoded=Path(image).read_bytes())
    if isinstance(image, np.ndarray):
        return array_message(image)
    if type(image).__module__.startswith("PIL."):  # Pillow is optional here: no import unless one is passed
        return array_message(np.asarray(image.convert("RGB")))
    raise TypeError(f"not an image: {type(image).__name__} (give a path, encoded bytes, an array or a PIL image)")
