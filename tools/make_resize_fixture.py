"""Expected outputs of Pillow's bicubic resize for tests/pillow_resize.rs.

    python3 -m venv /tmp/pil13 && /tmp/pil13/bin/pip install Pillow==13.0.0 numpy safetensors
    /tmp/pil13/bin/python tools/make_resize_fixture.py tests/fixtures/resize

Inputs are not stored: every input image is noise from a counter-based generator (splitmix64 of
seed * 2^32 + byte index, top byte) that the Rust test reproduces; the manifest keeps each
input's FNV-1a 64 so the two generators cannot drift apart silently. Expected outputs are stored
as uint8 HWC arrays, or, for outputs larger than 64x64, as one FNV-1a 64 per output row (still
bit-exact, and the fixture stays small).

Pillow 13 picks the order of its two passes from the sizes, so per case the manifest also records
which explicit order (horizontal pass first or vertical pass first, each as two resize calls) gives
Pillow's own result; the grid is checked to contain cases of both.
"""
import json
import sys
from pathlib import Path

import numpy as np
import PIL
from PIL import Image
from safetensors.numpy import save_file

MASK = (1 << 64) - 1
FULL_PIXELS_MAX = 64 * 64


def noise(seed, w, h):
    i = np.arange(w * h * 3, dtype=np.uint64)
    z = np.uint64((seed << 32) & MASK) + i + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(56)).astype(np.uint8).reshape(h, w, 3)


def fnv1a64_rows(a):
    """FNV-1a 64 of each row's bytes (a: [rows, n] uint8), vectorised over rows."""
    h = np.full(a.shape[0], 0xCBF29CE484222325, dtype=np.uint64)
    for col in a.T.astype(np.uint64):
        h = (h ^ col) * np.uint64(0x100000001B3)
    return h


def fnv1a64(a):
    return int(fnv1a64_rows(a.reshape(1, -1))[0])


def order_evidence(src, out):
    """Which explicit two-call order reproduces `src.resize(out)`."""
    (iw, ih), (ow, oh) = src.size, out
    ref = np.asarray(src.resize(out, Image.BICUBIC))
    if ow == iw or oh == ih:
        return ref, "single_pass"
    hf = np.array_equal(ref, np.asarray(src.resize((ow, ih), Image.BICUBIC).resize(out, Image.BICUBIC)))
    vf = np.array_equal(ref, np.asarray(src.resize((iw, oh), Image.BICUBIC).resize(out, Image.BICUBIC)))
    return ref, {(True, True): "both", (True, False): "horizontal_first", (False, True): "vertical_first"}.get(
        (hf, vf), "neither"
    )


def cases():
    # The table: eval transform, square outputs.
    table = [((52, 91), 64), ((63, 65), 64), ((333, 500), 384), ((200, 1000), 384), ((200, 1000), 64),
             ((333, 500), 64), ((1000, 200), 64)]
    for size in [(70, 50), (120, 40), (100, 34), (41, 63), (128, 96), (500, 333), (300, 300), (500, 500)]:
        table += [(size, 64), (size, 384)]
    for (w, h), r in table:
        yield f"table_{w}x{h}_to_{r}", (w, h), None, (r, r)
    # Grid: each output side halved, one less, equal, one more, enlarged 1.6x, for a portrait, a
    # landscape and a square input: every sign of in - out per side, and equal sides.
    for w, h in [(16, 28), (28, 16), (21, 21)]:
        for ow in [w // 2, w - 1, w, w + 1, w * 8 // 5]:
            for oh in [h // 2, h - 1, h, h + 1, h * 8 // 5]:
                yield f"grid_{w}x{h}_to_{ow}x{oh}", (w, h), None, (ow, oh)
    # The rule's boundary: in_h - out_h == 2 * (in_w - out_w), and one past it either way.
    for (w, h), (ow, oh) in [((40, 50), (35, 40)), ((40, 51), (35, 40)), ((40, 50), (36, 40)),
                             ((20, 21), (30, 20)), ((30, 31), (29, 29))]:
        yield f"edge_{w}x{h}_to_{ow}x{oh}", (w, h), None, (ow, oh)
    # torchvision RandomResizedCrop on a PIL image: F.resized_crop = img.crop(box), then
    # img.resize(size, BICUBIC) on the cropped copy. Crop is (left, top, width, height).
    for (w, h), (left, top, cw, ch), r in [
        ((160, 120), (10, 5, 50, 90), 64), ((160, 120), (3, 20, 90, 50), 64), ((160, 120), (30, 10, 80, 70), 64),
        ((160, 120), (5, 0, 70, 100), 64), ((160, 120), (0, 0, 100, 80), 64), ((160, 120), (47, 13, 66, 90), 64),
        ((160, 120), (20, 30, 128, 90), 96), ((160, 120), (1, 2, 150, 110), 96),
        ((333, 500), (0, 60, 333, 400), 384), ((333, 500), (101, 7, 120, 110), 384),
    ]:
        yield f"crop_{w}x{h}_{left}_{top}_{cw}x{ch}_to_{r}", (w, h), (left, top, cw, ch), (r, r)


def main(out_dir):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, manifest_cases = {}, []
    for seed, (name, (w, h), crop, out) in enumerate(cases(), start=1):
        a = noise(seed, w, h)
        src = Image.fromarray(a, "RGB")
        if crop is not None:
            left, top, cw, ch = crop
            src = src.crop((left, top, left + cw, top + ch))
        ref, evidence = order_evidence(src, out)
        assert ref.shape == (out[1], out[0], 3), (name, ref.shape)
        if out[0] * out[1] <= FULL_PIXELS_MAX:
            tensors[name] = np.ascontiguousarray(ref)
            stored = "pixels"
        else:
            tensors[name] = fnv1a64_rows(ref.reshape(out[1], -1))
            stored = "row_fnv1a64"
        manifest_cases.append({
            "name": name, "seed": seed, "input": [w, h], "crop": list(crop) if crop else None, "output": list(out),
            "input_fnv1a64": f"{fnv1a64(a):016x}", "stored": stored, "pillow_matches": evidence,
        })
    grid = [c["pillow_matches"] for c in manifest_cases if not c["name"].startswith("table_")]
    assert "horizontal_first" in grid and "vertical_first" in grid, grid
    assert "neither" not in grid + [c["pillow_matches"] for c in manifest_cases], "an order matched nothing"
    save_file(tensors, str(out_dir / "expected.safetensors"))
    manifest = {
        "generator": "tools/make_resize_fixture.py",
        "versions": {"pillow": PIL.__version__, "numpy": np.__version__, "python": sys.version.split()[0]},
        "call": "Image.fromarray(noise, 'RGB')[.crop((left, top, left + w, top + h))].resize((out_w, out_h), "
                "Image.BICUBIC)",
        "input_noise": "byte i of the HWC input = top byte of splitmix64(seed * 2^32 + i)",
        "cases": manifest_cases,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    counts = {}
    for c in manifest_cases:
        counts[c["pillow_matches"]] = counts.get(c["pillow_matches"], 0) + 1
    print(f"{len(manifest_cases)} cases, Pillow {PIL.__version__}: {counts}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/resize")
