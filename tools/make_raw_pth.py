"""Derive a raw-state-dict .pth (no {'model': ...} wrapper, the container of the released
fine-tuned files such as mscoco.pth) from a wrapped fixture checkpoint. Standard library only:
the outer dict's opcodes are cut from the pickle stream; tensor storages are copied unchanged.

    python3 tools/make_raw_pth.py tests/fixtures/ve/checkpoint.pth tests/fixtures/ve_raw.pth
"""
import pickletools
import sys
import zipfile


def unwrap(data):
    ops = list(pickletools.genops(data))
    names = [op.name for op, _, _ in ops]
    # PROTO, EMPTY_DICT, BINPUT, BINUNICODE 'model', BINPUT, <inner dict ...>, SETITEM, STOP
    assert names[:5] == ["PROTO", "EMPTY_DICT", "BINPUT", "BINUNICODE", "BINPUT"] and ops[3][1] == "model", names[:5]
    assert names[-2:] == ["SETITEM", "STOP"], names[-2:]
    inner_start, setitem_pos = ops[5][2], ops[-2][2]
    return data[: ops[1][2]] + data[inner_start:setitem_pos] + b"."


def main(src, dst):
    zin = zipfile.ZipFile(src)
    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            data = zin.read(name)
            zout.writestr(name, unwrap(data) if name.endswith("data.pkl") else data)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
