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

#[derive(Clone, Copy)]
struct Obj {
    /// Bytes candle would hold for this object, memo copies included.
    weight: u64,
    depth: u32,
    mark: bool,
}

fn scalar(weight: u64) -> Obj {
    Obj { weight: weight + 16, depth: 0, mark: false }
}

fn add_items(container: Obj, items: Obj) -> Obj {
    Obj { weight: container.weight.saturating_add(items.weight), depth: container.depth.max(items.depth), mark: false }
}

/// Checks one pickle (`data.pkl` of a `.pth`); `what` names it in errors.
pub fn check_pickle(data: &[u8], what: &str) -> Result<()> {
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
            bail!("{what}: unterminated GLOBAL name at byte {}", *pos);
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
    let pop_mark = |stack: &mut Vec<Obj>, at: usize| -> Result<Obj> {
        let mut acc = Obj { weight: 16, depth: 0, mark: false };
        loop {
            match stack.pop() {
                Some(o) if o.mark => return Ok(acc),
                Some(o) => {
                    acc.weight = acc.weight.saturating_add(o.weight);
                    acc.depth = acc.depth.max(o.depth);
                }
                None => bail!("{what}: no MARK for the opcode at byte {at}"),
            }
        }
    };
    let combine = |parts: &[Obj]| -> Obj {
        let weight = parts.iter().fold(16u64, |a, o| a.saturating_add(o.weight));
        Obj { weight, depth: parts.iter().map(|o| o.depth).max().unwrap_or(0) + 1, mark: false }
    };
    let check_global = |module: &str, name: &str, at: usize| -> Result<()> {
        if !ALLOWED.iter().any(|&(m, n)| m == module && n == name) {
            bail!(
                "{what}: the pickle refers to `{module}.{name}` (byte {at}), which a PyTorch state dict never \
                 needs; refusing to load it (pickle is read as data only: allowed are tensor rebuild functions, \
                 storage types and collections.OrderedDict)"
            );
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
                stack.push(scalar((module.len() + name.len()) as u64));
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
            b'X' | 0x8c => {
                let len = if op == b'X' {
                    u32::from_le_bytes(take(&mut pos, 4)?.try_into().unwrap()) as usize
                } else {
                    take(&mut pos, 1)?[0] as usize
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
            b')' | b']' | b'}' | b'N' | 0x88 | 0x89 => stack.push(scalar(0)),
            b'(' => stack.push(Obj { weight: 0, depth: 0, mark: true }),
            b't' | b'd' => {
                let o = pop_mark(&mut stack, at)?;
                stack.push(Obj { depth: o.depth + 1, ..o });
            }
            0x85 => {
                let a = pop(&mut stack, at)?;
                stack.push(combine(&[a]));
            }
            0x86 => {
                let b = pop(&mut stack, at)?;
                let a = pop(&mut stack, at)?;
                stack.push(combine(&[a, b]));
            }
            0x87 => {
                let c = pop(&mut stack, at)?;
                let b = pop(&mut stack, at)?;
                let a = pop(&mut stack, at)?;
                stack.push(combine(&[a, b, c]));
            }
            // Two operands combined into one: REDUCE, BUILD, NEWOBJ (callable/object + args).
            b'R' | b'b' | 0x81 => {
                let args = pop(&mut stack, at)?;
                let f = pop(&mut stack, at)?;
                stack.push(combine(&[f, args]));
            }
            b'Q' => {
                let id = pop(&mut stack, at)?;
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
                let items = pop_mark(&mut stack, at)?;
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
