"""Per-token arrays on the wire: raw little-endian bytes, decoded without a copy.

Inside msgpack (`messages.encode`), or each in its own ZeroMQ frame on the trajectory channel
(`messages.encode_parts`: a large array then lands in its own malloc'd, aligned, buffer; small frames
may share ZeroMQ's receive buffer at any offset). `np.frombuffer` over
the received bytes gives a read-only view; nothing is parsed element by element.
"""

import numpy as np

__all__ = ["TOKEN_DTYPE", "MASK_DTYPE", "LOGP_DTYPE", "VERSION_DTYPE", "to_bytes", "view"]

TOKEN_DTYPE = np.dtype("<u4")
MASK_DTYPE = np.dtype("u1")
LOGP_DTYPE = np.dtype("<f4")
VERSION_DTYPE = np.dtype("<i4")


def to_bytes(values, dtype: np.dtype) -> bytes:
    """Little-endian bytes of `values` as `dtype` (a copy only if the input is not already that)."""
    return np.ascontiguousarray(values, dtype=dtype).tobytes()


def view(buf: bytes, dtype: np.dtype) -> np.ndarray:
    """A zero-copy, read-only array over `buf`; the caller has checked that the length divides."""
    return np.frombuffer(buf, dtype=dtype)
