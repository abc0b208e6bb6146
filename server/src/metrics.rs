//! Prometheus text exposition (format 0.0.4) of the server's counters: queue depth and
//! generations in flight per model, requests by route and status, images, errors by kind, and
//! latency histograms per stage.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the latency histograms.
const BUCKETS: [f64; 16] =
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// The stages timed per generation, in the order they are shown.
pub const STAGES: [&str; 8] =
    ["queue_wait", "tokenize", "text_encode", "denoise", "vae_decode", "encode_output", "generation", "request"];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (bound, count) in BUCKETS.iter().zip(self.counts.iter_mut()) {
            if seconds <= *bound {
                *count += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

/// Gauges a model's queue keeps up to date.
#[derive(Default)]
pub struct ModelGauges {
    pub queued: AtomicI64,
    pub in_flight: AtomicI64,
    pub workers_alive: AtomicI64,
}

#[derive(Default)]
struct Counters {
    /// (route, status) -> requests
    requests: BTreeMap<(String, u16), u64>,
    /// kind -> errors
    errors: BTreeMap<&'static str, u64>,
    /// model -> images returned
    images: BTreeMap<String, u64>,
    /// (model, stage) -> seconds
    stages: BTreeMap<(String, &'static str), Histogram>,
}

#[derive(Default)]
pub struct Metrics {
    counters: Mutex<Counters>,
}

impl Metrics {
    fn counters(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn request(&self, route: &str, status: u16) {
        *self.counters().requests.entry((route.to_string(), status)).or_default() += 1;
    }

    pub fn error(&self, kind: &'static str) {
        *self.counters().errors.entry(kind).or_default() += 1;
    }

    pub fn images(&self, model: &str, n: u64) {
        *self.counters().images.entry(model.to_string()).or_default() += n;
    }

    pub fn stage(&self, model: &str, stage: &'static str, time: Duration) {
        self.counters().stages.entry((model.to_string(), stage)).or_default().observe(time.as_secs_f64());
    }

    /// The text `/metrics` serves; `models` lists each model's name and gauges.
    pub fn render(&self, models: &[(&str, &ModelGauges)], ready: bool, draining: bool) -> String {
        let c = self.counters();
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, get: &dyn Fn(&ModelGauges) -> i64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (model, g) in models {
                let _ = writeln!(out, "{name}{{model=\"{}\"}} {}", escape(model), get(g));
            }
        };
        gauge(&mut out, "zimage_queue_depth", "Requests waiting for a worker.", &|g| g.queued.load(Ordering::Relaxed));
        gauge(&mut out, "zimage_in_flight", "Generations running.", &|g| g.in_flight.load(Ordering::Relaxed));
        gauge(&mut out, "zimage_workers_alive", "Worker threads serving the model.", &|g| {
            g.workers_alive.load(Ordering::Relaxed)
        });
        let _ = writeln!(out, "# HELP zimage_ready 1 once every model is loaded.\n# TYPE zimage_ready gauge");
        let _ = writeln!(out, "zimage_ready {}", u8::from(ready));
        let _ = writeln!(out, "# HELP zimage_draining 1 after SIGTERM.\n# TYPE zimage_draining gauge");
        let _ = writeln!(out, "zimage_draining {}", u8::from(draining));

        let _ = writeln!(out, "# HELP zimage_requests_total HTTP requests by route and status.");
        let _ = writeln!(out, "# TYPE zimage_requests_total counter");
        for ((route, status), n) in &c.requests {
            let _ = writeln!(out, "zimage_requests_total{{route=\"{}\",status=\"{status}\"}} {n}", escape(route));
        }
        let _ = writeln!(out, "# HELP zimage_images_total Images returned.\n# TYPE zimage_images_total counter");
        for (model, n) in &c.images {
            let _ = writeln!(out, "zimage_images_total{{model=\"{}\"}} {n}", escape(model));
        }
        let _ =
            writeln!(out, "# HELP zimage_errors_total Failed requests by kind.\n# TYPE zimage_errors_total counter");
        for (kind, n) in &c.errors {
            let _ = writeln!(out, "zimage_errors_total{{kind=\"{kind}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP zimage_stage_seconds Time per stage of a generation request.");
        let _ = writeln!(out, "# TYPE zimage_stage_seconds histogram");
        for stage in STAGES {
            for ((model, _), h) in c.stages.iter().filter(|((_, s), _)| *s == stage) {
                let labels = format!("model=\"{}\",stage=\"{stage}\"", escape(model));
                for (bound, count) in BUCKETS.iter().zip(h.counts) {
                    let _ = writeln!(out, "zimage_stage_seconds_bucket{{{labels},le=\"{bound}\"}} {count}");
                }
                let _ = writeln!(out, "zimage_stage_seconds_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
                let _ = writeln!(out, "zimage_stage_seconds_sum{{{labels}}} {}", h.sum);
                let _ = writeln!(out, "zimage_stage_seconds_count{{{labels}}} {}", h.count);
            }
        }
        out
    }
}

/// A label value: backslash, quote and newline escaped.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_labels_escaped() {
        let m = Metrics::default();
        m.stage("a\"b", "denoise", Duration::from_millis(30));
        m.stage("a\"b", "denoise", Duration::from_millis(300));
        m.error("queue_full");
        m.request("/v1/images/generations", 429);
        let gauges = ModelGauges::default();
        gauges.queued.store(3, Ordering::Relaxed);
        let text = m.render(&[("a\"b", &gauges)], true, false);
        assert!(text.contains("zimage_queue_depth{model=\"a\\\"b\"} 3"), "{text}");
        assert!(text.contains("le=\"0.025\"} 0"), "{text}");
        assert!(text.contains("le=\"0.05\"} 1"), "{text}");
        assert!(text.contains("le=\"0.5\"} 2"), "{text}");
        assert!(text.contains("le=\"+Inf\"} 2"), "{text}");
        assert!(text.contains("zimage_stage_seconds_count{model=\"a\\\"b\",stage=\"denoise\"} 2"), "{text}");
        assert!(text.contains("zimage_errors_total{kind=\"queue_full\"} 1"), "{text}");
        assert!(text.contains("zimage_requests_total{route=\"/v1/images/generations\",status=\"429\"} 1"), "{text}");
        assert!(text.contains("zimage_ready 1"), "{text}");
    }
}
