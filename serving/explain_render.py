"""PNGs of explanations: a heatmap over the image, and feature maps as a grid. Pillow and numpy only."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

OVERLAY_SCALE = 8  # 32x32 -> 256x256
OVERLAY_OPACITY = 0.5  # of the heatmap's colour over the image, everywhere
TILE_MIN_PIXELS = 32  # each feature map is enlarged (nearest) to at least this side
TILE_GAP = 1
GAP_COLOUR = (40, 40, 40)


def colour_map(anchors: list[tuple[int, int, int]]) -> np.ndarray:
    """[256, 3] uint8: the anchor colours, evenly spaced from 0 to 1, linearly interpolated."""
    points = np.array(anchors, dtype=np.float64)
    steps = np.linspace(0, 1, len(points))
    return np.stack([np.interp(np.linspace(0, 1, 256), steps, points[:, c]) for c in range(3)], axis=1).astype(np.uint8)


# Feature maps: inferno-like, dark (0) through purple and red to pale yellow (1).
FEATURE_COLOURS = colour_map([(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99),
                              (212, 72, 66), (245, 125, 21), (250, 193, 39), (252, 255, 164)])
# Heatmaps: turbo-like, the usual saliency convention: dark blue (0), cyan, yellow, dark red (1).
HEAT_COLOURS = colour_map([(48, 18, 59), (70, 134, 251), (27, 229, 181), (164, 252, 60),
                           (251, 185, 56), (228, 76, 13), (122, 4, 3)])


def colourise(values: np.ndarray, colours: np.ndarray = FEATURE_COLOURS) -> np.ndarray:
    """float values in [0, 1], any shape -> uint8 RGB of that shape + (3,)."""
    return colours[np.clip(np.rint(values * 255), 0, 255).astype(np.intp)]


def png_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def overlay(pixels: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """The image (uint8 [32, 32, 3]) upscaled x8 (nearest: its real pixels), the heatmap
    ([32, 32] in [0, 1]) upscaled x8 (bilinear), coloured and blended over it."""
    size = (pixels.shape[1] * OVERLAY_SCALE, pixels.shape[0] * OVERLAY_SCALE)
    image = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.NEAREST), dtype=np.float64)
    heat = np.asarray(Image.fromarray(heatmap.astype(np.float32)).resize(size, Image.Resampling.BILINEAR))
    colours = colourise(np.clip(heat, 0.0, 1.0), HEAT_COLOURS)
    return np.rint(image * (1 - OVERLAY_OPACITY) + colours * OVERLAY_OPACITY).astype(np.uint8)


def overlay_png(pixels: np.ndarray, heatmap: np.ndarray) -> bytes:
    return png_bytes(overlay(pixels, heatmap))


def feature_grid(values: np.ndarray) -> np.ndarray:
    """Feature maps [H, W, C] -> one RGB image: a tile per channel, row-major, each channel
    scaled to its own range (a constant channel is dark)."""
    height, width, channels = values.shape
    low = values.min(axis=(0, 1), keepdims=True)
    span = values.max(axis=(0, 1), keepdims=True) - low
    scaled = np.where(span > 0, (values - low) / np.where(span > 0, span, 1), 0.0)
    scale = max(1, math.ceil(TILE_MIN_PIXELS / max(height, width)))
    tiles = colourise(scaled.transpose(2, 0, 1)).repeat(scale, axis=1).repeat(scale, axis=2)  # [C, h, w, 3]
    columns = math.ceil(math.sqrt(channels))
    rows = math.ceil(channels / columns)
    tile_h, tile_w = height * scale, width * scale
    grid = np.empty((rows * (tile_h + TILE_GAP) - TILE_GAP, columns * (tile_w + TILE_GAP) - TILE_GAP, 3), np.uint8)
    grid[:] = GAP_COLOUR
    for index, tile in enumerate(tiles):
        top, left = (index // columns) * (tile_h + TILE_GAP), (index % columns) * (tile_w + TILE_GAP)
        grid[top:top + tile_h, left:left + tile_w] = tile
    return grid


def feature_grid_png(values: np.ndarray) -> bytes:
    return png_bytes(feature_grid(values))
