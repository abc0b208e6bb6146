//! The command's memory allocator policy. An application may set one; the SDK, a library that
//! lives in other people's processes, never does.
//!
//! glibc serves allocations below its mmap threshold (raised at run time up to 32 MiB) from heaps
//! it seldom gives back to the system. The VAE decoder's many 1-32 MiB activations, freed and
//! reallocated in changing sizes, fragment those heaps, and the holes count in the peak RSS.
//! Mapping every allocation of 1 MiB and more on its own returns each one to the system when it
//! is freed. Measured with `zimage bench` on the mid-size model at 512x512 (2 threads): peak RSS
//! 2504 -> 2337 MiB, with `--winograd-vae` 3008 -> 2548 MiB, and no difference in time beyond
//! the machine's noise. Embedding applications on glibc can do the same (`mallopt`).

/// Allocations from this size up get their own mapping.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MAP_FROM_BYTES: libc::c_int = 1 << 20;

/// Call once at start-up, before other threads exist.
pub fn map_large_allocations() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's tuning parameters; no memory is touched. A failure
    // (return value 0) leaves glibc's defaults, which are correct, only larger.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MAP_FROM_BYTES);
    }
}
