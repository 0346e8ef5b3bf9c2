"""Write a full-size ALBEF pre-training checkpoint (ViT-B/16 + bert-base, their momentum copies,
the ITC queues; `{'model': state_dict}` with ALBEF.pth's key names, image_res 256) filled with
random values, for memory and speed measurements. Standard library only: the pickle names
torch's rebuild functions through stand-in modules, so no torch is needed to write it, and the
file reads back with torch.load. Big (about 840 MB shared, 1.7 GB not): keep it out of the repo.

    python3 tools/make_full_pth.py /tmp/albef_full.pth            # momentum shares storage
    python3 tools/make_full_pth.py /tmp/albef_full.pth --separate # as the released ALBEF.pth

`--shared` (default) stores every momentum tensor as a view of its online twin's storage, as a
checkpoint saved right after `copy_params()` may; `--separate` writes each in its own storage.
"""
import argparse
import array
import collections
import io
import pickle
import random
import sys
import types
import zipfile

# Stand-ins for torch's pickled globals: pickle resolves a global by importing its module.
torch = types.ModuleType("torch")
torch_utils = types.ModuleType("torch._utils")


def _rebuild_tensor_v2(*args):  # never called: only its name is pickled
    raise NotImplementedError


_rebuild_tensor_v2.__module__ = "torch._utils"
torch_utils._rebuild_tensor_v2 = _rebuild_tensor_v2


class FloatStorage:
    pass


class LongStorage:
    pass


for cls in (FloatStorage, LongStorage):
    cls.__module__ = "torch"
    setattr(torch, cls.__name__, cls)
torch._utils = torch_utils
sys.modules.setdefault("torch", torch)
sys.modules.setdefault("torch._utils", torch_utils)

HIDDEN, INTER, VOCAB, LAYERS, FUSION, VIT_DEPTH, EMBED, QUEUE = 768, 3072, 30522, 12, 6, 12, 256, 65536


def student_shapes(image_res):
    """(name, shape, init) of the online model, in ALBEF_pretrain's state_dict order."""
    out = []
    add = lambda name, shape, init="w": out.append((name, shape, init))
    tokens = (image_res // 16) ** 2 + 1
    ve = "visual_encoder"
    add(f"{ve}.cls_token", (1, 1, HIDDEN))
    add(f"{ve}.pos_embed", (1, tokens, HIDDEN))
    add(f"{ve}.patch_embed.proj.weight", (HIDDEN, 3, 16, 16))
    add(f"{ve}.patch_embed.proj.bias", (HIDDEN,), "0")
    for b in range(VIT_DEPTH):
        p = f"{ve}.blocks.{b}"
        add(f"{p}.norm1.weight", (HIDDEN,), "1")
        add(f"{p}.norm1.bias", (HIDDEN,), "0")
        add(f"{p}.attn.qkv.weight", (3 * HIDDEN, HIDDEN))
        add(f"{p}.attn.qkv.bias", (3 * HIDDEN,), "0")
        add(f"{p}.attn.proj.weight", (HIDDEN, HIDDEN))
        add(f"{p}.attn.proj.bias", (HIDDEN,), "0")
        add(f"{p}.norm2.weight", (HIDDEN,), "1")
        add(f"{p}.norm2.bias", (HIDDEN,), "0")
        add(f"{p}.mlp.fc1.weight", (INTER, HIDDEN))
        add(f"{p}.mlp.fc1.bias", (INTER,), "0")
        add(f"{p}.mlp.fc2.weight", (HIDDEN, INTER))
        add(f"{p}.mlp.fc2.bias", (HIDDEN,), "0")
    add(f"{ve}.norm.weight", (HIDDEN,), "1")
    add(f"{ve}.norm.bias", (HIDDEN,), "0")
    te = "text_encoder.bert"
    add(f"{te}.embeddings.position_ids", (1, 512), "pos")
    add(f"{te}.embeddings.word_embeddings.weight", (VOCAB, HIDDEN))
    add(f"{te}.embeddings.position_embeddings.weight", (512, HIDDEN))
    add(f"{te}.embeddings.token_type_embeddings.weight", (2, HIDDEN))
    add(f"{te}.embeddings.LayerNorm.weight", (HIDDEN,), "1")
    add(f"{te}.embeddings.LayerNorm.bias", (HIDDEN,), "0")
    for n in range(LAYERS):
        p = f"{te}.encoder.layer.{n}"
        blocks = ["attention"] + (["crossattention"] if n >= FUSION else [])
        for a in blocks:
            for qkv in ("query", "key", "value"):
                add(f"{p}.{a}.self.{qkv}.weight", (HIDDEN, HIDDEN))
                add(f"{p}.{a}.self.{qkv}.bias", (HIDDEN,), "0")
            add(f"{p}.{a}.output.dense.weight", (HIDDEN, HIDDEN))
            add(f"{p}.{a}.output.dense.bias", (HIDDEN,), "0")
            add(f"{p}.{a}.output.LayerNorm.weight", (HIDDEN,), "1")
            add(f"{p}.{a}.output.LayerNorm.bias", (HIDDEN,), "0")
        add(f"{p}.intermediate.dense.weight", (INTER, HIDDEN))
        add(f"{p}.intermediate.dense.bias", (INTER,), "0")
        add(f"{p}.output.dense.weight", (HIDDEN, INTER))
        add(f"{p}.output.dense.bias", (HIDDEN,), "0")
        add(f"{p}.output.LayerNorm.weight", (HIDDEN,), "1")
        add(f"{p}.output.LayerNorm.bias", (HIDDEN,), "0")
    cp = "text_encoder.cls.predictions"
    add(f"{cp}.bias", (VOCAB,), "0")
    add(f"{cp}.transform.dense.weight", (HIDDEN, HIDDEN))
    add(f"{cp}.transform.dense.bias", (HIDDEN,), "0")
    add(f"{cp}.transform.LayerNorm.weight", (HIDDEN,), "1")
    add(f"{cp}.transform.LayerNorm.bias", (HIDDEN,), "0")
    # Tied to the word embeddings (and the bias to predictions.bias): one storage in torch.save.
    add(f"{cp}.decoder.weight", (VOCAB, HIDDEN), f"tie:{te}.embeddings.word_embeddings.weight")
    add(f"{cp}.decoder.bias", (VOCAB,), f"tie:{cp}.bias")
    add("vision_proj.weight", (EMBED, HIDDEN))
    add("vision_proj.bias", (EMBED,), "0")
    add("text_proj.weight", (EMBED, HIDDEN))
    add("text_proj.bias", (EMBED,), "0")
    add("itm_head.weight", (2, HIDDEN))
    add("itm_head.bias", (2,), "0")
    return out


MOMENTUM_HEADS = ("visual_encoder", "text_encoder", "vision_proj", "text_proj")


class Storage:
    """A storage to be written as archive/data/<key>, with its dtype and element count."""

    def __init__(self, key, cls, numel):
        self.key, self.cls, self.numel = key, cls, numel


class TensorRef:
    """Pickles as torch._utils._rebuild_tensor_v2(storage, 0, shape, stride, False, OrderedDict())."""

    def __init__(self, storage, shape):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.insert(0, acc)
            acc *= d
        return (_rebuild_tensor_v2, (self.storage, 0, tuple(self.shape), tuple(stride), False, collections.OrderedDict()))


class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.cls, obj.key, "cpu", obj.numel)
        return None


