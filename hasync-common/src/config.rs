//! The CONFIG map: one entry the agent fills before traffic is processed.

use crate::{ids::MemberId, session::STATE_COUNT};

/// What to do with a TCP packet that is not a SYN and has no session.
#[repr(u8)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Policy {
    /// Drop it (the default, as a stateful firewall does).
    #[default]
    Strict = 0,
    /// Pass it, counted, without creating a session.
    Loose = 1,
}

/// What to do with a truncated or malformed frame (it is counted by reason either way).
#[repr(u8)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MalformedAction {
    /// Drop it (the default).
    #[default]
    Drop = 0,
    /// Pass it, untracked.
    Pass = 1,
}

/// What a zone does with IP protocols the datapath does not track (GRE, ESP, AH, SCTP, OSPF,
/// ...): the ones that are neither TCP, UDP, ICMP nor ICMPv6.
#[repr(u8)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OtherProtocols {
    /// As the [`Policy`] says: strict drops them, loose passes them.
    #[default]
    ByPolicy = 0,
    /// Drop them (counted).
    Drop = 1,
    /// Pass them untracked (counted).
    Pass = 2,
}

/// The value of the ZONES map: the zone of an ingress interface and the zone's rules.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ZoneBinding {
    /// The zone.
    pub zone: crate::ZoneId,
    /// An [`OtherProtocols`] as `u8`.
    pub other_protocols: u8,
    /// [`ZoneBinding::VWIRE`], [`ZoneBinding::NON_IP_DROP`] and
    /// [`ZoneBinding::NO_ROUTE_CHECK`] bits.
    pub flags: u8,
}
crate::assert_size!(ZoneBinding, 4);

impl ZoneBinding {
    /// The interface is one end of a virtual wire: what passes is redirected to the other end
    /// (VWIRE_PORTS), never to the kernel.
    pub const VWIRE: u8 = 1 << 0;
    /// On a virtual wire: non-IP frames (ARP, LLDP, STP, ...) are dropped instead of crossing.
    pub const NON_IP_DROP: u8 = 1 << 1;
    /// A zone whose flows' first packets are not checked against the routing table
    /// (`route_check = false`): their replies are bound to the zone of the first reply, and
    /// neither their source (reverse path) nor hairpins are checked.
    pub const NO_ROUTE_CHECK: u8 = 1 << 2;

    /// `zone` with the policy's rules.
    pub const fn new(zone: crate::ZoneId) -> Self {
        ZoneBinding {
            zone,
            other_protocols: OtherProtocols::ByPolicy as u8,
            flags: 0,
        }
    }

    /// Is `bit` (one of the constants above) set?
    #[inline(always)]
    pub const fn has(self, bit: u8) -> bool {
        self.flags & bit != 0
    }

    /// Are the first packets that come in through this binding checked against the routing
    /// table (a zone, neither a virtual wire's end nor `route_check = false`)?
    #[inline(always)]
    pub fn checks_routes(self) -> bool {
        self.zone != crate::ZoneId::NONE
            && !self.has(Self::VWIRE)
            && !self.has(Self::NO_ROUTE_CHECK)
    }
}

/// Who forwards the packets of established sessions.
#[repr(u8)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Forwarding {
    /// The kernel (the program passes them; the default).
    #[default]
    Kernel = 0,
    /// The XDP program, after a FIB lookup (cached in FIB_CACHE), with a DEVMAP redirect;
    /// what it should not decide still goes to the kernel, counted by reason.
    Xdp = 1,
}

/// A state's refresh interval is its timeout divided by this ([`DatapathConfig::refresh_ns`])...
pub const REFRESH_SHARE: u64 = 8;
/// ...and at most this, in nanoseconds.
pub const REFRESH_MAX_NS: u64 = 30_000_000_000;
/// A session is also refreshed when the byte count of a direction crosses a multiple of 2 to
/// this power (1 GiB): a direction's sequence numbers move by no more than its bytes, so a
/// replica's stay less than 2^31 behind its owner's however fast the flow (a taking-over
/// member re-learns only numbers ahead of its replica's, by less than 2^31).
pub const REFRESH_BYTES_SHIFT: u32 = 30;

/// [`DatapathConfig::claim_quiet_ms`] by default: the default keepalive threshold.
pub const DEFAULT_CLAIM_QUIET_MS: u32 = 10_000;

/// How long after a peer became alive here (a partition healed, a stop or a restart ended),
/// or this agent ran again after a stall its peers may have taken for its death, the agent
/// keeps [`DatapathConfig::claims_open`] set, so that records settle claims by
/// version alone, as before the rule (`crate::conflict::claimable`): what each side took over
/// while the two could not see each other arrives in the full syncs after the return, both
/// sides' owners alive and their flows live.
pub const CLAIMS_OPEN_AFTER_RETURN_MS: u64 = 60_000;

