//! Reading annotation JSON files with errors that name the file, the entry and the field.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// A JSON file whose top level must be a list of objects.
pub fn read_list(path: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read annotation file {}", path.display()))?;
    let value: Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    match value {
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                if !item.is_object() {
                    bail!("{}: entry {i} is not a JSON object", path.display());
                }
            }
            Ok(items)
        }
        other => bail!("{}: expected a JSON list of entries, found {}", path.display(), kind(&other)),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// One entry of an annotation file, for field access with located errors.
pub struct Entry<'a> {
    pub file: &'a Path,
    pub index: usize,
    pub value: &'a Value,
}

impl<'a> Entry<'a> {
    pub fn get(&self, field: &str) -> Result<&'a Value> {
        self.value
            .get(field)
            .with_context(|| format!("{}: entry {} has no field '{field}'", self.file.display(), self.index))
    }

    pub fn str(&self, field: &str) -> Result<&'a str> {
        let v = self.get(field)?;
        v.as_str().with_context(|| {
            format!(
                "{}: entry {}, field '{field}' must be a string, found {}",
                self.file.display(),
                self.index,
                kind(v)
            )
        })
    }

    /// A string or a list of strings (captions).
    pub fn strings(&self, field: &str) -> Result<Vec<&'a str>> {
        let v = self.get(field)?;
        let err = || {
            format!(
                "{}: entry {}, field '{field}' must be a string or a list of strings",
                self.file.display(),
                self.index
            )
        };
        match v {
            Value::String(s) => Ok(vec![s.as_str()]),
            Value::Array(items) => items.iter().map(|x| x.as_str().with_context(err)).collect(),
            _ => bail!(err()),
        }
    }

    pub fn location(&self) -> String {
        format!("entry {} of {}", self.index, self.file.display())
    }
}

/// Iterates the entries of a list read by [`read_list`].
pub fn entries<'a>(file: &'a Path, items: &'a [Value]) -> impl Iterator<Item = Entry<'a>> {
    items.iter().enumerate().map(move |(index, value)| Entry { file, index, value })
}
