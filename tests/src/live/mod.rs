//! Pieces of the live-frame benches (`cargo xtask bench forward` and `bench failover`): the
//! bench-only XDP object `forward-bench` loaded per namespace ([`station`]: a traffic generator
//! run with BPF_PROG_TEST_RUN in live-frames mode, and an XDP frame counter), the frames the
//! generator sends ([`stream`]), a namespace set up as a forwarding member ([`member`]), and
//! hasync agents run from the release binary ([`agent`]).

pub mod agent;
pub mod member;
pub mod series;
pub mod station;
pub mod stream;
