//! The scheduler section of a package manifest: diffusers' `FlowMatchEulerDiscreteScheduler`
//! configuration, and the checks that refuse options this runtime does not implement.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_unsupported_options() {
        let mut c = SchedulerConfig::z_image_turbo();
        c.use_karras_sigmas = true;
        assert!(c.check().unwrap_err().contains("use_karras_sigmas"));
    }
}
