"""Real model weights for the codec benchmark, stdlib only: the float32 initializers of ONNX files
(read with a minimal protobuf reader), converted to bf16 (round to nearest even, as torch's
`.to(torch.bfloat16)` does) and fp16 (struct's IEEE half, also round to nearest even).

ONNX layout used (onnx.proto3): ModelProto.graph = field 7; GraphProto.initializer = field 5
(TensorProto); TensorProto: data_type = field 2 (1 = FLOAT), float_data = field 4 (packed),
raw_data = field 9 (little-endian bytes).
"""

from __future__ import annotations

import array
import struct
import sys
from collections.abc import Iterator


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of one protobuf message; length-delimited values as memoryview."""
    view, pos = memoryview(buf), 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = view[pos : pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = view[pos : pos + n], pos + n
        elif wire == 5:
            value, pos = view[pos : pos + 4], pos + 4
        else:
            raise ValueError("unsupported wire type %d" % wire)
        yield field, wire, value


def _tensor_float32(tensor: bytes) -> bytes:
    dtype, raw, floats = 0, b"", b""
    for field, _, value in _fields(tensor):
        if field == 2:
            dtype = int(value)  # type: ignore[call-overload]
        elif field == 9:
            raw = bytes(value)  # type: ignore[call-overload]
        elif field == 4:
            floats = bytes(value)  # type: ignore[call-overload]
    return (raw or floats) if dtype == 1 else b""


def onnx_float32(path: str) -> bytes:
    """All FLOAT weights of an ONNX model, concatenated (little-endian float32): the initializers
    (GraphProto field 5) and the tensors of Constant nodes (GraphProto.node = field 1; NodeProto
    op_type = field 4, attribute = field 5; AttributeProto.t = field 5), where paddle2onnx puts them."""
    out: list[bytes] = []
    for field, _, graph in _fields(open(path, "rb").read()):
        if field != 7:
            continue
        for gfield, _, item in _fields(bytes(graph)):  # type: ignore[call-overload]
            if gfield == 5:
                out.append(_tensor_float32(bytes(item)))  # type: ignore[call-overload]
            elif gfield == 1:
                node = list(_fields(bytes(item)))  # type: ignore[call-overload]
                if any(f == 4 and bytes(v) == b"Constant" for f, _, v in node):  # type: ignore[call-overload]
                    for f, _, attr in node:
                        if f == 5:
                            for af, _, av in _fields(bytes(attr)):  # type: ignore[call-overload]
                                if af == 5:
                                    out.append(_tensor_float32(bytes(av)))  # type: ignore[call-overload]
    return b"".join(out)


def to_bf16(f32: bytes) -> bytes:
    words = array.array("I", f32)
    if sys.byteorder != "little":
        words.byteswap()
    halves = array.array("H", (((w + 0x7FFF + ((w >> 16) & 1)) >> 16) & 0xFFFF for w in words))
    return halves.tobytes()


def to_fp16(f32: bytes) -> bytes:
    values = array.array("f", f32)
    out = bytearray()
    for i in range(0, len(values), 65536):
        chunk = values[i : i + 65536]
        clipped = [min(max(v, -65504.0), 65504.0) for v in chunk]
        out += struct.pack("<%de" % len(clipped), *clipped)
    return bytes(out)
