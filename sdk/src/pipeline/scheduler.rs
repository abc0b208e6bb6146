//! Flow-matching Euler schedule, computed in float32 exactly as diffusers'
//! `FlowMatchEulerDiscreteScheduler.set_timesteps` does on the Z-Image pipelines' path
//! (sigmas given as `linspace(1, 1/N, N)`, `mu` from the image sequence length).

use crate::error::{Error, Result};
use crate::package::scheduler_config::SchedulerConfig;

/// Sigmas (N + 1 values, ending in 0) and timesteps (N values, `sigma * num_train_timesteps`).
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub sigmas: Vec<f32>,
    pub timesteps: Vec<f32>,
}

impl Schedule {
    /// The schedule for `steps` denoising steps of an image of `image_seq_len` patches.
    pub fn new(config: &SchedulerConfig, steps: usize, image_seq_len: usize) -> Schedule {
        let base = linspace_f32(1.0, 1.0 / steps as f32, steps);
        let mut sigmas: Vec<f32> = if config.use_dynamic_shifting {
            let mu = config.mu(image_seq_len);
            // numpy treats the Python scalars as float32 here (NEP 50 weak scalars).
            let m = if config.time_shift_type == "linear" { mu as f32 } else { mu.exp() as f32 };
            base.iter().map(|&t| m / (m + (1.0f32 / t - 1.0f32).powf(1.0))).collect()
        } else {
            let shift = config.shift as f32;
            let shift_minus_one = (config.shift - 1.0) as f32;
            base.iter().map(|&s| shift * s / (1.0f32 + shift_minus_one * s)).collect()
        };
        // diffusers tests `if self.config.shift_terminal:`, so 0.0 is off as None is.
        if let Some(terminal) = config.shift_terminal.filter(|&t| t != 0.0) {
            let last = 1.0f32 - *sigmas.last().expect("steps > 0");
            let scale = last / (1.0 - terminal) as f32;
            for s in &mut sigmas {
                *s = 1.0f32 - (1.0f32 - *s) / scale;
            }
        }
        let train = config.num_train_timesteps as f32;
        let timesteps = sigmas.iter().map(|&s| s * train).collect();
        sigmas.push(0.0);
        Schedule { sigmas, timesteps }
    }

    /// [`Schedule::new`] for a request: a schedule with a non-finite sigma (scheduler settings
    /// at the edge of float range, or `shift_terminal` with one step: 0 / 0) is refused before
    /// any inference, rather than found as non-finite latents after the first step.
    pub fn for_request(config: &SchedulerConfig, steps: usize, image_seq_len: usize) -> Result<Schedule> {
        let schedule = Schedule::new(config, steps, image_seq_len);
        if schedule.sigmas.iter().chain(&schedule.timesteps).any(|v| !v.is_finite()) {
            return Err(Error::invalid(format!(
                "the package's scheduler settings give a non-finite schedule for {steps} steps (sigmas {:?}); \
                 try more steps, or check the manifest's scheduler section (shift {}, shift_terminal {:?})",
                schedule.sigmas, config.shift, config.shift_terminal
            )));
        }
        // A noise level outside [0, 1], or one that rises, is no flow-matching schedule (a
        // negative shift gives one, and diffusers runs it); the images would be meaningless.
        // The tolerance covers float32 rounding of `shift / (1 + (shift - 1))` at sigma 1.
        let in_range = schedule.sigmas.iter().all(|&s| (0.0..=1.0 + 1e-5).contains(&s));
        let falling = schedule.sigmas.windows(2).all(|w| w[1] <= w[0] + 1e-6);
        if !(in_range && falling) {
            return Err(Error::invalid(format!(
                "the package's scheduler settings give noise levels outside [0, 1] or rising for {steps} steps \
                 (sigmas {:?}); check the manifest's scheduler section",
                schedule.sigmas
            )));
        }
        Ok(schedule)
    }

    pub fn len(&self) -> usize {
        self.timesteps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.timesteps.is_empty()
    }

    /// The transformer's timestep input at step `i`: `(1000 - t) / 1000` in float32.
    pub fn model_timestep(&self, i: usize) -> f32 {
        (1000.0f32 - self.timesteps[i]) / 1000.0f32
    }
}

