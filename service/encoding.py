"""Answer bodies: orjson straight from numpy arrays, and .npy files built with one copy."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import orjson
from fastapi.responses import Response

NPY = "application/x-npy"


def wants_npy(accept: str | None) -> bool:
    return accept is not None and NPY in accept


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
