//! Seeds for callers that asked for none.

use std::hash::{BuildHasher, Hasher};

/// 64 bits from the OS-seeded hasher and the clock: a fresh value per call, not reproducible
/// (which is the point: the seed drawn is reported, so the result can be).
pub(crate) fn os_seeded_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}
