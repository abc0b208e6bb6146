//! Peak GPU memory of this process while `zimage bench` runs, read from NVML (the driver's
//! management library, loaded at run time: on a machine without the NVIDIA driver the report
//! says null).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::{Device, Nvml};
use serde_json::{json, Value};

const INTERVAL: Duration = Duration::from_millis(20);

/// Samples every `INTERVAL` on its own thread until [`DeviceMemorySampler::finish`].
pub struct DeviceMemorySampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Peak>,
}

#[derive(Default)]
struct Peak {
    /// This process's memory summed over all GPUs, as the driver accounts it.
    process: Option<u64>,
    /// All GPUs' used memory above what was used when sampling began: the fallback where the
    /// driver lists no processes (some containers hide their PIDs from it).
    device_above_baseline: Option<u64>,
}

impl DeviceMemorySampler {
    /// None when NVML cannot be loaded or sees no GPU.
    pub fn start() -> Option<DeviceMemorySampler> {
        let nvml = Nvml::init().ok()?;
        if nvml.device_count().ok()? == 0 {
            return None;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let pid = std::process::id();
            let count = nvml.device_count().unwrap_or(0);
            let devices: Vec<Device> = (0..count).filter_map(|index| nvml.device_by_index(index).ok()).collect();
            let baseline = device_used(&devices);
            let mut peak = Peak::default();
            while !flag.load(Ordering::Relaxed) {
                if let Some(bytes) = process_used(&devices, pid) {
                    peak.process = peak.process.max(Some(bytes));
                }
                if let (Some(now), Some(base)) = (device_used(&devices), baseline) {
                    peak.device_above_baseline = peak.device_above_baseline.max(Some(now.saturating_sub(base)));
                }
                std::thread::sleep(INTERVAL);
            }
            peak
        });
        Some(DeviceMemorySampler { stop, thread })
    }

    /// Stops sampling; `{"bytes": N, "source": "process" | "device_above_baseline"}` or null.
    pub fn finish(self) -> Value {
        self.stop.store(true, Ordering::Relaxed);
        let peak = self.thread.join().unwrap_or_default();
        match (peak.process, peak.device_above_baseline) {
            (Some(bytes), _) => json!({ "bytes": bytes, "source": "process" }),
            (None, Some(bytes)) => json!({ "bytes": bytes, "source": "device_above_baseline" }),
            (None, None) => Value::Null,
        }
    }
}

fn process_used(devices: &[Device], pid: u32) -> Option<u64> {
    let mut total = None;
    for device in devices {
        for process in device.running_compute_processes().ok()? {
            if let (true, UsedGpuMemory::Used(bytes)) = (process.pid == pid, process.used_gpu_memory) {
                total = Some(total.unwrap_or(0) + bytes);
            }
        }
    }
    total
}

fn device_used(devices: &[Device]) -> Option<u64> {
    devices.iter().map(|device| device.memory_info().ok().map(|info| info.used)).sum()
}