/// `torch.linspace(start, end, n)` for float32 on CPU, bit for bit: torch computes each value
/// with a fused multiply-add from whichever end is nearer.
pub fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let halfway = n / 2;
    (0..n)
        .map(|i| if i < halfway { step.mul_add(i as f32, start) } else { (-step).mul_add((n - 1 - i) as f32, end) })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turbo_eight_steps_match_the_published_table() {
        let s = Schedule::new(&SchedulerConfig::z_image_turbo(), 8, 4096);
        let want = [1.0, 0.9545454, 0.9, 0.8333333, 0.75, 0.6428571, 0.5, 0.3, 0.0];
        for (a, b) in s.sigmas.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{:?}", s.sigmas);
        }
        let t: Vec<f32> = (0..8).map(|i| s.model_timestep(i)).collect();
        assert!((t[7] - 0.7).abs() < 1e-6 && t[0] == 0.0, "{t:?}");
    }

    #[test]
    fn a_non_finite_schedule_is_refused_for_the_request() {
        let turbo = SchedulerConfig::z_image_turbo();
        assert_eq!(Schedule::for_request(&turbo, 8, 4096).unwrap(), Schedule::new(&turbo, 8, 4096));
        // shift_terminal rescales by 1 - sigma_last, which is 0 for one step: 0 / 0.
        let terminal = SchedulerConfig { shift_terminal: Some(0.5), ..turbo.clone() };
        let e = Schedule::for_request(&terminal, 1, 4096).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidRequest, "{e}");
        assert!(e.to_string().contains("for 1 steps"), "{e}");
        assert!(Schedule::for_request(&terminal, 2, 4096).is_ok());
        // shift_terminal 0.0 is off in diffusers (a falsy value): the plain schedule, also for
        // one step (it gave [1, 0.8, 0.5, 0, 0] for 4 steps, and 0 / 0 for one).
        let zero = SchedulerConfig { shift_terminal: Some(0.0), ..turbo.clone() };
        assert_eq!(Schedule::for_request(&zero, 4, 4096).unwrap(), Schedule::new(&turbo, 4, 4096));
        assert_eq!(Schedule::for_request(&zero, 1, 4096).unwrap(), Schedule::new(&turbo, 1, 4096));
        // A shift at the edge of float range overflows in float32 (inf / inf).
        let huge = SchedulerConfig { shift: 1e308, ..turbo };
        assert!(huge.check().is_ok(), "finite, so the manifest check lets it through");
        assert_eq!(Schedule::for_request(&huge, 8, 4096).unwrap_err().kind(), crate::ErrorKind::InvalidRequest);
    }

    /// A finite schedule that is no flow (noise levels above 1, below 0, or rising) is refused;
    /// legitimate shifts of every kind pass, also where float32 rounds sigma 1 a little above 1.
    #[test]
    fn a_schedule_outside_the_flow_is_refused() {
        let turbo = SchedulerConfig::z_image_turbo();
        let linear_negative = SchedulerConfig {
            use_dynamic_shifting: true,
            time_shift_type: "linear".into(),
            base_shift: -0.5,
            max_shift: -0.5,
            ..turbo.clone()
        };
        let e = Schedule::for_request(&linear_negative, 4, 4096).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidRequest, "{e}");
        assert!(e.to_string().contains("outside [0, 1] or rising"), "{e}");
        let negative = SchedulerConfig { shift: -0.5, ..turbo.clone() };
        assert!(Schedule::for_request(&negative, 8, 4096).is_err());
        for shift in [0.3, 0.7, 1.0, 3.0, 6.0, 1e4] {
            let config = SchedulerConfig { shift, ..turbo.clone() };
            for steps in [1, 2, 8, 50, 1000] {
                assert!(Schedule::for_request(&config, steps, 4096).is_ok(), "shift {shift}, {steps} steps");
            }
        }
        let dynamic = SchedulerConfig { use_dynamic_shifting: true, ..turbo.clone() };
        let terminal = SchedulerConfig { shift_terminal: Some(0.02), ..turbo };
        for config in [dynamic, terminal] {
            for seq in [16, 256, 4096, 65536] {
                assert!(Schedule::for_request(&config, 8, seq).is_ok(), "{config:?} at {seq}");
            }
        }
    }
}
