//! The denoising loop: one transformer call per step (conditional and unconditional batched
//! together under classifier-free guidance), guidance arithmetic in float32 as diffusers
//! does it, and the Euler update.

use std::time::{Duration, Instant};

use ndarray::{concatenate, s, Array4, ArrayView4, Axis, Zip};

use super::preview::{AroundStep, StepDone, StepObserver};
use super::scheduler::Schedule;
use crate::error::{Error, Result};
use crate::model::controlnet::{self, ControlInputs};
use crate::model::transformer::{self, CaptionBatch};
use crate::package::Precision;
use crate::runtime::graph::Graph;
use crate::runtime::run_context::RunContext;

/// Guidance settings of one generation.
#[derive(Debug, Clone, Copy)]
pub struct Guidance {
    pub scale: f32,
    /// Caps |pred| at `normalization * |pos|` per image; 0 turns it off.
    pub normalization: f32,
    /// Guidance is switched off at steps whose normalised time `(1000 - t)/1000` exceeds this.
    pub truncation: f32,
}

impl Guidance {
    pub fn enabled(&self) -> bool {
        self.scale > 0.0
    }

    pub(crate) fn scale_at(&self, t_norm: f32) -> f32 {
        if self.enabled() && self.truncation <= 1.0 && t_norm as f64 > as_decimal(self.truncation) {
            0.0
        } else {
            self.scale
        }
    }
}

/// `x` as the shortest decimal that reads back as `x` (0.6 for 0.6f32, whose exact value is
/// 0.60000002384...), in f64. diffusers compares each step's float32 `t_norm` with the caller's
/// `cfg_truncation`, a Python float: where a step's `t_norm` is the float32 nearest the decimal
/// the caller wrote (shift 3, 8 steps: 0.1 at the third step; shift 2: 0.6 at the seventh), it
/// is above that decimal, and guidance stops there. Compared with the f32 itself it would not be.
fn as_decimal(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

/// Called after each step's update, e.g. to re-impose the known region when inpainting.
pub(crate) type AfterStep<'a> = dyn FnMut(usize, &mut Array4<f32>) + 'a;

pub(crate) struct Denoiser<'a> {
    pub transformer: &'a Graph,
    pub schedule: &'a Schedule,
    /// Index of the first step to run (img2img starts part-way).
    pub first_step: usize,
    pub guidance: Guidance,
    /// Captions of the conditional batch.
    pub positive: CaptionBatch,
    /// With guidance: conditional then unconditional captions, padded to one length.
    pub positive_and_negative: Option<CaptionBatch>,
    /// The package's precision, named when values overflow.
    pub precision: Precision,
    /// With a ControlNet attached: the control latents and scale the combined graph takes.
    pub control: Option<&'a ControlInputs>,
}

impl Denoiser<'_> {
    /// Runs the steps on `latents` in place. `step_times` receives each step's wall time.
    pub fn run(
        &self,
        latents: &mut Array4<f32>,
        context: &RunContext,
        step_times: &mut Vec<Duration>,
        observer: &mut StepObserver<'_>,
        after_step: &mut AfterStep<'_>,
    ) -> Result<()> {
        let total = self.schedule.len() - self.first_step;
        for (done, i) in (self.first_step..self.schedule.len()).enumerate() {
            context.check()?;
            let start = Instant::now();
            let t_norm = self.schedule.model_timestep(i);
            let last = i + 1 == self.schedule.len();
            let scale = self.guidance.scale_at(t_norm);
            let apply_cfg = self.guidance.enabled() && scale > 0.0 && self.positive_and_negative.is_some();
            let prediction = if apply_cfg {
                let input = concatenate![Axis(0), latents.view(), latents.view()];
                let captions = self.positive_and_negative.as_ref().expect("checked");
                let out = self.predict(&input, t_norm, captions, context, last)?;
                let batch = latents.shape()[0];
                guide(
                    out.slice(s![..batch, .., .., ..]),
                    out.slice(s![batch.., .., .., ..]),
                    scale,
                    self.guidance.normalization,
                )
            } else {
                self.predict(latents, t_norm, &self.positive, context, last)?
            };
            let before = observer.wants_latents(done + 1).then(|| latents.clone());
            // Euler step with v = -prediction: x + dt * v.
            let dt = self.schedule.sigmas[i + 1] - self.schedule.sigmas[i];
            Zip::from(&mut *latents).and(&prediction).for_each(|x, &p| *x += dt * -p);
            after_step(i, latents);
            if latents.iter().any(|v| !v.is_finite()) {
                return Err(non_finite(done + 1, total, self.precision));
            }
            step_times.push(start.elapsed());
            let around = before.as_ref().map(|before| AroundStep {
                before,
                after: latents,
                sigma: self.schedule.sigmas[i],
                sigma_next: self.schedule.sigmas[i + 1],
            });
            if !observer.done(StepDone { step: done + 1, total, around })? {
                context.cancel();
                return Err(Error::Cancelled);
            }
        }
        Ok(())
    }

    fn predict(
        &self,
        latents: &Array4<f32>,
        t_norm: f32,
        captions: &CaptionBatch,
        context: &RunContext,
        last: bool,
    ) -> Result<Array4<f32>> {
        match self.control {
            Some(control) => controlnet::predict(self.transformer, latents, t_norm, captions, control, context, last),
            None => transformer::predict(self.transformer, latents, t_norm, captions, context, last),
        }
    }
}