/// Datapath configuration. While `local_member` is 0 (not configured yet) the program passes
/// everything untracked.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct DatapathConfig {
    /// Idle timeout per [`crate::State`], in nanoseconds.
    pub timeouts_ns: [u64; STATE_COUNT],
    /// The floor of the interval between two refresh events of one session, in nanoseconds:
    /// a state's own interval is longer when its timeout is, and shorter only when the floor
    /// is more than half the timeout ([`DatapathConfig::refresh_ns`]).
    pub refresh_interval_ns: u64,
    /// This member's id, owner of the sessions it creates; [`MemberId::NONE`] until the agent
    /// configures the datapath.
    pub local_member: MemberId,
    /// A [`Policy`] as `u8`.
    pub policy: u8,
    /// A [`MalformedAction`] as `u8`.
    pub malformed: u8,
    /// A [`Forwarding`] as `u8`.
    pub forwarding: u8,
    /// Slots of each CPU's part of the EMBRYOS ring: embryonic sessions admitted on one CPU
    /// that the table holds at most (0: no limit, nothing is evicted). Set by the agent from
    /// the map it loaded.
    pub embryo_slots: u32,
    /// Slots of each replica part of the EMBRYOS ring: one part per member id, holding that
    /// member's embryonic sessions copied here (0: no limit). Set by the agent like
    /// `embryo_slots`, as large as this member's own parts together, so that a peer with the
    /// same geometry is mirrored slot for slot.
    pub embryo_replica_slots: u32,
    /// Nanoseconds per jiffy (the kernel's tick): the program reads its clock as
    /// [`DatapathConfig::jiffies_ns`], so session times stay in the agent's monotonic clock
    /// without a helper call per packet. 0 (not measured, or an agent that predates it): the
    /// program reads the kernel's coarse monotonic clock instead. Set by the agent, which
    /// measures it at load time.
    pub ns_per_jiffy: u32,
    /// What to add to `jiffies * ns_per_jiffy` (wrapping) to read the agent's monotonic clock.
    /// Set by the agent with `ns_per_jiffy`.
    pub jiffies_offset_ns: u64,
    /// 1 when some interface is one end of a virtual wire (its ZONES entry says which): only
    /// then does the program read the ingress binding of every frame it passes.
    pub vwire: u8,
    /// Replica parts in the EMBRYOS ring: member ids 1 to this have one each (a replica of a
    /// member past it is refused while embryonic). Set by the agent.
    pub embryo_replica_parts: u8,
    /// 1: the FIB cache of the XDP forwarding keys on the source address as well as the
    /// destination (some rule or IPv6 route selects by source here); 0: on the destination
    /// (and the ingress interface) alone, so flows from many sources to one destination share
    /// an entry. Set by the agent, which watches the rules and routes; 1 until it has looked.
    pub fib_by_source: u8,
    /// 1 while records settle claims of live sessions by version alone (a peer just came
    /// back, or this agent after a stall: `claim_quiet_ms` is then not waited out, [`crate::conflict::claimable`]); 0
    /// otherwise. Set by the agent ([`CLAIMS_OPEN_AFTER_RETURN_MS`]).
    pub claims_open: u8,
    /// CPUs with a part of their own in the EMBRYOS ring (possible CPUs): an admission ticket
    /// is `counter * embryo_cpus + cpu`, so a ticket says which slot its session took, here
    /// and in a peer's replica part. Set by the agent.
    pub embryo_cpus: u32,
    /// Mixed into the FIB cache's slot of every key ([`crate::fib::slot`]), so that which keys
    /// share a slot cannot be worked out from the addresses alone. Chosen at random by the
    /// agent at every start; 0 in a config it has not written yet.
    pub fib_seed: u32,
    /// How long, in milliseconds, a session must have seen no packet (here, or at its owner as
    /// its last record tells) before a peer's record may hand it from an owner this member
    /// considers alive to another member: the keepalive threshold, which a genuine takeover
    /// waits out ([`crate::conflict::claimable`]); also how long after a takeover, with
    /// nothing announced since, the new owner announces it again (members that still saw the
    /// old owner alive refused the first). 0 (a config written by an agent that predates it):
    /// no wait. Set by the agent.
    pub claim_quiet_ms: u32,
}
crate::assert_size!(DatapathConfig, 112);

impl DatapathConfig {
    /// The idle timeout of a session in `state` (a [`crate::State`] as `u8`), in nanoseconds;
    /// 0 for a state this build does not know (it expires at once).
    #[inline(always)]
    pub fn timeout_ns(&self, state: u8) -> u64 {
        match self.timeouts_ns.get(state as usize) {
            Some(t) => *t,
            None => 0,
        }
    }

