//! Helpers for hasync's cross-crate tests: a frame builder, a `BPF_PROG_TEST_RUN` driver, the
//! packet fixture runner, network-namespace labs and the fuzz targets' checks. The tests
//! themselves live in `tests/`.

pub mod build;
pub mod chaos;
pub mod cluster;
pub mod fixture;
pub mod forwarder;
pub mod frame;
pub mod fuzz;
pub mod interrupt;
pub mod live;
pub mod netns;
pub mod sockets;
pub mod stats;
pub mod testrun;
