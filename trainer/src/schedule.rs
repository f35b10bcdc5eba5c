//! The learning-rate schedule of the Llama 2 paper: linear warmup, then cosine decay to a
//! fraction (10 %) of the peak at the last step.

#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Cosine {
    pub peak: f32,
    pub warmup: usize,
    pub total: usize,
    /// The final learning rate as a fraction of the peak.
    pub final_ratio: f32,
}

impl Cosine {
    /// The learning rate of 0-based step `s`: peak·(s+1)/warmup during warmup (reaching the peak
    /// at its last step), then cosine from the peak to `final_ratio`·peak at step total−1.
    pub fn lr(&self, s: usize) -> f32 {
        let peak = self.peak as f64;
        let min = peak * self.final_ratio as f64;
        if s < self.warmup {
            return (peak * (s + 1) as f64 / self.warmup as f64) as f32;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let progress = ((s + 1 - self.warmup) as f64 / span as f64).min(1.0);
        (min + 0.5 * (peak - min) * (1.0 + (std::f64::consts::PI * progress).cos())) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn warmup_end_and_final_values() {
        let c = Cosine {
            peak: 3e-4,
            warmup: 2000,
            total: 10000,
            final_ratio: 0.1,
        };
        assert!((c.lr(0) - 3e-4 / 2000.0).abs() < 1e-12);
        assert_eq!(c.lr(1999), 3e-4);
        assert!(c.lr(2000) <= 3e-4 && c.lr(2000) > 2.99e-4);
        assert!(c.lr(2100) < 3e-4);
        assert!((c.lr(9999) - 3e-5).abs() < 1e-9, "{}", c.lr(9999));
        assert!(
            (c.lr(6000) - (3e-5 + 0.5 * 2.7e-4)).abs() < 1e-6,
            "midpoint {}",
            c.lr(6000)
        );
        // Monotone decay after warmup.
        assert!((2000..9999).all(|s| c.lr(s + 1) <= c.lr(s)));
    }
}