def values(init, numel, rng, block):
    if init == "1":
        return array.array("f", [1.0]) * numel
    if init == "0":
        return array.array("f", [0.0]) * numel
    if init == "pos":
        return array.array("q", range(numel))
    # Normal(0, 0.02) values: a random window of a precomputed block, repeated (fast, no NaNs).
    start = rng.randrange(len(block))
    out = array.array("f")
    while len(out) < numel:
        take = min(numel - len(out), len(block) - start)
        out.extend(block[start : start + take])
        start = 0
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--separate", action="store_true", help="momentum tensors in their own storages")
    ap.add_argument("--image-res", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    block = array.array("f", (rng.gauss(0.0, 0.02) for _ in range(1 << 20)))
    if sys.byteorder != "little":
        sys.exit("this writer assumes a little-endian machine (torch's storage byte order)")

    storages, tensors, data = [], collections.OrderedDict(), {}

    def new_storage(cls, vals):
        s = Storage(str(len(storages)), cls, len(vals))
        storages.append(s)
        data[s.key] = vals
        return s

    student = student_shapes(a.image_res)
    by_name = {}
    for name, shape, init in student:
        numel = 1
        for d in shape:
            numel *= d
        if init.startswith("tie:"):
            tensors[name] = TensorRef(by_name[init[4:]], shape)
            continue
        cls = LongStorage if init == "pos" else FloatStorage
        s = new_storage(cls, values(init, numel, rng, block))
        by_name[name] = s
        tensors[name] = TensorRef(s, shape)
    momentum_storage = {}  # student storage key -> the teacher's (ties stay ties)
    for name, shape, _ in student:
        head, rest = name.split(".", 1)
        if head not in MOMENTUM_HEADS:
            continue
        src = tensors[name].storage
        if src.key not in momentum_storage:
            momentum_storage[src.key] = new_storage(src.cls, data[src.key]) if a.separate else src
        tensors[f"{head}_m.{rest}"] = TensorRef(momentum_storage[src.key], shape)
    for q in ("image_queue", "text_queue"):
        vals = values("w", EMBED * QUEUE, rng, block)
        tensors[q] = TensorRef(new_storage(FloatStorage, vals), (EMBED, QUEUE))
    tensors["queue_ptr"] = TensorRef(new_storage(LongStorage, array.array("q", [0])), (1,))
    tensors["temp"] = TensorRef(new_storage(FloatStorage, array.array("f", [0.07])), ())

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"model": tensors})
    with zipfile.ZipFile(a.out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        for s in storages:
            with z.open(f"archive/data/{s.key}", "w", force_zip64=True) as f:
                f.write(data[s.key].tobytes())
        z.writestr("archive/version", "3\n")
    total = sum(len(v) * v.itemsize for v in data.values())
    print(f"{a.out}: {len(tensors)} tensors in {len(storages)} storages, {total / 1e6:.0f} MB of data")


if __name__ == "__main__":
    main()
