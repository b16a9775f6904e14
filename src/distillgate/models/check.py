"""Validation of weight files before anything reads them into a model (issue 15: trust nothing on disk).

A ``.safetensors`` file is 8 bytes of little-endian header length N, N bytes of JSON header
(``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}``), then the data buffer.
:func:`check_safetensors` checks all of it without trusting any number in it: N against the file size and a
cap, the JSON, every dtype and shape, that the tensors tile the buffer exactly (no gap, overlap or truncation)
and that the float tensors hold no NaN/inf (a bit test on the exponent, so bf16 and fp8 work without numpy
support for them). Files up to :data:`FULL_SCAN_BYTES` are scanned whole, larger ones by a strided sample of
:data:`SAMPLE_ELEMENTS` elements per tensor. Memory: a view of one chunk at a time (the file is mmapped).

Errors are :class:`~distillgate.errors.InputError` naming the file, the tensor and what is wrong.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import InputError

MAX_HEADER_BYTES = 100 << 20        # safetensors' own limit
FULL_SCAN_BYTES = 2 << 30           # files up to 2 GiB are scanned whole (~0.3 s for SmolLM2's 540 MB here)
SAMPLE_ELEMENTS = 1 << 22           # larger files: this many elements per tensor, evenly strided
_CHUNK = 1 << 24                    # elements per finiteness test (64 MB of fp32)
# dtype -> (bytes per element, exponent mask for NaN/inf or None for non-float types)
DTYPES = {"F64": (8, 0x7FF0000000000000), "F32": (4, 0x7F800000), "F16": (2, 0x7C00), "BF16": (2, 0x7F80),
          "F8_E5M2": (1, 0x7C), "F8_E4M3": (1, None), "I64": (8, None), "I32": (4, None), "I16": (2, None),
          "I8": (1, None), "U64": (8, None), "U32": (4, None), "U16": (2, None), "U8": (1, None),
          "BOOL": (1, None)}
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def read_header(path: str | os.PathLike) -> tuple[dict, int, int]:
    """(header dict without ``__metadata__``, data start offset, data length) after checking the framing."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{path}: not a safetensors file ({size} bytes; the 8-byte header length is missing)")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise InputError(f"{path}: safetensors header length {n} exceeds "
                                 f"{'the file' if n > size - 8 else 'the 100 MB limit'} ({size} bytes): not a "
                                 f"safetensors file, or truncated")
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"{path}: unreadable ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: the safetensors header is not UTF-8 JSON ({type(e).__name__}: {e})"[:400]) from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: the safetensors header is a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                                for k, v in meta.items())):
        raise InputError(f"{path}: safetensors __metadata__ must map strings to strings")
    return header, 8 + n, size - 8 - n


def _check_entries(path: Path, header: dict, data_len: int) -> list[tuple[str, str, tuple, int, int]]:
    spans = []
    for name, e in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(e, dict) or set(e) - {"dtype", "shape", "data_offsets"} or len(e) != 3:
            raise InputError(f"{where}: entry must be {{dtype, shape, data_offsets}}, got {str(e)[:80]}")
        dt, shape, off = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dt, str) or dt not in DTYPES:
            raise InputError(f"{where}: unknown dtype {dt!r} (one of {sorted(DTYPES)})")
        if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 1 << 48 for d in shape)
                and len(shape) <= 8):
            raise InputError(f"{where}: shape {str(shape)[:80]} is not a list of at most 8 sizes >= 0")
        if not (isinstance(off, list) and len(off) == 2 and all(type(o) is int for o in off) and 0 <= off[0] <= off[1]):
            raise InputError(f"{where}: data_offsets {str(off)[:80]} are not [begin, end] with 0 <= begin <= end")
        numel = int(np.prod(shape, dtype=object)) if shape else 1
        if numel * DTYPES[dt][0] != off[1] - off[0]:
            raise InputError(f"{where}: shape {shape} of {dt} needs {numel * DTYPES[dt][0]} bytes, data_offsets "
                             f"give {off[1] - off[0]}")
        spans.append((name, dt, tuple(shape), off[0], off[1]))
    spans.sort(key=lambda s: (s[3], s[4]))
    at = 0
    for name, _, _, a, b in spans:
        if a != at:
            raise InputError(f"{path}: tensor {name!r} starts at byte {a} of the data, expected {at} "
                             f"({'overlap' if a < at else 'gap'} in data_offsets)")
        at = b
    if at != data_len:
        raise InputError(f"{path}: the tensors cover {at} bytes but the data holds {data_len} "
                         f"({'truncated' if at > data_len else 'trailing bytes'})")
    return spans


def check_safetensors(path: str | os.PathLike, finite: bool = True) -> int:
    """Validate one safetensors file (see the module docstring); returns the number of tensors."""
    path = Path(path)
    header, start, data_len = read_header(path)
    spans = _check_entries(path, header, data_len)
    if not finite or not spans:
        return len(spans)
    full = data_len <= FULL_SCAN_BYTES
    for name, dt, shape, a, b in spans:
        width, mask = DTYPES[dt]
        if mask is None or a == b:
            continue
        n = (b - a) // width
        arr = np.memmap(path, dtype=_UINT[width], mode="r", offset=start + a, shape=(n,))
        if not full and n > SAMPLE_ELEMENTS:
            arr = arr[:: n // SAMPLE_ELEMENTS]
        m = _UINT[width](mask)
        for c in range(0, len(arr), _CHUNK):
            part = arr[c:c + _CHUNK]
            bad = int(np.count_nonzero((part & m) == m))
            if bad:
                raise InputError(f"{path}: tensor {name!r} {list(shape)} ({dt}) holds NaN/inf values "
                                 f"({bad} in elements {c}..{c + len(part) - 1}"
                                 f"{'' if full else ' of a strided sample'}); refusing non-finite weights")
        del arr
    return len(spans)


def check_weight_folder(path: str | os.PathLike, finite: bool = True) -> list[Path]:
    """Validate every ``*.safetensors`` file of a model folder (and its shard index, if any); returns them."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            wanted = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{index}: unreadable shard index ({type(e).__name__}: {e})"[:400]) from None
        missing = sorted(w for w in wanted if not (path / str(w)).is_file())
        if missing:
            raise InputError(f"{index}: names shard(s) {missing[:3]} that are not in the folder")
    if not files and (path / "config.json").is_file() and any(path.glob("*.bin")):
        raise InputError(f"{path}: only pickle weights (*.bin); distillgate loads safetensors only")
    for f in files:
        check_safetensors(f, finite=finite)
    return files
