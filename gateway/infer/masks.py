"""A model's label mask as bytes for the spool, and back.

Format: ``GWMASK1\\n`` + one JSON line ``{"shape": [X, Y, Z], "dtype": "uint8"}`` + zlib of
the array's C-order bytes.  Masks are mostly zeros, so a 512x512x120 mask (31 MB) takes a
few hundred kB.  Values are labels (0 = background), as the model's ``outputs.labels``.
"""

from __future__ import annotations

import json
import zlib

import numpy as np

MAGIC = b"GWMASK1\n"


def encode_mask(mask: np.ndarray) -> bytes:
    array = np.ascontiguousarray(mask, dtype=np.uint8)
    header = json.dumps({"shape": list(array.shape), "dtype": "uint8"}).encode() + b"\n"
    return MAGIC + header + zlib.compress(array.tobytes(), 1)


def decode_mask(data: bytes) -> np.ndarray:
    if not data.startswith(MAGIC):
        raise ValueError("not a gateway mask (bad magic)")
    header, _, body = data[len(MAGIC) :].partition(b"\n")
    meta = json.loads(header)
    if meta.get("dtype") != "uint8":
        raise ValueError(f"unsupported mask dtype {meta.get('dtype')!r}")
    shape = tuple(int(s) for s in meta["shape"])
    array = np.frombuffer(zlib.decompress(body), dtype=np.uint8)
    if array.size != int(np.prod(shape)):
        raise ValueError("mask size does not match its shape")
    return array.reshape(shape)
