//! Per-step schedules: the learning rate (linear warmup from 0, then cosine to a floor,
//! as the official code's `cosine_scheduler`) and the teacher momentum (cosine from
//! `base` to 1 over all steps).

use serde::{Deserialize, Serialize};

/// Linear warmup from `warmup_start` to `peak` over `warmup_steps` steps (step 0 gets
/// `warmup_start`, step `warmup_steps - 1` gets `peak`, like `np.linspace`), then cosine
/// from `peak` (at step `warmup_steps`) towards `final_value` (reached at step
/// `total_steps`). Steps past the end stay at `final_value`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CosineSchedule {
    pub peak: f64,
    pub final_value: f64,
    pub total_steps: u64,
    pub warmup_steps: u64,
    pub warmup_start: f64,
}

impl CosineSchedule {
    /// The value at `step` (0-based).
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            if self.warmup_steps == 1 {
                return self.peak;
            }
            let f = step as f64 / (self.warmup_steps - 1) as f64;
            return self.warmup_start + (self.peak - self.warmup_start) * f;
        }
        let n = self.total_steps.saturating_sub(self.warmup_steps);
        if n == 0 {
            return self.final_value;
        }
        let i = (step - self.warmup_steps).min(n) as f64;
        self.final_value
            + 0.5
                * (self.peak - self.final_value)
                * (1.0 + (std::f64::consts::PI * i / n as f64).cos())
    }
}

/// Teacher momentum at step `i` of `total`:
/// `m_i = 1 - (1 - base) * (1 + cos(pi * i / total)) / 2` (`base` at 0, 1 at `total`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MomentumSchedule {
    pub base: f64,
    pub total_steps: u64,
}

impl MomentumSchedule {
    pub fn at(&self, step: u64) -> f64 {
        if self.total_steps == 0 {
            return 1.0;
        }
        let i = step.min(self.total_steps) as f64;
        1.0 - (1.0 - self.base) * (1.0 + (std::f64::consts::PI * i / self.total_steps as f64).cos())
            / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lr_schedule_endpoints() {
        let s = CosineSchedule {
            peak: 5e-4,
            final_value: 1e-5,
            total_steps: 100,
            warmup_steps: 10,
            warmup_start: 0.0,
        };
        assert_eq!(s.at(0), 0.0);
        assert!((s.at(5) - 5e-4 * 5.0 / 9.0).abs() < 1e-15);
        assert!((s.at(9) - 5e-4).abs() < 1e-15);
        assert!((s.at(10) - 5e-4).abs() < 1e-15);
        // Half-way through the cosine: the mean of peak and floor.
        assert!((s.at(55) - (5e-4 + 1e-5) / 2.0).abs() < 1e-12);
        assert!((s.at(100) - 1e-5).abs() < 1e-15);
        assert!((s.at(1000) - 1e-5).abs() < 1e-15);
        // Monotone after warmup.
        for i in 10..100 {
            assert!(s.at(i + 1) <= s.at(i));
        }
        let none = CosineSchedule {
            warmup_steps: 0,
            ..s
        };
        assert_eq!(none.at(0), 5e-4);
    }

    #[test]
    fn momentum_schedule_endpoints() {
        let m = MomentumSchedule {
            base: 0.996,
            total_steps: 1000,
        };
        assert!((m.at(0) - 0.996).abs() < 1e-15);
        assert!((m.at(500) - 0.998).abs() < 1e-12);
        assert_eq!(m.at(1000), 1.0);
        for i in 0..1000 {
            assert!(m.at(i + 1) >= m.at(i));
        }
    }
}
