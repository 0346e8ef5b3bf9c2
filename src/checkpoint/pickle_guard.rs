//! A pre-scan of a `.pth` pickle before candle parses it: pickle is data, never code.
//!
//! candle's reader never calls anything, but a pickle that names `os.system` is hostile whatever
//! reads it, and candle's reader trusts lengths and clones memo entries deeply. So, like PyTorch's
//! `weights_only=True` unpickler, every `GLOBAL` (the only source of a callable that `REDUCE`,
//! `BUILD` or `NEWOBJ` could call) must be on an allow-list, and the walk bounds what candle would
//! build: every length fits in the bytes left, nesting depth and the size of the object tree
//! (which memo reuse can blow up exponentially) stay small.

use anyhow::{bail, Result};

/// What a PyTorch state dict (and the dicts `torch.save` writes around it) needs.
const ALLOWED: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "FloatStorage"),
    ("torch", "DoubleStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "ByteStorage"),
    ("torch", "LongStorage"),
    ("torch", "IntStorage"),
    ("torch", "ShortStorage"),
    ("torch", "CharStorage"),
    ("torch", "BoolStorage"),
];

/// Deeper nesting than any state dict; candle's recursive drop of a deep tree would overflow.
const MAX_DEPTH: u32 = 256;

/// What candle's reader takes apart by position (it indexes tuples without checking their
/// length, and a short one panics): the rebuild functions and the tuples given to them.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Other,
    /// `torch._utils._rebuild_tensor_v2`, `torch._tensor._rebuild_from_type_v2`,
    /// `torch._utils._rebuild_parameter`.
    RebuildTensor,
    RebuildFromType,
    RebuildParameter,
    /// A tuple, with the length of its third item when that is a tuple too.
    Tuple {
        len: usize,
        third_len: Option<usize>,
    },
}

#[derive(Clone, Copy)]
struct Obj {
    /// Bytes candle would hold for this object, memo copies included.
    weight: u64,
    depth: u32,
    mark: bool,
    kind: Kind,
}

fn scalar(weight: u64) -> Obj {
    Obj { weight: weight + 16, depth: 0, mark: false, kind: Kind::Other }
}

fn add_items(container: Obj, items: Obj) -> Obj {
    Obj {
        weight: container.weight.saturating_add(items.weight),
        depth: container.depth.max(items.depth),
        mark: false,
        kind: Kind::Other,
    }
}

fn tuple_kind(items: &[Obj]) -> Kind {
    let third_len = match items.get(2).map(|o| o.kind) {
        Some(Kind::Tuple { len, .. }) => Some(len),
        _ => None,
    };
    Kind::Tuple { len: items.len(), third_len }
}

/// The fewest items (and, for `_rebuild_from_type_v2`, items of its inner argument tuple)
/// candle's reader takes from a rebuild call's arguments; torch writes 6, 4 (with 6) and 3.
fn short_rebuild_args(f: Kind, args: Kind) -> Option<String> {
    let Kind::Tuple { len, third_len } = args else { return None };
    match f {
        Kind::RebuildTensor if len < 4 => Some(format!("_rebuild_tensor_v2 gets {len} arguments (torch writes 6)")),
        Kind::RebuildFromType if len < 3 => {
            Some(format!("_rebuild_from_type_v2 gets {len} arguments (torch writes 4)"))
        }
        Kind::RebuildFromType if third_len.is_some_and(|n| n < 4) => Some(format!(
            "_rebuild_from_type_v2's tensor arguments are {} items (torch writes 6)",
            third_len.unwrap_or(0)
        )),
        Kind::RebuildParameter if len < 1 => Some("_rebuild_parameter gets no arguments (torch writes 3)".into()),
        _ => None,
    }
}

/// Checks one pickle (`data.pkl` of a `.pth`); `what` names it in errors.
pub fn check_pickle(data: &[u8], what: &str) -> Result<()> {
    walk(data, what, ALLOWED, "a PyTorch state dict never needs; refusing to load it (pickle is read as data only: allowed are tensor rebuild functions, storage types and collections.OrderedDict)")
}

