//! Flow-matching Euler schedule, computed in float32 exactly as diffusers'
//! `FlowMatchEulerDiscreteScheduler.set_timesteps` does on the Z-Image pipelines' path
//! (sigmas given as `linspace(1, 1/N, N)`, `mu` from the image sequence length).

use serde::Deserialize;

/// The scheduler section of a package manifest (a copy of `scheduler_config.json`).
/// Defaults are diffusers' defaults for fields the config leaves out.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct SchedulerConfig {
    #[serde(default = "d_train_timesteps")]
    pub num_train_timesteps: u32,
    #[serde(default = "d_shift")]
    pub shift: f64,
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default = "d_base_shift")]
    pub base_shift: f64,
    #[serde(default = "d_max_shift")]
    pub max_shift: f64,
    #[serde(default = "d_base_seq")]
    pub base_image_seq_len: u32,
    #[serde(default = "d_max_seq")]
    pub max_image_seq_len: u32,
    #[serde(default)]
    pub shift_terminal: Option<f64>,
    #[serde(default = "d_time_shift_type")]
    pub time_shift_type: String,
    #[serde(default)]
    pub invert_sigmas: bool,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
    #[serde(default)]
    pub stochastic_sampling: bool,
}

fn d_train_timesteps() -> u32 {
    1000
}
fn d_shift() -> f64 {
    1.0
}
fn d_base_shift() -> f64 {
    0.5
}
fn d_max_shift() -> f64 {
    1.15
}
fn d_base_seq() -> u32 {
    256
}
fn d_max_seq() -> u32 {
    4096
}
fn d_time_shift_type() -> String {
    "exponential".into()
}

impl SchedulerConfig {
    /// Z-Image-Turbo's published scheduler config.
    pub fn z_image_turbo() -> Self {
        serde_json::from_str(r#"{"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": false}"#)
            .expect("static config parses")
    }

    /// Refuses configurations this runtime does not implement, rather than running them wrong.
    pub fn check(&self) -> Result<(), String> {
        let unsupported = [
            ("invert_sigmas", self.invert_sigmas),
            ("use_karras_sigmas", self.use_karras_sigmas),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
            ("stochastic_sampling", self.stochastic_sampling),
        ];
        if let Some((name, _)) = unsupported.iter().find(|(_, on)| *on) {
            return Err(format!("scheduler option {name} is not supported by zimage"));
        }
        if self.time_shift_type != "exponential" && self.time_shift_type != "linear" {
            return Err(format!("scheduler time_shift_type {:?} is not supported", self.time_shift_type));
        }
        if self.num_train_timesteps == 0 || !self.shift.is_finite() || self.shift <= 0.0 {
            return Err("scheduler needs num_train_timesteps > 0 and a finite shift > 0".into());
        }
        if self.use_dynamic_shifting && self.max_image_seq_len == self.base_image_seq_len {
            return Err("scheduler base_image_seq_len equals max_image_seq_len".into());
        }
        if matches!(self.shift_terminal, Some(t) if !(t.is_finite() && t < 1.0)) {
            return Err("scheduler shift_terminal must be finite and < 1".into());
        }
        Ok(())
    }

    /// diffusers' `calculate_shift`: the dynamic-shift exponent for an image of this many
    /// patches.
    pub fn mu(&self, image_seq_len: usize) -> f64 {
        let m = (self.max_shift - self.base_shift) / (self.max_image_seq_len as f64 - self.base_image_seq_len as f64);
        let b = self.base_shift - m * self.base_image_seq_len as f64;
        image_seq_len as f64 * m + b
    }
}

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
        if let Some(terminal) = config.shift_terminal {
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
    fn refuses_unsupported_options() {
        let mut c = SchedulerConfig::z_image_turbo();
        c.use_karras_sigmas = true;
        assert!(c.check().unwrap_err().contains("use_karras_sigmas"));
    }
}
