"""atheris fuzz target for the image decoder: any bytes give a 32x32x3 uint8 array or InvalidInput.

    make fuzz                      # FUZZ_SECONDS=60 by default
    .venv/bin/python fuzz/fuzz_images.py -max_total_time=60 fuzz/corpus

Any other exception (or a crash, or a hang past libFuzzer's -timeout) is a finding: libFuzzer
writes the input to crash-<sha1> and exits non-zero. Seeds for the corpus are written by
`seed_corpus()` (valid PNG/JPEG/BMP/GIF files in every mode the server accepts).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import atheris
import numpy as np

from PIL import Image

from serving.errors import InvalidInput
from serving.images import MODEL_SIZE, decode_encoded

# Pillow loads its format plugins lazily: load them now so that instrumenting covers the parsers.
Image.init()
atheris.instrument_all()

# Small enough that a fuzzed header cannot make one input take seconds; the guard is the same code.
MAX_PIXELS = 256 * 256
EXPECTED_SHAPE = (MODEL_SIZE, MODEL_SIZE, 3)


def check_one_input(data: bytes) -> None:
    try:
        array = decode_encoded(data, MAX_PIXELS)
    except InvalidInput as exc:
        if not exc.message:
            raise AssertionError("InvalidInput without a message") from exc
        return
    if array.shape != EXPECTED_SHAPE or array.dtype != np.uint8:
        raise AssertionError(f"decoded to {array.shape} {array.dtype}, expected {EXPECTED_SHAPE} uint8")


def seed_corpus(directory: Path) -> None:
    """Valid files in every accepted format and mode: mutations of these reach deep into the decoders."""
    directory.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    rgb = Image.fromarray(pixels)
    seeds = {
        "rgb.png": (rgb, "PNG"), "grey.png": (rgb.convert("L"), "PNG"), "rgba.png": (rgb.convert("RGBA"), "PNG"),
        "palette.png": (rgb.convert("P"), "PNG"), "grey16.png": (rgb.convert("L").convert("I;16"), "PNG"),
        "rgb.jpg": (rgb, "JPEG"), "grey.jpg": (rgb.convert("L"), "JPEG"), "rgb.bmp": (rgb, "BMP"),
        "rgb.gif": (rgb, "GIF"),
    }
    for name, (image, fmt) in seeds.items():
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        (directory / name).write_bytes(buffer.getvalue())


def main() -> None:
    corpus = next((Path(a) for a in sys.argv[1:] if not a.startswith("-")), None)
    if corpus is not None and not any(corpus.glob("*")):
        seed_corpus(corpus)
    atheris.Setup(sys.argv, check_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