/// The error for latents that became NaN or infinite at `step` (1-based) of `total`.
pub(crate) fn non_finite(step: usize, total: usize, precision: Precision) -> Error {
    let advice = match precision {
        Precision::Fp16 => "fp16 activations can overflow: use a bf16 or fp32 package, or TensorRT in bf16",
        // In bf16 or fp32 the range is float32's: what overflowed came in with the request.
        _ => "the values left float range: check the LoRA scales and the guidance scale",
    };
    Error::inference(
        "denoising",
        format!("latents became non-finite at step {step} of {total} with the {precision} package; {advice}"),
    )
}

/// `pos + g * (pos - neg)` per image, optionally rescaled so its norm stays within
/// `normalization * |pos|`.
pub(crate) fn guide(pos: ArrayView4<f32>, neg: ArrayView4<f32>, scale: f32, normalization: f32) -> Array4<f32> {
    let mut pred = Array4::<f32>::zeros(pos.raw_dim());
    Zip::from(&mut pred).and(&pos).and(&neg).for_each(|p, &a, &b| *p = a + scale * (a - b));
    if normalization > 0.0 {
        for (mut item, pos_item) in pred.outer_iter_mut().zip(pos.outer_iter()) {
            let pos_norm = l2_norm(pos_item.iter()) as f32;
            let new_norm = l2_norm(item.iter()) as f32;
            let max_norm = pos_norm * normalization;
            if new_norm > max_norm {
                let factor = max_norm / new_norm;
                item.mapv_inplace(|v| v * factor);
            }
        }
    }
    pred
}

fn l2_norm<'a>(values: impl Iterator<Item = &'a f32>) -> f64 {
    values.map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fp16_packages_are_told_about_fp16_overflow() {
        let fp16 = non_finite(3, 8, Precision::Fp16).to_string();
        assert!(fp16.contains("step 3 of 8") && fp16.contains("fp16 activations can overflow"), "{fp16}");
        for precision in [Precision::Fp32, Precision::Bf16] {
            let message = non_finite(3, 8, precision).to_string();
            assert!(!message.contains("fp16") && message.contains("LoRA scales"), "{message}");
        }
    }

    /// diffusers' comparison: the step's float32 t_norm, as a Python float, above the caller's
    /// decimal. Checked end to end by the `cfg_truncation_boundary` golden.
    #[test]
    fn guidance_stops_where_diffusers_stops_it() {
        let t_norm = |t: f32| (1000.0f32 - t) / 1000.0;
        let guidance = |truncation| Guidance { scale: 3.0, normalization: 0.0, truncation };
        // float32 0.1 and 0.6 are above the decimals 0.1 and 0.6: guidance stops.
        assert_eq!(guidance(0.1).scale_at(t_norm(900.0)), 0.0);
        assert_eq!(guidance(0.6).scale_at(t_norm(400.0)), 0.0);
        // 0.5 and 0.25 are exact in float32: equal is not above.
        assert_eq!(guidance(0.5).scale_at(t_norm(500.0)), 3.0);
        assert_eq!(guidance(0.25).scale_at(t_norm(750.0)), 3.0);
        assert_eq!(guidance(0.1).scale_at(t_norm(950.0)), 3.0);
        // Truncation above 1 never stops it; no guidance stays none.
        assert_eq!(guidance(1.5).scale_at(1.0), 3.0);
        assert_eq!(Guidance { scale: 0.0, normalization: 0.0, truncation: 0.1 }.scale_at(0.9), 0.0);
    }
}
