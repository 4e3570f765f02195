//! Types shared by the hasync XDP program (`hasync-ebpf`) and its userspace agent.
//!
//! Everything here is `#[repr(C)]`, explicitly padded and size-checked at compile time, because
//! the kernel and userspace read the same bytes. Userspace-only impls live behind the `user`
//! feature.
#![no_std]

pub mod config;
pub mod counters;
pub mod event;
pub mod flow;
pub mod ids;
pub mod install;
pub mod maps;
pub mod member;
pub mod session;

pub use config::{DatapathConfig, MalformedAction, Policy};
pub use counters::{Counter, Counters, COUNTER_COUNT};
pub use event::{Event, EventKind};
pub use flow::{Family, FlowKey};
pub use ids::{MemberId, ZoneId};
pub use install::{
    InstallHeader, InstallOp, InstallOutcome, InstallRecord, PruneHeader, ReadHeader, ReadSlot,
};
pub use member::MemberEntry;
pub use session::{Session, SessionFlags, State, STATE_COUNT};

/// Asserts at compile time that a shared type has exactly the expected size.
#[macro_export]
macro_rules! assert_size {
    ($t:ty, $size:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $size);
    };
}

#[cfg(feature = "user")]
mod pod {
    //! The shared types are plain old data: every bit pattern is a valid value.
    use super::*;

    // SAFETY: all of these are #[repr(C)] / #[repr(transparent)], contain only integers and
    // arrays of integers, and have no implicit padding (checked by `assert_size!`).
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Session {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for DatapathConfig {}
    unsafe impl aya::Pod for MemberEntry {}
    unsafe impl aya::Pod for ZoneId {}
    unsafe impl aya::Pod for InstallRecord {}
    unsafe impl aya::Pod for InstallHeader {}
    unsafe impl aya::Pod for ReadHeader {}
    unsafe impl aya::Pod for ReadSlot {}
    unsafe impl aya::Pod for PruneHeader {}
}
