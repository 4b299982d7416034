"""Bad input: the exact status, a message that says what was wrong, and a server that goes on."""

from __future__ import annotations

import io
import struct
import threading
import zlib

import grpc
import numpy as np
import pytest
from PIL import Image

from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb
from tests.conftest import encode, raw_image

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PIXELS = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries (almost) no pixel data: a decompression bomb."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def float_image(values: np.ndarray, shape, layout=pb.LAYOUT_NHWC) -> pb.Image:
    return pb.Image(tensor=pb.FloatTensor(data=values.ravel().tolist(), shape=shape, layout=layout))


def animated_gif() -> bytes:
    frames = [Image.fromarray(np.full((32, 32, 3), v, dtype=np.uint8)) for v in (10, 200)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


# (case id, request fields, expected status, words the message must contain)
BAD_REQUESTS = [
    ("empty bytes", dict(image=pb.Image(encoded=b"")), INVALID, "empty"),
    ("no image at all", dict(image=pb.Image()), INVALID, "set one of encoded, raw or tensor"),
    ("random bytes", dict(image=pb.Image(encoded=np.random.default_rng(1).bytes(500))), INVALID, "not a PNG, JPEG"),
    ("truncated png", dict(image=pb.Image(encoded=encode(PIXELS)[:60])), INVALID, "truncated or corrupt"),
    ("truncated jpeg", dict(image=pb.Image(encoded=encode(PIXELS, "JPEG")[:200])), INVALID, "truncated or corrupt"),
    ("decompression bomb", dict(image=pb.Image(encoded=png_header_only(50_000, 50_000))), INVALID, "not decoded"),
    ("unsupported format", dict(image=pb.Image(encoded=encode(PIXELS, "TIFF"))), INVALID, "not a PNG, JPEG"),
    ("raw wrong length", dict(image=pb.Image(raw=pb.RawPixels(data=b"\0" * 100, height=32, width=32, channels=3))),
     INVALID, "expected height*width*channels"),
    ("raw bad channels", dict(image=pb.Image(raw=pb.RawPixels(data=b"\0" * 64, height=4, width=8, channels=2))),
     INVALID, "channels is 2"),
    ("raw zero size", dict(image=pb.Image(raw=pb.RawPixels(data=b"", height=0, width=0, channels=3))),
     INVALID, ">= 1"),
    ("float nan", dict(image=float_image(np.full(3072, np.nan, np.float32), [32, 32, 3])), INVALID, "NaN"),
    ("float inf", dict(image=float_image(np.full(3072, np.inf, np.float32), [32, 32, 3])), INVALID, "NaN or infinity"),
    ("float out of range", dict(image=float_image(np.full(3072, 255.0, np.float32), [32, 32, 3])), INVALID, "[0, 1]"),
    ("float wrong layout", dict(image=float_image(np.zeros(3072, np.float32), [3, 32, 32], pb.LAYOUT_NHWC)),
     INVALID, "layout"),
    ("float wrong length", dict(image=float_image(np.zeros(100, np.float32), [32, 32, 3])), INVALID, "expected 3072"),
    ("float bad rank", dict(image=float_image(np.zeros(3072, np.float32), [3072])), INVALID, "[H, W, C]"),
    ("top_k zero", dict(image=raw_image(PIXELS), top_k=0), INVALID, "top_k is 0, expected 1..10"),
    ("top_k negative", dict(image=raw_image(PIXELS), top_k=-3), INVALID, "top_k is -3"),
    ("top_k too big", dict(image=raw_image(PIXELS), top_k=11), INVALID, "top_k is 11"),
    ("unknown model", dict(image=raw_image(PIXELS), model_name="nope"), grpc.StatusCode.NOT_FOUND, "not in the repository"),
    ("unknown version", dict(image=raw_image(PIXELS), model_version=999), grpc.StatusCode.NOT_FOUND, "no version 999"),
    ("negative version", dict(image=raw_image(PIXELS), model_version=-1), INVALID, "model_version"),
    ("unknown version label", dict(image=raw_image(PIXELS), version_label="canary"), grpc.StatusCode.NOT_FOUND,
     "no version label 'canary'"),
    ("version and label", dict(image=raw_image(PIXELS), model_version=1, version_label="stable"), INVALID,
     "version 1 and label 'stable': name one"),
    ("label not valid", dict(image=raw_image(PIXELS), version_label="2b"), INVALID, "version label '2b' is not valid"),
    ("traversal model name", dict(image=raw_image(PIXELS), model_name="../../etc"), INVALID, "not valid"),
    ("model name too long", dict(image=raw_image(PIXELS), model_name="a" * 65), INVALID, "not valid"),
    ("truncated bmp", dict(image=pb.Image(encoded=encode(PIXELS, "BMP")[:100])), INVALID, "truncated or corrupt"),
    ("truncated gif", dict(image=pb.Image(encoded=encode(PIXELS, "GIF")[:900])), INVALID, "truncated or corrupt"),
    ("raw over the pixel limit", dict(image=pb.Image(raw=pb.RawPixels(data=b"\0" * 30, height=50_000, width=50_000,
                                                                      channels=3))), INVALID, "over the limit"),
    ("float over the pixel limit", dict(image=float_image(np.zeros(30, np.float32), [50_000, 50_000, 3])),
     INVALID, "over 16777216"),
    ("float batch of two", dict(image=float_image(np.zeros(6144, np.float32), [2, 32, 32, 3])), INVALID, "[H, W, C]"),
    ("float nchw read as nhwc", dict(image=float_image(np.zeros(3072, np.float32), [32, 32, 3], pb.LAYOUT_NCHW)),
     INVALID, "layout"),
]


@pytest.mark.parametrize("fields,code,words", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_a_clear_status(server, fields, code, words):
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Classify(pb.ClassifyRequest(**fields), timeout=10)
    assert err.value.code() == code
    assert words in err.value.details()
    assert "Traceback" not in err.value.details() and "/work" not in err.value.details()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_unusual_png_modes_are_accepted(server, mode):
    image = Image.fromarray(PIXELS).convert("L").convert("I;16") if mode == "I;16" else Image.fromarray(PIXELS).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert len(server.stub.Classify(pb.ClassifyRequest(image=pb.Image(encoded=buffer.getvalue())), timeout=10).predictions) == 5


def test_animated_gif_uses_the_first_frame(server):
    first = np.full((32, 32, 3), 10, dtype=np.uint8)
    gif = server.stub.Classify(pb.ClassifyRequest(image=pb.Image(encoded=animated_gif()), top_k=10), timeout=10)
    still = server.stub.Classify(pb.ClassifyRequest(image=pb.Image(encoded=encode(first, "GIF")), top_k=10), timeout=10)
    assert [p.class_index for p in gif.predictions] == [p.class_index for p in still.predictions]


def test_too_many_images_in_a_batch_fail_the_call(server):
    request = pb.ClassifyBatchRequest(images=[raw_image(PIXELS)] * 257)
    with pytest.raises(grpc.RpcError) as err:
        server.stub.ClassifyBatch(request, timeout=10)
    assert err.value.code() == INVALID
    assert "--max-images-per-request" in err.value.details()


def test_empty_batch_fails_the_call(server):
    with pytest.raises(grpc.RpcError) as err:
        server.stub.ClassifyBatch(pb.ClassifyBatchRequest(), timeout=10)
    assert err.value.code() == INVALID


def test_message_over_the_size_limit_is_resource_exhausted(start_server):
    small = start_server("--max-message-bytes", "100000")
    with pytest.raises(grpc.RpcError) as err:
        small.stub.Classify(pb.ClassifyRequest(image=pb.Image(encoded=b"\0" * 200_000)), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert small.stub.Classify(pb.ClassifyRequest(image=raw_image(PIXELS)), timeout=10).predictions


def test_after_every_bad_request_the_server_is_healthy_and_counted_each_rejection(start_server):
    fresh = start_server()
    for _, fields, code, _ in BAD_REQUESTS:
        with pytest.raises(grpc.RpcError):
            fresh.stub.Classify(pb.ClassifyRequest(**fields), timeout=10)
    assert fresh.stub.Classify(pb.ClassifyRequest(image=raw_image(PIXELS)), timeout=10).predictions
    assert fresh.metric("classifier_rejected_requests_total") == len(BAD_REQUESTS)
    for reason in ("empty_image", "undecodable_image", "too_many_pixels", "bad_length", "non_finite",
                   "out_of_range", "bad_shape", "bad_top_k", "model_not_found", "bad_model_name",
                   "missing_image", "bad_version"):
        assert fresh.metric("classifier_rejected_requests_total", reason=reason) >= 1, reason
    assert fresh.process.poll() is None


# ---- bytes that are not a message at all --------------------------------------------------

STREAM_METHOD = "/cifar10.classifier.v1.Classifier/ClassifyStream"
CORRUPT_MESSAGE = b"\xff\xff\xff\xff not a protobuf"


def serialized_stream(channel: grpc.Channel, messages, timeout: float = 20):
    """ClassifyStream with requests sent as raw bytes, so that a message can be corrupt on the wire."""
    call = channel.stream_stream(STREAM_METHOD, request_serializer=lambda raw: raw,
                                 response_deserializer=pb.ClassifyStreamResponse.FromString)
    return call(iter(messages), timeout=timeout)


def stream_message(request_id: str) -> bytes:
    return pb.ClassifyRequest(image=raw_image(PIXELS), request_id=request_id).SerializeToString()


def test_a_corrupt_message_mid_stream_is_answered_in_band_and_the_stream_goes_on(server):
    neighbour: list[str] = []

    def other_stream():  # another stream on the same connection, at the same time
        neighbour.extend(r.request_id for r in serialized_stream(server.channel, [stream_message(f"n{i}") for i in range(20)]))

    thread = threading.Thread(target=other_stream)
    thread.start()
    replies = list(serialized_stream(server.channel, [stream_message("before"), CORRUPT_MESSAGE, stream_message("after")]))
    thread.join(30)
    assert neighbour == [f"n{i}" for i in range(20)]
    assert [bool(r.response.predictions) for r in replies] == [True, False, True]
    assert [replies[0].request_id, replies[2].request_id] == ["before", "after"]
    assert replies[1].error.code == INVALID.value[0]
    assert "not a valid cifar10.classifier.v1.ClassifyRequest message" in replies[1].error.message


def corrupt_unary_call(channel: grpc.Channel) -> grpc.RpcError:
    call = channel.unary_unary("/cifar10.classifier.v1.Classifier/Classify", request_serializer=lambda raw: raw,
                               response_deserializer=pb.ClassifyResponse.FromString)
    with pytest.raises(grpc.RpcError) as err:
        call(CORRUPT_MESSAGE, timeout=10)
    return err.value


def test_a_corrupt_unary_request_is_invalid_argument_and_the_server_goes_on(server):
    error = corrupt_unary_call(server.channel)
    assert error.code() == INVALID
    assert "not a valid cifar10.classifier.v1.ClassifyRequest message" in error.details()
    assert "Traceback" not in error.details() and "/work" not in error.details()
    assert server.stub.Classify(pb.ClassifyRequest(image=raw_image(PIXELS)), timeout=10).predictions


def corrupt_unary_code(channel: grpc.Channel) -> grpc.StatusCode:
    return corrupt_unary_call(channel).code()


def corrupt_stream_code(channel: grpc.Channel) -> grpc.StatusCode:
    (reply,) = serialized_stream(channel, [CORRUPT_MESSAGE])
    return next(code for code in grpc.StatusCode if code.value[0] == reply.error.code)


@pytest.mark.parametrize("corrupt_call", [corrupt_unary_code, corrupt_stream_code], ids=["unary", "stream"])
def test_a_corrupt_message_is_counted_as_a_rejection(start_server, corrupt_call):
    fresh = start_server()
    assert corrupt_call(fresh.channel) == INVALID
    assert fresh.metric("classifier_rejected_requests_total") == 1
