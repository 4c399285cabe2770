//! The momentum teacher: a stop-gradient copy of the student whose PARAMETERS follow
//! the student by EMA after every optimiser step,
//! `theta_t = m * theta_t + (1 - m) * theta_s`. BatchNorm running buffers are not
//! averaged (the teacher's head runs with batch statistics anyway).
//!
//! The teacher's parameters are flattened in the same layout as the student's
//! optimiser groups, so one update is one `lerp_` per group.

use tch::{TchError, Tensor, nn};

use super::optim::{AdamW, FlatGroup};

type Result<T> = std::result::Result<T, TchError>;

/// The teacher's parameters, laid out like the student's optimiser groups.
#[derive(Debug)]
pub struct EmaTeacher {
    pub groups: Vec<FlatGroup>,
}

impl EmaTeacher {
    /// Flattens `teacher`'s variables with the names of `opt`'s groups (the teacher
    /// must be built like the student). Freezes them (no gradient).
    pub fn new(teacher: &mut nn::VarStore, opt: &AdamW) -> Result<Self> {
        teacher.freeze();
        let vars = teacher.variables();
        let mut groups = Vec::new();
        for g in &opt.groups {
            let mut picked = Vec::new();
            for (name, shape) in g.params.names.iter().zip(&g.params.shapes) {
                let Some(t) = vars.get(name) else {
                    return Err(TchError::Shape(format!(
                        "teacher: no variable `{name}` (teacher and student differ)"
                    )));
                };
                if &t.size() != shape {
                    return Err(TchError::Shape(format!(
                        "teacher: `{name}` has shape {:?}, the student's {shape:?}",
                        t.size()
                    )));
                }
                picked.push((name.clone(), t.shallow_clone()));
            }
            groups.push(FlatGroup::new(picked)?);
        }
        Ok(EmaTeacher { groups })
    }

    /// `teacher = m * teacher + (1 - m) * student`, group by group.
    pub fn update(&mut self, student: &AdamW, momentum: f64) -> Result<()> {
        tch::no_grad(|| {
            for (t, s) in self.groups.iter_mut().zip(&student.groups) {
                if t.numel() > 0 {
                    let _ = t.flat.f_lerp_(&s.params.flat, 1.0 - momentum)?;
                }
            }
            Ok(())
        })
    }

    /// Copies the student's parameters (the initial teacher).
    pub fn copy_from(&mut self, student: &AdamW) -> Result<()> {
        tch::no_grad(|| {
            for (t, s) in self.groups.iter_mut().zip(&student.groups) {
                t.flat.f_copy_(&s.params.flat)?;
            }
            Ok(())
        })
    }

    /// Sum of the flat buffers' element counts.
    pub fn numel(&self) -> i64 {
        self.groups.iter().map(|g| g.numel()).sum()
    }
}

/// Convenience: the flat tensors of all groups.
pub fn flats(groups: &[FlatGroup]) -> Vec<Tensor> {
    groups.iter().map(|g| g.flat.shallow_clone()).collect()
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, nn};

    use super::*;
    use crate::train::optim::AdamWConfig;

    #[test]
    fn ema_follows_the_formula() {
        let svs = nn::VarStore::new(Device::Cpu);
        let s = svs.root().ones("w", &[3]);
        let s2 = svs.root().zeros("m", &[2, 2]);
        let mut tvs = nn::VarStore::new(Device::Cpu);
        let t = tvs.root().zeros("w", &[3]);
        let t2 = tvs.root().ones("m", &[2, 2]);
        let opt = AdamW::new(
            AdamWConfig::default(),
            crate::train::optim::trainable_named(&svs),
        )
        .unwrap();
        let mut ema = EmaTeacher::new(&mut tvs, &opt).unwrap();
        assert!(!t.requires_grad());
        ema.update(&opt, 0.9).unwrap();
        // 0.9 * 0 + 0.1 * 1
        assert!((t.mean(Kind::Float).double_value(&[]) - 0.1).abs() < 1e-7);
        assert!((t2.mean(Kind::Float).double_value(&[]) - 0.9).abs() < 1e-7);
        ema.update(&opt, 1.0).unwrap();
        assert!((t.mean(Kind::Float).double_value(&[]) - 0.1).abs() < 1e-7);
        ema.copy_from(&opt).unwrap();
        assert_eq!(t.mean(Kind::Float).double_value(&[]), 1.0);
        let _ = (s, s2);
    }
}
