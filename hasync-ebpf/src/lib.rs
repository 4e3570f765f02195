//! hasync's XDP fast path as a library, so the product program (`main.rs`) and the bench-only
//! program (`bin/fastpath-bench.rs`) run exactly the same code.
#![no_std]

pub mod maps;
pub mod parse;
pub mod session;