/// Checks a pickle of plain data (lists, dicts, strings, numbers: the REFER refs file, which
/// Python 2 may have written with the text protocol 0) before serde-pickle parses it: no globals
/// at all, and the same bounds on nesting (serde-pickle and the conversion recurse, so a deep
/// file overflowed the stack) and on memo expansion.
pub fn check_data_pickle(data: &[u8], what: &str) -> Result<()> {
    walk(data, what, &[], "a data pickle (lists, dicts, strings, numbers) never needs; refusing it")
}

fn walk(data: &[u8], what: &str, allowed: &[(&str, &str)], refusal: &str) -> Result<()> {
    // A legitimate tree is about as large as its pickle; memo reuse is what multiplies it.
    let max_weight = 64 * data.len() as u64 + (1 << 20);
    let mut stack: Vec<Obj> = Vec::new();
    let mut memo: std::collections::HashMap<u32, Obj> = std::collections::HashMap::new();
    let mut strings: Vec<String> = Vec::new(); // recent string pushes, to name STACK_GLOBAL targets
    let mut pos = 0usize;
    let take = |pos: &mut usize, n: usize| -> Result<&[u8]> {
        if data.len() - *pos < n {
            bail!("{what}: the pickle is truncated at byte {} (needs {n} more bytes)", *pos);
        }
        let s = &data[*pos..*pos + n];
        *pos += n;
        Ok(s)
    };
    let line = |pos: &mut usize| -> Result<String> {
        let rest = &data[*pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            bail!("{what}: unterminated text argument at byte {}", *pos);
        };
        *pos += n + 1;
        Ok(String::from_utf8_lossy(&rest[..n]).into_owned())
    };
    let pop = |stack: &mut Vec<Obj>, at: usize| -> Result<Obj> {
        match stack.pop() {
            Some(o) if !o.mark => Ok(o),
            _ => bail!("{what}: the pickle pops an empty stack at byte {at}"),
        }
    };
    let pop_mark = |stack: &mut Vec<Obj>, at: usize| -> Result<(Obj, Vec<Obj>)> {
        let mut acc = Obj { weight: 16, depth: 0, mark: false, kind: Kind::Other };
        let mut items = Vec::new();
        loop {
            match stack.pop() {
                Some(o) if o.mark => {
                    items.reverse();
                    return Ok((acc, items));
                }
                Some(o) => {
                    acc.weight = acc.weight.saturating_add(o.weight);
                    acc.depth = acc.depth.max(o.depth);
                    items.push(o);
                }
                None => bail!("{what}: no MARK for the opcode at byte {at}"),
            }
        }
    };
    let combine = |parts: &[Obj]| -> Obj {
        let weight = parts.iter().fold(16u64, |a, o| a.saturating_add(o.weight));
        Obj { weight, depth: parts.iter().map(|o| o.depth).max().unwrap_or(0) + 1, mark: false, kind: Kind::Other }
    };
    let tuple = |parts: &[Obj]| -> Obj { Obj { kind: tuple_kind(parts), ..combine(parts) } };
    let check_global = |module: &str, name: &str, at: usize| -> Result<()> {
        if !allowed.iter().any(|&(m, n)| m == module && n == name) {
            bail!("{what}: the pickle refers to `{module}.{name}` (byte {at}), which {refusal}");
        }
        Ok(())
    };
    loop {
        let at = pos;
        let op = take(&mut pos, 1)?[0];
        let mut pushed_string = None;
        match op {
            0x80 => {
                take(&mut pos, 1)?;
            }
            b'c' => {
                let module = line(&mut pos)?;
                let name = line(&mut pos)?;
                check_global(&module, &name, at)?;
                let kind = match (module.as_str(), name.as_str()) {
                    ("torch._utils", "_rebuild_tensor_v2") => Kind::RebuildTensor,
                    ("torch._tensor", "_rebuild_from_type_v2") => Kind::RebuildFromType,
                    ("torch._utils", "_rebuild_parameter") => Kind::RebuildParameter,
                    _ => Kind::Other,
                };
                stack.push(Obj { kind, ..scalar((module.len() + name.len()) as u64) });
            }
            0x93 => {
                // STACK_GLOBAL (protocol 4): module and name are the last two strings pushed.
                let n = strings.len();
                let (module, name) =
                    if n >= 2 { (strings[n - 2].clone(), strings[n - 1].clone()) } else { ("?".into(), "?".into()) };
                check_global(&module, &name, at)?;
                bail!("{what}: STACK_GLOBAL (pickle protocol 4) is not supported; re-save the file with torch.save");
            }
            b'i' => {
                let module = line(&mut pos)?;
                let name = line(&mut pos)?;
                check_global(&module, &name, at)?;
                bail!("{what}: the INST opcode (byte {at}) is not supported");
            }
            b'o' | 0x82 | 0x83 | 0x84 => {
                bail!("{what}: opcode {op:#04x} at byte {at} builds an object from outside the pickle; refusing it")
            }
            // Text protocol 0: the argument is a line.
            b'I' | b'L' | b'F' => {
                line(&mut pos)?;
                stack.push(scalar(0));
            }
            b'S' | b'V' => {
                let s = line(&mut pos)?;
                stack.push(scalar(s.len() as u64));
            }
            b'p' | b'g' => {
                let idx: u32 = line(&mut pos)?
                    .trim()
                    .parse()
                    .map_err(|_| anyhow::anyhow!("{what}: bad memo index at byte {at}"))?;
                if op == b'p' {
                    let Some(&top) = stack.last().filter(|o| !o.mark) else {
                        bail!("{what}: memo write of an empty stack at byte {at}");
                    };
                    memo.insert(idx, top);
                } else {
                    let Some(&o) = memo.get(&idx) else {
                        bail!("{what}: memo entry {idx} read before it is written (byte {at})");
                    };
                    stack.push(o);
                }
            }
            b'l' => {
                let (o, _) = pop_mark(&mut stack, at)?;
                stack.push(Obj { depth: o.depth + 1, ..o });
            }
            b'0' => {
                stack.pop();
            }
            b'1' => {
                pop_mark(&mut stack, at)?;
            }
            b'2' => {
                let Some(&top) = stack.last() else { bail!("{what}: DUP of an empty stack at byte {at}") };
                stack.push(top);
            }
            b'X' | 0x8c | b'T' | b'U' | b'B' | b'C' | 0x8b | 0x8d | 0x8e => {
                let len = match op {
                    b'X' | b'T' | b'B' | 0x8b => u32::from_le_bytes(take(&mut pos, 4)?.try_into().unwrap()) as usize,
                    0x8d | 0x8e => usize::try_from(u64::from_le_bytes(take(&mut pos, 8)?.try_into().unwrap()))
                        .unwrap_or(usize::MAX),
                    _ => take(&mut pos, 1)?[0] as usize,
                };
                let s = take(&mut pos, len)?;
                pushed_string = Some(String::from_utf8_lossy(s).into_owned());
                stack.push(scalar(len as u64));
            }
            b'J' => {
                take(&mut pos, 4)?;
                stack.push(scalar(0));
            }
            b'K' => {
                take(&mut pos, 1)?;
                stack.push(scalar(0));
            }
            b'M' => {
                take(&mut pos, 2)?;
                stack.push(scalar(0));
            }
            b'G' => {
                take(&mut pos, 8)?;
                stack.push(scalar(0));
            }
            0x8a => {
                let n = take(&mut pos, 1)?[0] as usize;
                take(&mut pos, n)?;
                stack.push(scalar(n as u64));
            }
            b')' => stack.push(tuple(&[])),
            b']' | b'}' | b'N' | 0x88 | 0x89 => stack.push(scalar(0)),
            b'(' => stack.push(Obj { weight: 0, depth: 0, mark: true, kind: Kind::Other }),
            b't' | b'd' => {
                let (o, items) = pop_mark(&mut stack, at)?;
                let kind = if op == b't' { tuple_kind(&items) } else { Kind::Other };
                stack.push(Obj { depth: o.depth + 1, kind, ..o });
            }
            0x85 => {
                let a = pop(&mut stack, at)?;
                stack.push(tuple(&[a]));
            }
            0x86 => {
                let b = pop(&mut stack, at)?;
                let a = pop(&mut stack, at)?;
                stack.push(tuple(&[a, b]));
            }
            0x87 => {
                let c = pop(&mut stack, at)?;
                let b = pop(&mut stack, at)?;
                let a = pop(&mut stack, at)?;
                stack.push(tuple(&[a, b, c]));
            }
            // Two operands combined into one: REDUCE, BUILD, NEWOBJ (callable/object + args).
            b'R' | b'b' | 0x81 => {
                let args = pop(&mut stack, at)?;
                let f = pop(&mut stack, at)?;
                if let Some(why) = short_rebuild_args(f.kind, args.kind) {
                    bail!("{what}: malformed tensor record at byte {at}: {why}");
                }
                stack.push(combine(&[f, args]));
            }
            b'Q' => {
                let id = pop(&mut stack, at)?;
                if let Kind::Tuple { len, .. } = id.kind {
                    if len < 5 {
                        bail!(
                            "{what}: malformed tensor record at byte {at}: a storage id of {len} items \
                             (torch writes 5: 'storage', type, key, device, size)"
                        );
                    }
                }
                stack.push(combine(&[id]));
            }
            // Items added to a list or dict: it grows, and is one level above its deepest item.
            b'a' | b's' => {
                let v = pop(&mut stack, at)?;
                let k = if op == b's' { pop(&mut stack, at)? } else { scalar(0) };
                let c = pop(&mut stack, at)?;
                stack.push(add_items(c, combine(&[k, v])));
            }
            b'e' | b'u' => {
                let (items, _) = pop_mark(&mut stack, at)?;
                let c = pop(&mut stack, at)?;
                stack.push(add_items(c, Obj { depth: items.depth + 1, ..items }));
            }
            b'h' | b'j' => {
                let idx = if op == b'h' {
                    take(&mut pos, 1)?[0] as u32
                } else {
                    u32::from_le_bytes(take(&mut pos, 4)?.try_into().unwrap())
                };
                let Some(&o) = memo.get(&idx) else {
                    bail!("{what}: memo entry {idx} read before it is written (byte {at})");
                };
                stack.push(o);
            }
            b'q' | b'r' | 0x94 => {
                let idx = match op {
                    b'q' => take(&mut pos, 1)?[0] as u32,
                    b'r' => u32::from_le_bytes(take(&mut pos, 4)?.try_into().unwrap()),
                    _ => memo.len() as u32,
                };
                let Some(&top) = stack.last().filter(|o| !o.mark) else {
                    bail!("{what}: memo write of an empty stack at byte {at}");
                };
                memo.insert(idx, top);
            }
            0x95 => {
                take(&mut pos, 8)?; // FRAME: a length hint only
            }
            b'.' => return Ok(()),
            other => bail!("{what}: unsupported pickle opcode {other:#04x} at byte {at}"),
        }
        if let Some(s) = pushed_string {
            strings.push(s);
            if strings.len() > 2 {
                strings.remove(0);
            }
        }
        if let Some(top) = stack.last() {
            if top.weight > max_weight {
                bail!(
                    "{what}: the pickle would expand to more than {max_weight} bytes (memo reuse at byte {at}); \
                     refusing it"
                );
            }
            if top.depth > MAX_DEPTH {
                bail!("{what}: the pickle nests deeper than {MAX_DEPTH} levels (byte {at}); refusing it");
            }
        }
    }
}
