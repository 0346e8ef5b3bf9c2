//! A bounded walk over a parquet file's thrift structures (the footer and every page header)
//! before the parquet crate parses them.
//!
//! Why: the crate's thrift `skip` of unknown fields counts a boolean inside a list, set or map as
//! zero bytes (the compact protocol gives each one a byte), so a 1.9 kB footer whose unknown
//! field claims a list of 2³¹ booleans spins for seconds, and a few such fields for minutes; and
//! a short list of booleans puts the crate out of step with the bytes, so that it reads what
//! follows as other values (a page header that passed a spec-exact walk took 2 s in release,
//! 116 s under the fuzzer). So collections of booleans, which no footer or page header field
//! holds (only the column index, which albef does not read, has one), are refused; every other
//! element costs at least one byte, no count may exceed the bytes left, and the walk is linear
//! in the file's size.

use anyhow::{bail, Context, Result};
use parquet::file::metadata::ParquetMetaData;

/// The crate's own nesting limit for skipped fields.
const MAX_DEPTH: u32 = 64;

/// Checks the footer (`<metadata> <u32 length> PAR1` at the end of `file`). A file whose framing
/// is wrong is left to the parquet crate, which names what it expected.
pub fn check_footer(file: &[u8]) -> Result<()> {
    let Some(tail) = file.len().checked_sub(8).map(|at| &file[at..]) else { return Ok(()) };
    if &tail[4..] != b"PAR1" {
        return Ok(());
    }
    let meta_len = u32::from_le_bytes(tail[..4].try_into().expect("4 bytes")) as usize;
    let Some(start) = (file.len() - 8).checked_sub(meta_len) else { return Ok(()) };
    let mut walk = Walker { buf: &file[start..file.len() - 8], pos: 0 };
    walk.structure(0).with_context(|| format!("the footer's metadata (at byte {start}) is damaged"))?;
    Ok(())
}

/// Checks the page headers of every column chunk the metadata lists, one after the other
/// (header, then `compressed_page_size` bytes of page) to the chunk's end.
pub fn check_pages(file: &[u8], meta: &ParquetMetaData) -> Result<()> {
    for (g, group) in meta.row_groups().iter().enumerate() {
        for (c, chunk) in group.columns().iter().enumerate() {
            // `byte_range()` would panic on a negative offset or size.
            let start = chunk.dictionary_page_offset().unwrap_or(chunk.data_page_offset());
            let len = chunk.compressed_size();
            if start < 0 || len < 0 {
                bail!("row group {g}, column {c}: the column chunk claims offset {start}, size {len}");
            }
            let end = (start as u64).saturating_add(len as u64).min(file.len() as u64) as usize;
            let mut pos = start as usize;
            while pos < end {
                let mut walk = Walker { buf: &file[..end], pos };
                let fields = walk
                    .structure(0)
                    .with_context(|| format!("row group {g}, column {c}: the page header at byte {pos} is damaged"))?;
                // PageHeader field 3: compressed_page_size (i32).
                let Some(&(_, size)) = fields.iter().find(|(id, _)| *id == 3) else { break };
                if size < 0 {
                    bail!("row group {g}, column {c}: the page at byte {pos} claims {size} bytes");
                }
                pos = walk.pos.saturating_add(size as usize);
            }
        }
    }
    Ok(())
}

