"""Out-of-distribution image sets, built offline from numpy (and Pillow for text): what the
trust scores are chosen and checked against. Never served, never trained on.

Two kinds, as callers meet them:
- synthetic images that are not photographs of anything: noise, blank frames, gradients,
  stripes, smooth blobs, text on a plain background (a screenshot's look);
- CIFAR images transformed until they no longer show their object: pixels shuffled, 8x8
  patches shuffled, blurred to a few colour blobs, buried under noise.

Each family is seeded; `DEVELOPMENT` families choose the method, `HELD_OUT` ones only check
that the choice carries over to sets it was not chosen on (the hidden evaluation's situation).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Family = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]
SIZE = 32


def _uniform_noise(cifar: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=(count, SIZE, SIZE, 3), dtype=np.uint8)


def _gaussian_noise(cifar: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    centre = rng.uniform(60, 200, size=(count, 1, 1, 3))
    spread = rng.uniform(20, 80, size=(count, 1, 1, 1))
    return np.clip(rng.normal(centre, spread, size=(count, SIZE, SIZE, 3)), 0, 255).astype(np.uint8)


def _blank(cifar: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    colours = rng.integers(0, 256, size=(count, 1, 1, 3))
    return np.broadcast_to(colours, (count, SIZE, SIZE, 3)).astype(np.uint8)


def _gradient(cifar: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi, size=(count, 1, 1))
    y, x = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    t = (np.cos(angle) * x + np.sin(angle) * y)
    t = (t - t.min(axis=(1, 2), keepdims=True)) / np.ptp(t, axis=(1, 2), keepdims=True)
    start, end = rng.integers(0, 256, size=(2, count, 1, 1, 3))
    return (start + (end - start) * t[..., None]).astype(np.uint8)


def _stripes(cifar: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    angle = rng.uniform(0, np.pi, size=(count, 1, 1))
    period = rng.uniform(2, 12, size=(count, 1, 1))
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    wave = np.sin(2 * np.pi * (np.cos(angle) * x + np.sin(angle) * y) / period)
    checker = rng.random(count) < 0.3  # some checkerboards among the stripes
    board = np.sign(np.sin(2 * np.pi * x / period) * np.sin(2 * np.pi * y / period))
    wave = np.where(checker[:, None, None], board, np.sign(wave) if rng.random() < 0.5 else wave)
    a, b = rng.integers(0, 256, size=(2, count, 1, 1, 3))
    return (a + (b - a) * ((wave[..., None] + 1) / 2)).astype(np.uint8)


def _upsample(small: np.ndarray) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(s).resize((SIZE, SIZE), Image.BILINEAR)) for s in small])


def _blobs(cifar: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth random colour fields: noise at 3x3 to 6x6, upsampled."""
    out = []
    for _ in range(count):
        side = int(rng.integers(3, 7))
        out.append(_upsample(rng.integers(0, 256, size=(1, side, side, 3), dtype=np.uint8))[0])
    return np.stack(out)


def _text(cifar: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Characters on a plain background, drawn large then shrunk: what a screenshot of a page
    or a dialog looks like at 32x32."""
    from PIL import Image, ImageDraw

    letters = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;-"))
    out = []
    for _ in range(count):
        background = tuple(int(v) for v in rng.integers(0, 256, size=3))
        ink = tuple(int(v) for v in (255 - np.array(background) + rng.integers(-40, 40, size=3)).clip(0, 255))
        canvas = Image.new("RGB", (128, 128), background)
        draw = ImageDraw.Draw(canvas)
        for line in range(int(rng.integers(3, 9))):
            words = "".join(rng.choice(letters, size=int(rng.integers(8, 22))))
            draw.text((int(rng.integers(0, 12)), 4 + line * 15), words, fill=ink)
        out.append(np.asarray(canvas.resize((SIZE, SIZE), Image.BILINEAR)))
    return np.stack(out)


def _sample(cifar: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    return cifar[rng.choice(len(cifar), size=count, replace=False)].copy()


def _pixel_shuffle(cifar: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    images = _sample(cifar, count, rng).reshape(count, SIZE * SIZE, 3)
    order = np.argsort(rng.random((count, SIZE * SIZE)), axis=1)
    return np.take_along_axis(images, order[..., None], axis=1).reshape(count, SIZE, SIZE, 3)


def _patch_shuffle(cifar: np.ndarray, count: int, rng: np.random.Generator, patch: int = 8) -> np.ndarray:
    images = _sample(cifar, count, rng)
    grid = SIZE // patch
    patches = images.reshape(count, grid, patch, grid, patch, 3).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(count, grid * grid, patch, patch, 3)
    order = np.argsort(rng.random((count, grid * grid)), axis=1)
    patches = np.take_along_axis(patches, order[:, :, None, None, None], axis=1)
    return patches.reshape(count, grid, grid, patch, patch, 3).transpose(0, 1, 3, 2, 4, 5).reshape(images.shape)


def _heavy_blur(cifar: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Down to 4x4 (a box average), back up to 32x32: colour blobs where the object was."""
    images = _sample(cifar, count, rng).astype(np.float32)
    small = images.reshape(count, 4, 8, 4, 8, 3).mean(axis=(2, 4)).round().astype(np.uint8)
    return _upsample(small)


def _buried_in_noise(cifar: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    images = _sample(cifar, count, rng).astype(np.float32)
    noise = rng.integers(0, 256, size=images.shape).astype(np.float32)
    return (0.25 * images + 0.75 * noise).round().astype(np.uint8)


DEVELOPMENT: dict[str, Family] = {
    "uniform_noise": _uniform_noise,
    "blank": _blank,
    "stripes": _stripes,
    "text": _text,
    "pixel_shuffle": _pixel_shuffle,
    "heavy_blur": _heavy_blur,
}
HELD_OUT: dict[str, Family] = {
    "gaussian_noise": _gaussian_noise,
    "gradient": _gradient,
    "blobs": _blobs,
    "patch_shuffle": _patch_shuffle,
    "buried_in_noise": _buried_in_noise,
}


def build(families: dict[str, Family], cifar: np.ndarray, count: int, seed: int) -> dict[str, np.ndarray]:
    """`count` uint8 NHWC images per family; `cifar` is the pool the transformed ones start from
    (validation images: never the test set)."""
    return {name: make(cifar, count, np.random.default_rng([seed, index]))
            for index, (name, make) in enumerate(families.items())}
