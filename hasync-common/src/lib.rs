//! Types shared by the hasync XDP program (`hasync-ebpf`) and its userspace agent.
//!
//! Everything here is `#[repr(C)]`, explicitly padded and size-checked at compile time, because
//! the kernel and userspace read the same bytes. Userspace-only impls live behind the `user`
//! feature.
#![no_std]
#![warn(missing_docs)]

pub mod clock;
pub mod config;
pub mod conflict;
pub mod counters;
pub mod event;
pub mod fib;
pub mod flow;
pub mod ids;
pub mod maps;
pub mod member;
pub mod session;
pub mod table_programs;
pub mod tcp_window;

pub use clock::ClockSample;
pub use config::{
    DatapathConfig, Forwarding, MalformedAction, OtherProtocols, Policy, ZoneBinding,
};
pub use counters::{
    Counter, Counters, LogNote, LogNoteKind, LogRequest, COUNTER_COUNT, LOG_NOTE_KINDS,
};
pub use event::{Event, EventKind};
pub use fib::{FibEntry, FibKey, IngressMac};
pub use flow::{Family, FlowKey, FragmentKey};
pub use ids::{ClusterId, MemberId, ZoneId};
pub use member::{MemberEntry, ReplicaRoom};
pub use session::{EmbryoSlot, Session, SessionFlags, State, STATE_COUNT};
pub use table_programs::{
    ApplyHeader, ApplyOp, ApplyOutcome, ApplyRecord, ApplySource, ReadHeader, ReadSlot,
};
pub use tcp_window::TcpSegment;

/// Asserts at compile time that a shared type has exactly the expected size.
#[macro_export]
macro_rules! assert_size {
    ($t:ty, $size:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $size);
    };
}

#[cfg(feature = "user")]
mod pod {
    //! aya's plain-data marker, granted only to types whose `bytemuck::Pod` derive checked
    //! that they are plain data (`#[repr(C)]` or transparent, integers only, no padding).
    use super::*;

    macro_rules! aya_pod {
        ($($t:ty),* $(,)?) => {$(
            const _: () = {
                const fn checked<T: bytemuck::Pod>() {}
                checked::<$t>()
            };
            // SAFETY: `$t: bytemuck::Pod` (checked just above): any bit pattern is a valid
            // value and it has no padding, which is what `aya::Pod` asks.
            unsafe impl aya::Pod for $t {}
        )*};
    }

    aya_pod!(
        FlowKey,
        Session,
        Event,
        Counters,
        DatapathConfig,
        MemberEntry,
        ReplicaRoom,
        ZoneId,
        ApplyRecord,
        ApplyHeader,
        ReadHeader,
        ReadSlot,
        EmbryoSlot,
        FragmentKey,
        ZoneBinding,
        FibKey,
        FibEntry,
        IngressMac,
        ClockSample,
    );
}
