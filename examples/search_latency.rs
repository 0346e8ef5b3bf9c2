//! ITC query latency of `albef search` over synthetic normalised vectors (the exact scan and
//! top-k, without the text encoder): `cargo run --release --example search_latency [N...]`.

use albef::tasks::search::{top_k, Index, IndexMeta};
use rand::{Rng, SeedableRng};
use std::time::Instant;

fn main() {
    let sizes: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("a count")).collect();
    let sizes = if sizes.is_empty() { vec![10_000, 1_000_000] } else { sizes };
    let dim = 256; // ALBEF's embed_dim
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    for n in sizes {
        let mut features: Vec<f32> = (0..n * dim).map(|_| rng.random::<f32>() - 0.5).collect();
        for row in features.chunks_mut(dim) {
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            row.iter_mut().for_each(|x| *x /= norm);
        }
        let meta = IndexMeta {
            checkpoint: "synthetic".into(),
            config: "synthetic".into(),
            text_encoder: "synthetic".into(),
            identity: String::new(),
        };
        let index = Index { meta, paths: (0..n).map(|i| i.to_string()).collect(), dim, features };
        let query: Vec<f32> = index.features[..dim].to_vec();
        let mut times = Vec::new();
        for _ in 0..7 {
            let t = Instant::now();
            let top = top_k(&index.scores(&query), 10);
            times.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(top[0], 0);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "{n} vectors x {dim}: ITC scan + top-10 median {:.2} ms (min {:.2}, max {:.2})",
            times[3], times[0], times[6]
        );
    }
}
