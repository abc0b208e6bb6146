//! The `generation_defaults` section of a package manifest: the settings a model is meant to be
//! run with. Z-Image-Turbo (the section absent) is distilled for 8 steps without guidance; the
//! base model `Tongyi-MAI/Z-Image` is not distilled and needs many steps and classifier-free
//! guidance. Requests built for a package ([`GenerateRequest::for_package`](crate::GenerateRequest::for_package))
//! start from these; anything the caller sets explicitly wins.

use serde::Deserialize;

use crate::limits::{check_guidance, MAX_STEPS};

/// The recommended generation settings of a package.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct GenerationDefaults {
    /// Which member of the family the settings are for (`"turbo"`, `"base"`, or a name the
    /// exporter was given); informational.
    #[serde(default)]
    pub variant: Variant,
    pub steps: u32,
    pub guidance_scale: f32,
    #[serde(default)]
    pub cfg_normalization: f32,
    #[serde(default = "one")]
    pub cfg_truncation: f32,
}

/// The family member a package's defaults come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Variant {
    /// Z-Image-Turbo: 8 steps, no guidance.
    #[default]
    Turbo,
    /// Z-Image (base, not distilled).
    Base,
    /// Settings given to the exporter by hand.
    Custom,
}

fn one() -> f32 {
    1.0
}

impl Default for GenerationDefaults {
    /// Z-Image-Turbo's: 8 steps, no guidance (what packages without the section get).
    fn default() -> Self {
        GenerationDefaults {
            variant: Variant::Turbo,
            steps: 8,
            guidance_scale: 0.0,
            cfg_normalization: 0.0,
            cfg_truncation: 1.0,
        }
    }
}

impl GenerationDefaults {
    /// The same bounds a request must meet: a package cannot recommend what it would refuse.
    pub fn check(&self) -> Result<(), String> {
        if self.steps == 0 || self.steps > MAX_STEPS {
            return Err(format!("generation_defaults.steps {} is not within 1..={MAX_STEPS}", self.steps));
        }
        check_guidance(self.guidance_scale, self.cfg_normalization, self.cfg_truncation)
            .map_err(|e| format!("generation_defaults.{e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<GenerationDefaults, String> {
        let d: GenerationDefaults = serde_json::from_str(json).map_err(|e| e.to_string())?;
        d.check().map(|_| d)
    }

    #[test]
    fn base_section_parses_with_its_values() {
        let d = parse(r#"{"variant": "base", "steps": 50, "guidance_scale": 4.0, "cfg_normalization": 0.0, "cfg_truncation": 1.0}"#)
            .unwrap();
        assert_eq!(
            (d.variant, d.steps, d.guidance_scale, d.cfg_normalization, d.cfg_truncation),
            (Variant::Base, 50, 4.0, 0.0, 1.0)
        );
    }

    #[test]
    fn missing_optional_fields_take_the_neutral_values() {
        let d = parse(r#"{"steps": 28, "guidance_scale": 3.5}"#).unwrap();
        assert_eq!((d.variant, d.cfg_normalization, d.cfg_truncation), (Variant::Turbo, 0.0, 1.0));
    }

    #[test]
    fn out_of_range_and_unknown_values_are_refused() {
        for bad in [
            r#"{"steps": 0, "guidance_scale": 4.0}"#,
            r#"{"steps": 1001, "guidance_scale": 4.0}"#,
            r#"{"steps": 50, "guidance_scale": -1.0}"#,
            r#"{"steps": 50, "guidance_scale": 101.0}"#,
            r#"{"steps": 50, "guidance_scale": 4.0, "cfg_truncation": -0.5}"#,
            r#"{"steps": 50, "guidance_scale": 4.0, "cfg_normalization": 1000.0}"#,
            r#"{"steps": 50, "guidance_scale": 4.0, "sampler": "heun"}"#,
            r#"{"steps": 50, "guidance_scale": 4.0, "variant": "edit"}"#,
        ] {
            assert!(parse(bad).is_err(), "accepted {bad}");
        }
    }
}
