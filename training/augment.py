"""Training-time augmentation of uint8 NHWC batches, in numpy only (tests import it without Keras).

Each function draws from the generator it is given, in a fixed order, so a seeded batch is the
same batch on every run and after `--resume`.
"""

from __future__ import annotations

import numpy as np

PAD = 4  # pixels of reflect padding around each image by default; a crop moves by up to 2 * pad


def pad_for_crops(images: np.ndarray, pad: int = PAD) -> np.ndarray:
    return np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")


def crop_and_flip(padded: np.ndarray, rng: np.random.Generator, size: int = 32, flip: bool = True) -> np.ndarray:
    """A random size x size crop of each padded image, then (with `flip`) a horizontal flip of
    half of them, drawn at random."""
    count = len(padded)
    dy, dx = rng.integers(0, padded.shape[1] - size + 1, size=(2, count))
    rows = dy[:, None] + np.arange(size)[None, :]
    cols = dx[:, None] + np.arange(size)[None, :]
    x = padded[np.arange(count)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if flip:
        flipped = rng.random(count) < 0.5
        x[flipped] = x[flipped, :, ::-1]
    return x


def alternating_flips(count: int, epoch: int, seed: int) -> np.ndarray:
    """Which of `count` images to mirror in `epoch`: a seeded random half in epoch 0, then each
    image the other way round from the epoch before (airbench's alternating flip). Every image
    is seen both ways in any two consecutive epochs, which random flips only do on average."""
    first = np.random.default_rng(seed).random(count) < 0.5
    return first ^ bool(epoch % 2)


def flip(x: np.ndarray, which: np.ndarray) -> np.ndarray:
    """Mirror the images `which` selects, in place."""
    x[which] = x[which, :, ::-1]
    return x


def cut_out(x: np.ndarray, side: int, fill: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """DeVries & Taylor's cutout, in place: a side x side square at a random centre (clipped at
    the border) of each image takes the colour `fill` (the mean colour: zero after normalising)."""
    height, width = x.shape[1:3]
    cy = rng.integers(0, height, size=len(x))
    cx = rng.integers(0, width, size=len(x))
    before, after = side // 2, side - side // 2
    rows = np.arange(height)[None, :]
    cols = np.arange(width)[None, :]
    in_rows = (rows >= (cy - before)[:, None]) & (rows < (cy + after)[:, None])
    in_cols = (cols >= (cx - before)[:, None]) & (cols < (cx + after)[:, None])
    x[in_rows[:, :, None] & in_cols[:, None, :]] = fill
    return x