/// The thrift compact protocol, read without building anything.
struct Walker<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Walker<'_> {
    fn left(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn byte(&mut self) -> Result<u8> {
        let b = *self.buf.get(self.pos).with_context(|| format!("it ends at byte {} inside a value", self.pos))?;
        self.pos += 1;
        Ok(b)
    }

    fn skip(&mut self, n: u64) -> Result<()> {
        if n > self.left() as u64 {
            bail!("a value at byte {} claims {n} bytes, {} are left", self.pos, self.left());
        }
        self.pos += n as usize;
        Ok(())
    }

    fn varint(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..70).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift.min(63);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        bail!("a variable-length integer at byte {} runs past 10 bytes", self.pos)
    }

    fn zigzag(&mut self) -> Result<i64> {
        let v = self.varint()?;
        Ok((v >> 1) as i64 ^ -((v & 1) as i64))
    }

    /// A collection of `n` elements, each of which takes at least one byte.
    fn count(&mut self, n: u64) -> Result<u64> {
        if n > self.left() as u64 {
            bail!("a collection at byte {} claims {n} elements in {} bytes", self.pos, self.left());
        }
        Ok(n)
    }

    /// Collection elements the parquet crate would skip as zero bytes (see the module comment).
    fn no_booleans(&self, element: u8) -> Result<()> {
        if matches!(element, 1 | 2) {
            bail!("a collection of booleans at byte {} (no footer or page header field is one)", self.pos);
        }
        Ok(())
    }

    /// A struct's fields up to its stop byte; returns its integer fields as (id, value).
    fn structure(&mut self, depth: u32) -> Result<Vec<(i16, i64)>> {
        if depth >= MAX_DEPTH {
            bail!("values nest deeper than {MAX_DEPTH} at byte {}", self.pos);
        }
        let mut ints = Vec::new();
        let mut last_id = 0i16;
        loop {
            let header = self.byte()?;
            if header == 0 {
                return Ok(ints);
            }
            let delta = header >> 4;
            let id = if delta == 0 { self.zigzag()? as i16 } else { last_id.wrapping_add(i16::from(delta)) };
            last_id = id;
            match header & 0x0f {
                // A boolean field's value is its type nibble.
                1 | 2 => {}
                ty @ 4..=6 => ints.push((id, self.value(ty, depth)?.unwrap_or_default())),
                ty => {
                    self.value(ty, depth)?;
                }
            }
        }
    }

    /// One value of compact type `ty` (as an element: booleans take a byte); integers are returned.
    fn value(&mut self, ty: u8, depth: u32) -> Result<Option<i64>> {
        match ty {
            1..=3 => self.skip(1)?,
            4..=6 => return self.zigzag().map(Some),
            7 => self.skip(8)?,
            8 => {
                let len = self.varint()?;
                self.skip(len)?;
            }
            9 | 10 => {
                let header = self.byte()?;
                let n = match header >> 4 {
                    15 => self.varint()?,
                    n => u64::from(n),
                };
                self.no_booleans(header & 0x0f)?;
                for _ in 0..self.count(n)? {
                    self.value(header & 0x0f, depth + 1)?;
                }
            }
            11 => {
                let n = self.varint()?;
                if n > 0 {
                    let kinds = self.byte()?;
                    self.no_booleans(kinds >> 4)?;
                    self.no_booleans(kinds & 0x0f)?;
                    for _ in 0..self.count(n)? {
                        self.value(kinds >> 4, depth + 1)?;
                        self.value(kinds & 0x0f, depth + 1)?;
                    }
                }
            }
            12 => {
                self.structure(depth + 1)?;
            }
            13 => self.skip(16)?,
            _ => bail!("unknown value type {ty} at byte {}", self.pos - 1),
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `<metadata> <len> PAR1`.
    fn framed(meta: &[u8]) -> Vec<u8> {
        let mut file = b"PAR1".to_vec();
        file.extend_from_slice(meta);
        file.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        file.extend_from_slice(b"PAR1");
        file
    }

    #[test]
    fn collections_claiming_more_elements_than_bytes_or_holding_booleans_are_refused() {
        // Field 1 (delta 1), type list (9); list header: size 15 → varint 2^31, element type i32.
        let meta = [0x19, 0xf5, 0x80, 0x80, 0x80, 0x80, 0x08, 0x00];
        let err = format!("{:#}", check_footer(&framed(&meta)).unwrap_err());
        assert!(err.contains("claims 2147483648 elements"), "{err}");
        assert!(err.contains("footer"), "{err}");
        // Booleans: refused whatever the count (the parquet crate would read them as 0 bytes).
        for meta in [[0x19, 0x21, 0x01, 0x01, 0x00], [0x1b, 0x01, 0x51, 0x02, 0x01]] {
            let err = format!("{:#}", check_footer(&framed(&meta)).unwrap_err());
            assert!(err.contains("a collection of booleans"), "{err}");
        }
    }

    #[test]
    fn well_formed_values_pass() {
        // i32 field 1 = -3, binary field 2 = "ab", list<i32> field 3 of 2, a nested struct
        // field 4 with a true boolean field, a map<i32,i32> field 5 of 1, stop.
        let meta = [
            0x15, 0x05, 0x18, 0x02, b'a', b'b', 0x19, 0x25, 0x01, 0x02, 0x1c, 0x11, 0x00, 0x1b, 0x01, 0x55, 0x02, 0x04,
            0x00,
        ];
        check_footer(&framed(&meta)).unwrap();
        let mut walk = Walker { buf: &meta, pos: 0 };
        assert_eq!(walk.structure(0).unwrap(), vec![(1, -3)]);
        assert_eq!(walk.pos, meta.len());
    }

    #[test]
    fn nesting_and_truncation_are_refused() {
        let deep: Vec<u8> = std::iter::repeat_n(0x1c, 100).collect();
        assert!(format!("{:#}", check_footer(&framed(&deep)).unwrap_err()).contains("nest deeper"));
        let cut = [0x18, 0x05, b'a'];
        assert!(format!("{:#}", check_footer(&framed(&cut)).unwrap_err()).contains("claims 5 bytes"));
    }
}
