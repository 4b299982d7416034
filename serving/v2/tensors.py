"""Open Inference Protocol tensors <-> the model's uint8 image batch. No gRPC, no protos here.

Accepted input (one tensor, named like the model's input):
- `UINT8` `[N, 32, 32, 3]`: the model's own input, passed through untouched.
- `FP32` `[N, 32, 32, 3]`: pixels scaled to [0, 1]; multiplied by 255 and rounded to uint8
  (the same rule as the native API's float tensors). Values outside [0, 1], NaN or infinity
  are refused: a 0..255 float image would otherwise be silently wrong.
- `BYTES` `[N]` or `[N, 1]`: each element an encoded image (PNG, JPEG, BMP, GIF), decoded and
  resized by the same decoder as Classify.
Raw contents are little-endian and row-major; raw BYTES elements carry a 4-byte
little-endian length prefix each. Every conversion is vectorised (np.frombuffer), never a
Python loop per element.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from serving import images as imaging
from serving.errors import InvalidInput

UINT8, FP32, BYTES, BOOL = "UINT8", "FP32", "BYTES", "BOOL"
IMAGE_SHAPE = (imaging.MODEL_SIZE, imaging.MODEL_SIZE, 3)
PIXELS_PER_IMAGE = int(np.prod(IMAGE_SHAPE))
# Little-endian on the wire whatever the host is.
WIRE_DTYPES = {UINT8: np.dtype("u1"), FP32: np.dtype("<f4"), BOOL: np.dtype("?")}
# The typed-contents field that carries each datatype (for messages that name it).
CONTENTS_FIELD = {UINT8: "uint_contents", FP32: "fp32_contents", BYTES: "bytes_contents"}
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class InputTensor:
    """One request input: either `raw` bytes or `values` (the typed contents) is set."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes | None = None
    values: Sequence | None = None

    @property
    def payload_bytes(self) -> int:
        if self.raw is not None:
            return len(self.raw)
        values = self.values or ()
        return sum(map(len, values)) if self.datatype == BYTES else 4 * len(values)


def batch_size(tensor: InputTensor, max_images: int) -> int:
    """N from the shape, checked against the datatype's layout and the per-request limit."""
    shape = list(tensor.shape)
    if tensor.datatype == BYTES:
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise InvalidInput(
                f"input '{tensor.name}': BYTES shape {shape} is not [N] or [N, 1] (one encoded image per element)",
                reason="bad_shape",
            )
    elif tensor.datatype in WIRE_DTYPES:
        if len(shape) != 4 or tuple(shape[1:]) != IMAGE_SHAPE:
            raise InvalidInput(
                f"input '{tensor.name}': shape {shape} does not match the model's [-1, 32, 32, 3] "
                "(N images, 32x32, RGB channels last)",
                reason="bad_shape",
            )
    else:
        raise InvalidInput(
            f"input '{tensor.name}': datatype {tensor.datatype!r} is not accepted; send UINT8 pixels "
            "[N, 32, 32, 3], FP32 pixels in [0, 1] [N, 32, 32, 3], or BYTES encoded images [N]",
            reason="bad_datatype",
        )
    count = shape[0]
    if count < 1:
        raise InvalidInput(f"input '{tensor.name}': batch of {count} images, expected at least 1", reason="empty_batch")
    if count > max_images:
        raise InvalidInput(
            f"input '{tensor.name}': batch of {count} images is over the limit of {max_images} "
            "(--max-images-per-request)",
            reason="batch_too_large",
        )
    return count


def to_pixels(tensor: InputTensor, max_images: int, max_pixels: int) -> np.ndarray:
    """The model's input: uint8 [N, 32, 32, 3]. Raises InvalidInput naming the tensor."""
    count = batch_size(tensor, max_images)
    if tensor.datatype == BYTES:
        return _decode_images(tensor, count, max_pixels)
    values = _numeric_values(tensor, count)
    if tensor.datatype == FP32:
        values = _fp32_to_uint8(tensor.name, values)
    elif values.dtype != np.uint8:  # typed UINT8 arrives as uint32
        if values.size and int(values.max()) > 255:
            raise InvalidInput(
                f"input '{tensor.name}': UINT8 values must lie in 0..255, got {int(values.max())}",
                reason="out_of_range",
            )
        values = values.astype(np.uint8)
    return values.reshape(count, *IMAGE_SHAPE)