    /// How long after its last event an owned session that still sees traffic is announced
    /// again (a refresh event: peers' replicas take its idle time and counters; the XDP
    /// program also refreshes at once a session that becomes assured, and one whose direction
    /// crossed a multiple of 2^[`REFRESH_BYTES_SHIFT`] bytes), in `state`:
    /// [`REFRESH_SHARE`] of the state's timeout, at most [`REFRESH_MAX_NS`], never less than
    /// `refresh_interval_ns`, and in any case at most half the timeout. A replica is then never
    /// older than this interval plus the gap between two of the flow's packets, so it outlives
    /// its owner's idle timeout for flows that send at least every half timeout (a floor of one
    /// second under a one-second timeout let the replica of any flow lapse before each
    /// refresh); an interval fixed at one second made a table of flows that each send less
    /// than once a second announce every packet.
    #[inline(always)]
    pub fn refresh_ns(&self, state: u8) -> u64 {
        let timeout = self.timeout_ns(state);
        let share = timeout / REFRESH_SHARE;
        let capped = if share < REFRESH_MAX_NS {
            share
        } else {
            REFRESH_MAX_NS
        };
        let floored = if capped > self.refresh_interval_ns {
            capped
        } else {
            self.refresh_interval_ns
        };
        // A state without a timeout (expired at once) keeps the floor.
        let half = timeout / 2;
        if half > 0 && floored > half {
            half
        } else {
            floored
        }
    }

    /// [`Self::claim_quiet_ms`] in nanoseconds: how long a claim of a live session waits
    /// ([`crate::conflict::claimable`]), and a takeover before it is announced again.
    #[inline(always)]
    pub fn claim_quiet_ns(&self) -> u64 {
        u64::from(self.claim_quiet_ms) * 1_000_000
    }

    /// The session clock (the agent's monotonic clock, in nanoseconds) when the kernel's
    /// `jiffies` is `jiffies`, by the agent's measurement (`ns_per_jiffy` not 0).
    #[inline(always)]
    pub fn jiffies_ns(&self, jiffies: u64) -> u64 {
        crate::clock::jiffies_ns(jiffies, self.ns_per_jiffy, self.jiffies_offset_ns)
    }

    /// Firewall defaults for `local` member.
    pub fn with_defaults(local: MemberId) -> Self {
        let mut timeouts_ns = [0u64; STATE_COUNT];
        let mut i = 0;
        while i < STATE_COUNT {
            timeouts_ns[i] = crate::State::ALL[i].default_timeout_s() * 1_000_000_000;
            i += 1;
        }
        DatapathConfig {
            timeouts_ns,
            refresh_interval_ns: 1_000_000_000,
            local_member: local,
            policy: Policy::Strict as u8,
            malformed: MalformedAction::Drop as u8,
            forwarding: Forwarding::Kernel as u8,
            embryo_slots: 0,
            embryo_replica_slots: 0,
            ns_per_jiffy: 0,
            jiffies_offset_ns: 0,
            vwire: 0,
            embryo_replica_parts: 0,
            fib_by_source: 1,
            claims_open: 0,
            embryo_cpus: 0,
            fib_seed: 0,
            claim_quiet_ms: DEFAULT_CLAIM_QUIET_MS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::State;

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_state_refreshes_every_eighth_of_its_timeout_within_the_floor_and_the_cap() {
        let cfg = DatapathConfig::with_defaults(MemberId(1));
        let every = |state: State| cfg.refresh_ns(state as u8);
        // 3600 s / 8 is past the cap; 120 s / 8 and 30 s / 8 are not.
        assert_eq!(every(State::Established), 30 * S);
        assert_eq!(every(State::UdpReplied), 15 * S);
        assert_eq!(every(State::UdpNew), 3_750_000_000);
        // 6 s / 8 is under the configured floor of one second.
        assert_eq!(every(State::IcmpEcho), S);
    }

    #[test]
    fn a_refresh_comes_within_half_the_timeout_even_under_the_floor() {
        let mut cfg = DatapathConfig::with_defaults(MemberId(1));
        let udp = State::UdpReplied as usize;
        for (timeout_s, every) in [(1, S / 2), (2, S), (3, S), (16, 2 * S)] {
            cfg.timeouts_ns[udp] = timeout_s * S;
            assert_eq!(cfg.refresh_ns(udp as u8), every, "timeout {timeout_s} s");
        }
        // A floor above half the timeout gives way too.
        cfg.refresh_interval_ns = 60 * S;
        cfg.timeouts_ns[udp] = 30 * S;
        assert_eq!(cfg.refresh_ns(udp as u8), 15 * S);
    }

    #[test]
    fn the_configured_interval_is_a_floor_and_a_state_without_timeout_has_only_the_floor() {
        let mut cfg = DatapathConfig::with_defaults(MemberId(1));
        cfg.refresh_interval_ns = 60 * S;
        // Established: 3600 s, capped at 30 s, under the floor (and half the timeout).
        assert_eq!(cfg.refresh_ns(State::Established as u8), 60 * S);
        // A state with no timeout (expired at once), or one this build does not know (no
        // timeout, hence no share): the floor.
        cfg.timeouts_ns[State::UdpNew as usize] = 0;
        assert_eq!(cfg.refresh_ns(State::UdpNew as u8), 60 * S);
        assert_eq!(cfg.refresh_ns(u8::MAX), 60 * S);
        cfg.refresh_interval_ns = 0;
        assert_eq!(cfg.refresh_ns(State::UdpNew as u8), 0);
        assert_eq!(cfg.refresh_ns(u8::MAX), 0);
    }
}
