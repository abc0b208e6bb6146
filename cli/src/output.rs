//! Helpers for what the subcommands print.

/// Seconds as a JSON number.
pub fn secs(d: std::time::Duration) -> f64 {
    d.as_secs_f64()
}