def _numeric_values(tensor: InputTensor, count: int) -> np.ndarray:
    dtype = WIRE_DTYPES[tensor.datatype]
    expected = count * PIXELS_PER_IMAGE
    if tensor.raw is not None:
        if len(tensor.raw) != expected * dtype.itemsize:
            raise InvalidInput(
                f"input '{tensor.name}': raw_input_contents holds {len(tensor.raw)} bytes, expected "
                f"{expected * dtype.itemsize} for {tensor.datatype} {list(tensor.shape)} "
                f"({expected} elements x {dtype.itemsize} bytes)",
                reason="bad_length",
            )
        return np.frombuffer(tensor.raw, dtype=dtype)
    values = tensor.values if tensor.values is not None else ()
    if len(values) != expected:
        raise InvalidInput(
            f"input '{tensor.name}': contents.{CONTENTS_FIELD[tensor.datatype]} holds {len(values)} values, "
            f"expected {expected} for {tensor.datatype} {list(tensor.shape)}",
            reason="bad_length",
        )
    return np.asarray(values, dtype=np.float32 if tensor.datatype == FP32 else np.uint32)


def _fp32_to_uint8(name: str, values: np.ndarray) -> np.ndarray:
    if not np.isfinite(values).all():
        raise InvalidInput(f"input '{name}': FP32 values contain NaN or infinity", reason="non_finite")
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise InvalidInput(
            f"input '{name}': FP32 values span [{low:g}, {high:g}], expected pixels scaled to [0, 1] "
            "(divide 0..255 by 255, or send UINT8)",
            reason="out_of_range",
        )
    return np.rint(values * np.float32(255.0)).astype(np.uint8)


def _decode_images(tensor: InputTensor, count: int, max_pixels: int) -> np.ndarray:
    elements = split_bytes(tensor.name, tensor.raw) if tensor.raw is not None else list(tensor.values or ())
    if len(elements) != count:
        raise InvalidInput(
            f"input '{tensor.name}': {len(elements)} BYTES elements, expected {count} for shape {list(tensor.shape)}",
            reason="bad_length",
        )
    pixels = np.empty((count, *IMAGE_SHAPE), dtype=np.uint8)
    for index, data in enumerate(elements):
        try:
            pixels[index] = imaging.decode_encoded(bytes(data), max_pixels)
        except InvalidInput as exc:
            raise InvalidInput(f"input '{tensor.name}' element {index}: {exc.message}", reason=exc.reason) from None
    return pixels


def split_bytes(name: str, raw: bytes) -> list[memoryview]:
    """Raw BYTES tensor -> its elements (each prefixed by a 4-byte little-endian length)."""
    view, offset, elements = memoryview(raw), 0, []
    while offset < len(view):
        if offset + _LENGTH.size > len(view):
            raise InvalidInput(
                f"input '{name}': raw BYTES contents end inside a length prefix at byte {offset}",
                reason="bad_length",
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        if offset + length > len(view):
            raise InvalidInput(
                f"input '{name}': raw BYTES element {len(elements)} says {length} bytes but only "
                f"{len(view) - offset} remain (each element is a 4-byte little-endian length, then the bytes)",
                reason="bad_length",
            )
        elements.append(view[offset:offset + length])
        offset += length
    return elements


def join_bytes(elements: Sequence[bytes]) -> bytes:
    """Elements -> a raw BYTES tensor (the inverse of split_bytes)."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def raw_bytes(values: np.ndarray, datatype: str) -> bytes:
    """A numeric or BOOL output as raw_output_contents (BOOL: one byte per element, 0 or 1)."""
    return np.ascontiguousarray(values, dtype=WIRE_DTYPES[datatype]).tobytes()


def classification_entry(probability: float, class_index: int, label: str) -> bytes:
    """Triton's classification extension: "score:index:label", score printed like C's %f."""
    return f"{probability:f}:{class_index}:{label}".encode()
