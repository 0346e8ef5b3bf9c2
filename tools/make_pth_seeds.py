"""Write small torch.save-style .pth seeds for the `pth` fuzz target (fuzz/seeds/pth/), with the
standard library only: the pickle is made by Python's own pickler (protocol 2, memo opcodes,
persistent ids), with stand-ins for the torch globals, exactly as torch.save lays out its zip.

    python3 tools/make_pth_seeds.py fuzz/seeds/pth
"""
import collections
import io
import os
import pickle
import struct
import sys
import types
import zipfile

# Stand-ins named like the real torch objects, so the pickle names `torch._utils._rebuild_tensor_v2`.
torch = types.ModuleType("torch")
utils = types.ModuleType("torch._utils")
sys.modules["torch"], sys.modules["torch._utils"] = torch, utils


def _rebuild_tensor_v2(*args):
    raise NotImplementedError


_rebuild_tensor_v2.__module__ = "torch._utils"
utils._rebuild_tensor_v2 = _rebuild_tensor_v2
for name in ["FloatStorage", "LongStorage", "HalfStorage", "IntStorage", "BoolStorage"]:
    cls = type(name, (), {"__module__": "torch"})
    setattr(torch, name, cls)


class Storage:
    def __init__(self, kind, key, numel, data):
        self.kind, self.key, self.numel, self.data = kind, key, numel, data


class Tensor:
    def __init__(self, storage, offset, shape):
        self.storage, self.offset, self.shape = storage, offset, shape

    def __reduce__(self):
        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.insert(0, acc)
            acc *= d
        return (_rebuild_tensor_v2, (self.storage, self.offset, tuple(self.shape), tuple(stride), False,
                                     collections.OrderedDict()))


class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", getattr(torch, obj.kind), obj.key, "cpu", obj.numel)
        return None


def write(path, obj, storages):
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        for s in storages:
            z.writestr(f"archive/data/{s.key}", s.data)
        z.writestr("archive/version", "3\n")


def main(out):
    os.makedirs(out, exist_ok=True)
    w = Storage("FloatStorage", "0", 6, struct.pack("<6f", *range(6)))
    ids = Storage("LongStorage", "1", 4, struct.pack("<4q", 0, 1, 2, 3))
    half = Storage("HalfStorage", "2", 2, b"\x00\x3c\x00\x40")
    sd = collections.OrderedDict()
    sd["visual_encoder.pos_embed"] = Tensor(w, 0, [1, 2, 3])
    # Tied weights: a second tensor on the same storage (a memo reference in the pickle).
    sd["visual_encoder_m.pos_embed"] = Tensor(w, 2, [2, 2])
    sd["text_encoder.embeddings.position_ids"] = Tensor(ids, 0, [1, 4])
    sd["temp"] = Tensor(half, 1, [])
    write(os.path.join(out, "torch_wrapped.pth"), {"model": sd, "epoch": 3}, [w, ids, half])
    write(os.path.join(out, "torch_raw.pth"), sd, [w, ids, half])
    # Storage types candle cannot read (albef names the keys instead of skipping them).
    ints = Storage("IntStorage", "3", 2, struct.pack("<2i", 7, 8))
    flags = Storage("BoolStorage", "4", 2, b"\x01\x00")
    odd = collections.OrderedDict(sd)
    odd["idx_queue"] = Tensor(ints, 0, [2])
    odd["mask"] = Tensor(flags, 0, [2])
    write(os.path.join(out, "unreadable_storages.pth"), {"model": odd}, [w, ids, half, ints, flags])


if __name__ == "__main__":
    main(sys.argv[1])
