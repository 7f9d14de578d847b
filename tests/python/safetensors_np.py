"""Writes (and reads back) safetensors files with numpy alone (the format: an 8-byte little-endian header length, a
JSON header, the tensors' bytes), so that the checkpoint tests need no package beyond numpy."""
import json
import struct

import numpy as np


def bf16_bits(a):
    """float32 values rounded to nearest even bfloat16, as uint16 bits."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def bf16_round(a):
    """float32 values as bfloat16 would store them, back in float32."""
    return (bf16_bits(a).astype(np.uint32) << 16).view(np.float32)


def write(path, tensors, metadata=None):
    """tensors: {name: (dtype, array)} with dtype "F32", "BF16" or "F16" (float values), or "U8"
    (bytes, e.g. MXFP4 blocks and scales)."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, a) in tensors.items():
        a = np.asarray(a, dtype=np.uint8 if dtype == "U8" else np.float32)
        if dtype == "U8":
            raw = a.tobytes()
        elif dtype == "F32":
            raw = a.astype("<f4").tobytes()
        elif dtype == "BF16":
            raw = bf16_bits(a).astype("<u2").tobytes()
        elif dtype == "F16":
            raw = a.astype("<f2").tobytes()
        else:
            raise ValueError(dtype)
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def write_sharded(directory, tensors, shards):
    """The tensors spread round-robin over `shards` files plus model.safetensors.index.json."""
    names = list(tensors)
    files = ["model-%05d-of-%05d.safetensors" % (i + 1, shards) for i in range(shards)]
    weight_map = {n: files[i % shards] for i, n in enumerate(names)}
    for f in files:
        write("%s/%s" % (directory, f), {n: tensors[n] for n in names if weight_map[n] == f})
    with open("%s/model.safetensors.index.json" % directory, "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def read(path):
    """{name: (dtype, float32 array)} of a file of F32/BF16/F16 tensors, and its __metadata__."""
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    out = {}
    for name, h in header.items():
        b0, b1 = h["data_offsets"]
        buf = raw[8 + n + b0 : 8 + n + b1]
        if h["dtype"] == "F32":
            a = np.frombuffer(buf, "<f4").astype(np.float32)
        elif h["dtype"] == "BF16":
            a = (np.frombuffer(buf, "<u2").astype(np.uint32) << 16).view(np.float32)
        elif h["dtype"] == "F16":
            a = np.frombuffer(buf, "<f2").astype(np.float32)
        else:
            raise ValueError(h["dtype"])
        out[name] = (h["dtype"], a.reshape(h["shape"]))
    return out, meta
