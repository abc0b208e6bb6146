//! Previews: what the image would look like if the denoising stopped here. After a step, the
//! flow-matching model's estimate of the clean latents is recovered from the latents before and
//! after the step (no extra transformer call, no change to the step graph), and the VAE decodes
//! it. Requested with `GenerateRequest::previews` / `EditRequest::previews`, delivered in
//! [`Progress::preview`](super::request::Progress).

use std::time::{Duration, Instant};

use ndarray::{Array4, Zip};

use super::request::Progress;
use crate::error::Result;
use crate::image_io::RgbImage;

/// The steps (1-based, counted over the steps that run) after which a preview is made: `count`
/// evenly spaced ones before the last step (the last step's result is the generation itself),
/// at most one per step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PreviewSteps {
    steps: Vec<usize>,
}

impl PreviewSteps {
    pub fn new(count: u32, total: usize) -> PreviewSteps {
        let slots = total.saturating_sub(1);
        let count = (count as usize).min(slots);
        // Step k * total / (count + 1), rounded up, for k = 1..=count: distinct and below
        // `total` because count < total.
        let steps = (1..=count).map(|k| (k * total).div_ceil(count + 1)).collect();
        PreviewSteps { steps }
    }

    pub fn none() -> PreviewSteps {
        PreviewSteps::default()
    }

    pub fn wants(&self, step: usize) -> bool {
        self.steps.contains(&step)
    }

    #[cfg(test)]
    fn steps(&self) -> &[usize] {
        &self.steps
    }
}

/// The latents around one step: `before` at noise level `sigma`, `after` at `sigma_next`.
pub(crate) struct AroundStep<'a> {
    pub before: &'a Array4<f32>,
    pub after: &'a Array4<f32>,
    pub sigma: f32,
    pub sigma_next: f32,
}

impl AroundStep<'_> {
    /// The estimate of the clean latents: with `x = (1 - s) x0 + s n` along the flow, the step
    /// moved by `dt * v` with `v = n - x0`, so `x0 = after - sigma_next * (after - before) / dt`.
    /// Where inpainting re-imposed the known picture (noised to each step's level), this gives
    /// that picture's latents exactly.
    pub fn denoised(&self) -> Array4<f32> {
        let dt = self.sigma_next - self.sigma;
        let mut estimate = self.after.clone();
        if dt == 0.0 {
            return estimate;
        }
        let factor = self.sigma_next / dt;
        Zip::from(&mut estimate).and(self.before).for_each(|x, &b| *x -= factor * (*x - b));
        estimate
    }
}

/// What a denoising loop reports after each step.
pub(crate) struct StepDone<'a> {
    /// Steps done (1-based) and steps in all.
    pub step: usize,
    pub total: usize,
    /// The latents around the step, when [`StepObserver::wants_latents`] asked for them.
    pub around: Option<AroundStep<'a>>,
}

/// The caller's side of a denoising loop: which steps it wants the latents of, and what it
/// does after each step (progress, previews). `Ok(false)` stops the run as cancelled.
pub(crate) struct StepObserver<'a> {
    pub previews: PreviewSteps,
    pub on_step: &'a mut dyn FnMut(StepDone<'_>) -> Result<bool>,
}

impl StepObserver<'_> {
    pub fn wants_latents(&self, step: usize) -> bool {
        self.previews.wants(step)
    }

    pub fn done(&mut self, done: StepDone<'_>) -> Result<bool> {
        (self.on_step)(done)
    }
}

/// The previews' decoder: latents to one picture per image.
pub(crate) type PreviewDecoder<'a> = dyn FnMut(&Array4<f32>) -> Result<Vec<RgbImage>> + 'a;

/// A generation's or an edit's reports to the caller's progress callback, with the previews
/// decoded (made by `Pipeline::step_reporter`).
pub(crate) struct StepReporter<'a, 'p> {
    pub(super) progress: Option<&'p mut (dyn FnMut(&Progress) -> bool + 'p)>,
    pub(super) started: Instant,
    pub(super) decode: Box<PreviewDecoder<'a>>,
    /// Time spent decoding previews.
    pub preview_time: Duration,
}

impl StepReporter<'_, '_> {
    /// The steps to preview for a request asking `count` over `total` steps: none without a
    /// progress callback (nobody would see them).
    pub fn preview_steps(&self, count: u32, total: usize) -> PreviewSteps {
        if self.progress.is_some() {
            PreviewSteps::new(count, total)
        } else {
            PreviewSteps::none()
        }
    }

    pub fn step_done(&mut self, done: StepDone<'_>) -> Result<bool> {
        let Some(callback) = self.progress.as_deref_mut() else {
            return Ok(true);
        };
        let preview = match &done.around {
            Some(around) => {
                let started = Instant::now();
                let pictures = (self.decode)(&around.denoised())?;
                self.preview_time += started.elapsed();
                Some(pictures)
            }
            None => None,
        };
        Ok(callback(&Progress { step: done.step, total_steps: done.total, elapsed: self.started.elapsed(), preview }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_are_spread_over_the_steps_before_the_last() {
        assert_eq!(PreviewSteps::new(0, 8).steps(), &[] as &[usize]);
        assert_eq!(PreviewSteps::new(1, 8).steps(), &[4]);
        assert_eq!(PreviewSteps::new(2, 8).steps(), &[3, 6]);
        assert_eq!(PreviewSteps::new(3, 8).steps(), &[2, 4, 6]);
        assert_eq!(PreviewSteps::new(7, 8).steps(), &[1, 2, 3, 4, 5, 6, 7]);
        // More than there are steps: one per step before the last.
        assert_eq!(PreviewSteps::new(u32::MAX, 4).steps(), &[1, 2, 3]);
        assert_eq!(PreviewSteps::new(3, 1).steps(), &[] as &[usize]);
        assert_eq!(PreviewSteps::new(3, 0).steps(), &[] as &[usize]);
        assert!(PreviewSteps::new(2, 8).wants(3) && !PreviewSteps::new(2, 8).wants(8));
    }

    #[test]
    fn the_estimate_recovers_the_clean_latents_of_a_straight_flow() {
        let x0 = Array4::from_shape_fn((1, 2, 3, 3), |(_, c, y, x)| (c as f32 - y as f32 * 0.5 + x as f32) * 0.3);
        let noise = Array4::from_shape_fn((1, 2, 3, 3), |(_, c, y, x)| ((c * 9 + y * 3 + x) as f32 * 0.77).sin());
        let at = |s: f32| &x0 * (1.0 - s) + &noise * s;
        for (sigma, sigma_next) in [(1.0, 0.9), (0.6, 0.35), (0.2, 0.0)] {
            let (before, after) = (at(sigma), at(sigma_next));
            let estimate = AroundStep { before: &before, after: &after, sigma, sigma_next }.denoised();
            let worst = (&estimate - &x0).iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert!(worst < 1e-5, "sigma {sigma} -> {sigma_next}: {worst}");
        }
        // A step that does not move the noise level gives the latents as they are.
        let same = at(0.5);
        let estimate = AroundStep { before: &same, after: &same, sigma: 0.5, sigma_next: 0.5 }.denoised();
        assert_eq!(estimate, same);
    }
}
