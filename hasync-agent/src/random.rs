//! Random values that need no cryptographic strength (seeds, identifiers that tell runs
//! apart), without a file to open: the standard library seeds each `RandomState` from the
//! kernel's random source.

use std::hash::{BuildHasher as _, Hasher as _};

/// A fresh random `u64`.
pub fn random_u64() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}
