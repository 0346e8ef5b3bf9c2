//! The reference's learning-rate schedule (timm `CosineLRScheduler` as ALBEF drives it, §7) and
//! the distillation-weight ramp.

use crate::config::ScheduleConfig;

/// Iterations per scheduler step during warm-up: "warmup_epochs" counts blocks of 100.
pub const WARMUP_BLOCK: usize = 100;

impl ScheduleConfig {
    /// timm's value at scheduler time `t`.
    pub fn at(&self, t: usize) -> f64 {
        if t < self.warmup_epochs {
            return self.warmup_lr + t as f64 * (self.lr - self.warmup_lr) / self.warmup_epochs as f64;
        }
        let t = t - self.warmup_epochs;
        if t >= self.epochs {
            return self.min_lr;
        }
        self.min_lr
            + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * t as f64 / self.epochs as f64).cos())
    }

    /// Learning rate of iteration `iter` of `epoch`. Epoch 0: `warmup_lr` at first, then the
    /// scheduler is stepped to `i // 100` after iterations i = 0, 100, … ≤ 100·warmup_epochs (so
    /// iteration i ≥ 1 uses step ⌊(i−1)/100⌋ capped at warmup_epochs); from epoch 1 on the rate is
    /// constant per epoch, the scheduler set to `epoch + warmup_epochs`.
    pub fn lr(&self, epoch: usize, iter: usize) -> f64 {
        if epoch == 0 {
            if iter == 0 {
                self.warmup_lr
            } else {
                self.at(((iter - 1) / WARMUP_BLOCK).min(self.warmup_epochs))
            }
        } else {
            self.at(epoch + self.warmup_epochs)
        }
    }
}

/// Distillation weight: ramped linearly over epoch 0 when `warm_up` (α·min(1, i/len)).
pub fn alpha(base: f64, warm_up: bool, epoch: usize, iter: usize, iters_per_epoch: usize) -> f64 {
    if epoch > 0 || !warm_up {
        base
    } else {
        base * (iter as f64 / iters_per_epoch.max(1) as f64).min(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coco() -> ScheduleConfig {
        ScheduleConfig {
            sched: "cosine".into(),
            lr: 1e-5,
            epochs: 5,
            min_lr: 1e-6,
            decay_rate: Some(1.0),
            warmup_lr: 1e-5,
            warmup_epochs: 1,
            cooldown_epochs: Some(0),
        }
    }

    #[test]
    fn reference_per_epoch_rates() {
        // §7: COCO retrieval e = 0..4.
        let want = [1e-5, 9.14e-6, 6.89e-6, 4.11e-6, 1.86e-6];
        for (e, w) in want.iter().enumerate() {
            let got = coco().lr(e, 5000);
            assert!((got - w).abs() < 0.006e-6, "epoch {e}: {got} vs {w}");
        }
        // VQA: 8 epochs, lr 2e-5, min 1e-6, warm-up 4 blocks from 1e-5.
        let vqa = ScheduleConfig { lr: 2e-5, epochs: 8, warmup_epochs: 4, ..coco() };
        let want = [2e-5, 1.93e-5, 1.72e-5, 1.41e-5, 1.05e-5, 6.86e-6, 3.78e-6, 1.72e-6];
        for (e, w) in want.iter().enumerate() {
            let got = vqa.lr(e, 100_000);
            assert!((got - w).abs() / w < 0.005, "vqa epoch {e}: {got} vs {w}");
        }
    }

    #[test]
    fn warmup_counts_blocks_of_100_iterations() {
        let s = ScheduleConfig { lr: 2e-5, warmup_epochs: 4, ..coco() };
        let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-15, "{a} vs {b}");
        close(s.lr(0, 0), 1e-5);
        close(s.lr(0, 100), 1e-5); // stepped to t = 0 after iteration 0
        close(s.lr(0, 101), 1.25e-5); // t = 1 after iteration 100
        close(s.lr(0, 301), 1.75e-5);
        close(s.lr(0, 401), 2e-5);
        close(s.lr(0, 10_000), 2e-5);
        assert_eq!(alpha(0.4, true, 0, 50, 100), 0.2);
        assert_eq!(alpha(0.4, false, 0, 50, 100), 0.4);
        assert_eq!(alpha(0.4, true, 1, 0, 100), 0.4);
    }
}
