//! Progress reporting for long loops (training epochs, evaluation, data checks).

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

/// A progress bar on a terminal; a log line every 50 steps elsewhere (as the reference prints).
pub struct Progress {
    bar: Option<ProgressBar>,
    header: String,
    total: usize,
}

impl Progress {
    pub fn new(header: &str, total: usize) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(total as u64);
            b.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            b.set_prefix(header.to_string());
            b
        });
        Self { bar, header: header.to_string(), total }
    }

    pub fn step(&self, i: usize, msg: impl Fn() -> String) {
        match &self.bar {
            Some(b) => {
                b.set_message(msg());
                b.inc(1);
            }
            None if i.is_multiple_of(50) || i + 1 == self.total => {
                eprintln!("{} [{:>5}/{}] {}", self.header, i + 1, self.total, msg())
            }
            None => {}
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
