"""Property-based tests of request decoding: whatever arrives, the answer is a 32x32x3 uint8 array
or an InvalidInput with a message, never another exception (which would be an INTERNAL error).

They call serving/images.py and the servicer's image_to_array in-process, on hypothesis inputs:
arbitrary bytes, valid files with bytes flipped or cut off, crafted headers, any raw shapes and
any floats. The atheris target (fuzz/fuzz_images.py, `make fuzz`) explores the decoder further.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from serving.errors import InvalidInput
from serving.images import decode_encoded, from_float_tensor, from_raw_pixels
from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb
from serving.servicer import image_to_array

MAX_PIXELS = 512 * 512  # small, so that a crafted header cannot make one example slow
UINT32 = st.one_of(st.integers(0, 70), st.integers(0, 2**32 - 1))
ENCODINGS = [("PNG", "RGB"), ("PNG", "L"), ("PNG", "RGBA"), ("PNG", "P"), ("PNG", "I;16"), ("PNG", "1"),
             ("PNG", "LA"), ("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("BMP", "RGB"), ("GIF", "P")]
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_decoded_or_refused(decode, *args) -> None:
    try:
        array = decode(*args)
    except InvalidInput as exc:
        assert exc.message and exc.reason, "an InvalidInput must say what was wrong"
        return
    assert isinstance(array, np.ndarray)
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8


def encoded_file(fmt: str, mode: str, width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    image = image.convert("L").convert("I;16") if mode == "I;16" else image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@st.composite
def valid_files(draw) -> bytes:
    fmt, mode = draw(st.sampled_from(ENCODINGS))
    return encoded_file(fmt, mode, draw(st.integers(1, 80)), draw(st.integers(1, 80)), draw(st.integers(0, 2**16)))


@st.composite
def damaged_files(draw) -> bytes:
    """A valid file with some bytes overwritten, then possibly cut short."""
    data = bytearray(draw(valid_files()))
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[:draw(st.integers(1, len(data)))])


@st.composite
def crafted_pngs(draw) -> bytes:
    """A PNG whose IHDR says anything (size, bit depth, colour type) over a little zlib data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", draw(UINT32), draw(UINT32), draw(st.sampled_from([1, 2, 4, 8, 16, 3, 0])),
                         draw(st.sampled_from([0, 2, 3, 4, 6, 1, 7])), 0, 0, draw(st.integers(0, 2)))
    body = zlib.compress(draw(st.binary(max_size=512)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


@given(data=st.binary(max_size=4096))
@PROPERTY
def test_any_bytes_decode_to_a_model_input_or_invalid_input(data):
    assert_decoded_or_refused(decode_encoded, data, MAX_PIXELS)


@given(data=damaged_files())
@PROPERTY
def test_damaged_image_files_decode_to_a_model_input_or_invalid_input(data):
    assert_decoded_or_refused(decode_encoded, data, MAX_PIXELS)


@given(data=crafted_pngs())
@PROPERTY
def test_pngs_with_any_header_decode_to_a_model_input_or_invalid_input(data):
    assert_decoded_or_refused(decode_encoded, data, MAX_PIXELS)


@given(data=valid_files())
@PROPERTY
def test_valid_files_of_any_size_and_mode_always_decode(data):
    array = decode_encoded(data, MAX_PIXELS)
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8


@given(data=st.binary(max_size=20_000), height=UINT32, width=UINT32, channels=UINT32)
@PROPERTY
def test_raw_pixels_of_any_shape_give_a_model_input_or_invalid_input(data, height, width, channels):
    assert_decoded_or_refused(from_raw_pixels, data, height, width, channels, MAX_PIXELS)


@st.composite
def matching_raw(draw) -> tuple[bytes, int, int, int]:
    """Raw pixels whose length matches their shape: the path past the checks."""
    height, width, channels = draw(st.integers(1, 64)), draw(st.integers(1, 64)), draw(st.sampled_from([1, 3, 4]))
    return draw(st.binary(min_size=height * width * channels, max_size=height * width * channels)), height, width, channels


@given(raw=matching_raw())
@PROPERTY
def test_raw_pixels_with_a_consistent_shape_always_decode(raw):
    array = from_raw_pixels(*raw, MAX_PIXELS)
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8


ANY_FLOAT = st.floats(width=32, allow_nan=True, allow_infinity=True)
UNIT_FLOAT = st.floats(0.0, 1.0, width=32)


@given(values=st.lists(ANY_FLOAT, max_size=300), shape=st.lists(UINT32, max_size=5),
       layout=st.sampled_from(["NHWC", "NCHW"]))
@PROPERTY
def test_float_tensors_of_any_shape_and_values_give_a_model_input_or_invalid_input(values, shape, layout):
    assert_decoded_or_refused(from_float_tensor, values, shape, layout, MAX_PIXELS)


@st.composite
def matching_tensors(draw, element=ANY_FLOAT) -> tuple[list[float], list[int], str]:
    height, width, channels = draw(st.integers(1, 12)), draw(st.integers(1, 12)), draw(st.sampled_from([1, 3, 4]))
    layout = draw(st.sampled_from(["NHWC", "NCHW"]))
    shape = [height, width, channels] if layout == "NHWC" else [channels, height, width]
    if draw(st.booleans()):
        shape = [1, *shape]
    count = height * width * channels
    return draw(st.lists(element, min_size=count, max_size=count)), shape, layout


@given(tensor=matching_tensors())
@PROPERTY
def test_float_tensors_with_a_consistent_shape_give_a_model_input_or_invalid_input(tensor):
    assert_decoded_or_refused(from_float_tensor, *tensor, MAX_PIXELS)


@given(tensor=matching_tensors(UNIT_FLOAT))
@PROPERTY
def test_float_tensors_in_the_unit_range_always_decode(tensor):
    array = from_float_tensor(*tensor, MAX_PIXELS)
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8


@st.composite
def any_image_message(draw) -> pb.Image:
    """Every oneof case of the Image message, filled with anything the wire can carry."""
    kind = draw(st.sampled_from(["encoded", "raw", "tensor", "none"]))
    if kind == "encoded":
        return pb.Image(encoded=draw(st.one_of(st.binary(max_size=2048), damaged_files())))
    if kind == "raw":
        return pb.Image(raw=pb.RawPixels(data=draw(st.binary(max_size=5000)), height=draw(UINT32),
                                         width=draw(UINT32), channels=draw(UINT32)))
    if kind == "tensor":
        values, shape, layout = draw(st.one_of(
            matching_tensors(), st.tuples(st.lists(ANY_FLOAT, max_size=200), st.lists(UINT32, max_size=5),
                                          st.sampled_from(["NHWC", "NCHW"]))))
        return pb.Image(tensor=pb.FloatTensor(
            data=values, shape=shape, layout=pb.LAYOUT_NCHW if layout == "NCHW" else pb.LAYOUT_NHWC))
    return pb.Image()


@given(image=any_image_message())
@PROPERTY
def test_any_image_message_gives_a_model_input_or_invalid_input(image):
    assert_decoded_or_refused(image_to_array, image, MAX_PIXELS)

