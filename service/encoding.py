"""Answer bodies: orjson straight from numpy arrays, and .npy files built with one copy."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import orjson
from fastapi.responses import Response

NPY = "application/x-npy"
PNG = "image/png"
MIN_TILE_PIXELS = 64
"""Images in a PNG grid are upscaled (nearest neighbour) to at least this many pixels a side, so
an 8 x 8 digit is visible."""


def wants_npy(accept: str | None) -> bool:
    return accept is not None and NPY in accept


def wants_png(accept: str | None) -> bool:
    return accept is not None and PNG in accept


def is_image_shape(shape: tuple[int, ...]) -> bool:
    """(H, W), (1, H, W) or (3, H, W): what a PNG grid can show."""
    return len(shape) == 2 or (len(shape) == 3 and shape[0] in (1, 3))


def png_grid(
    images: np.ndarray, data_range: tuple[float, float] | None, columns: int | None = None
) -> bytes:
    """One PNG of images (n, H, W), (n, 1, H, W) or (n, 3, H, W) in a grid of `columns` (default
    about the square root of n), values mapped from `data_range` (default the images' own
    range) to 0-255 and clipped, each upscaled to at least MIN_TILE_PIXELS a side."""
    from PIL import Image  # Pillow, imported only when a PNG is asked for

    if images.ndim == 3:
        images = images[:, None]
    count, channels, height, width = images.shape
    low, high = data_range if data_range is not None else (float(images.min()), float(images.max()))
    scaled = (images.astype(np.float64) - low) / max(high - low, 1e-12)
    pixels = np.clip(np.rint(scaled * 255), 0, 255).astype(np.uint8)
    pixels = pixels.transpose(0, 2, 3, 1)  # (n, H, W, C)
    if channels == 1:
        pixels = np.repeat(pixels, 3, axis=3)
    zoom = max(1, math.ceil(MIN_TILE_PIXELS / max(height, width)))
    pixels = pixels.repeat(zoom, axis=1).repeat(zoom, axis=2)
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    gap = 2
    tile_h, tile_w = height * zoom, width * zoom
    canvas = np.full(
        (rows * (tile_h + gap) + gap, columns * (tile_w + gap) + gap, 3), 255, dtype=np.uint8
    )
    for i in range(count):
        top = gap + (i // columns) * (tile_h + gap)
        left = gap + (i % columns) * (tile_w + gap)
        canvas[top : top + tile_h, left : left + tile_w] = pixels[i]
    out = io.BytesIO()
    Image.fromarray(canvas).save(out, format="PNG")
    return out.getvalue()


def _contiguous(value: Any) -> Any:
    # orjson serialises only C-contiguous arrays natively; column slices come here once.
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def json_response(
    body: dict[str, Any], headers: dict[str, str] | None = None, status: int = 200
) -> Response:
    content = orjson.dumps(body, default=_contiguous, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(content, status_code=status, media_type="application/json", headers=headers)


def npy_bytes(array: np.ndarray) -> memoryview:
    """The .npy file of a float32 array: header and data written into one buffer."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    head = header.getvalue()
    buffer = bytearray(len(head) + array.nbytes)
    buffer[: len(head)] = head
    np.frombuffer(buffer, dtype=np.float32, offset=len(head))[:] = array.reshape(-1)
    return memoryview(buffer)


def npy_response(array: np.ndarray, headers: dict[str, str] | None = None) -> Response:
    return Response(npy_bytes(array), media_type=NPY, headers=headers)
