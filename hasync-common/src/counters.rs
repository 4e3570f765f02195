//! Datapath counters: one per-CPU array entry holding every counter, so the program makes one
//! map lookup for all of them.

macro_rules! counters {
    ($( $(#[$doc:meta])* $variant:ident = $name:literal, )+) => {
        /// Index of a datapath counter.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter { $( $(#[$doc])* $variant, )+ }

        impl Counter {
            /// Every counter, in index order.
            pub const ALL: &'static [Counter] = &[ $( Counter::$variant, )+ ];

            /// Stable name used by `show counters`, metrics and tests.
            pub const fn name(self) -> &'static str {
                match self { $( Counter::$variant => $name, )+ }
            }
        }
    };
}

counters! {
    /// Every frame the program saw.
    Packets = "packets",
    /// Frames that found their session.
    Hits = "session-hits",
    /// Sessions created.
    Creates = "session-creates",
    /// A session could not be inserted (a map error other than a full table).
    CreateFailed = "session-create-failed",
    /// A new flow found the session table full: dropped (strict policy).
    DropTableFull = "drop-table-full",
    /// A new flow found the session table full: passed untracked (loose policy).
    PassTableFull = "pass-table-full",
    /// Embryonic (not assured) TCP sessions in `syn-sent` evicted to admit newer embryonic
    /// sessions.
    EvictedSynSent = "evicted-syn-sent",
    /// Embryonic TCP sessions in `syn-recv` (a SYN-ACK seen, the handshake not completed)
    /// evicted.
    EvictedSynRecv = "evicted-syn-recv",
    /// Embryonic UDP sessions in `udp-new` (unanswered) evicted.
    EvictedUdpNew = "evicted-udp-new",
    /// Embryonic UDP sessions in `udp-replied` (answered, but not a stream yet) evicted.
    EvictedUdpReplied = "evicted-udp-replied",
    /// ICMP echo sessions evicted (never assured).
    EvictedIcmpEcho = "evicted-icmp-echo",
    /// Embryonic sessions in another state (a TCP FIN or RST before the handshake completed)
    /// evicted.
    EvictedOther = "evicted-other",
    /// Sessions found but idle past their timeout, treated as absent.
    Expired = "session-expired-on-hit",
    /// TCP state transitions.
    StateChanges = "state-changes",
    /// TCP sessions that reached `closed`.
    Closed = "sessions-closed",
    /// Frames of sessions owned by a live member elsewhere: passed, not taken over.
    Asymmetric = "asymmetric",
    /// Sessions taken over from a member that is no longer alive.
    Takeovers = "takeovers",
    /// Peers' records that would have handed a session to another owner while its owner is
    /// alive here and the flow still sees traffic: the session is kept as it was
    /// (`hasync_common::conflict::claimable`).
    ClaimsRefused = "claims-refused",
    /// Peers' records refused because the peers' pool of the table is full: an assured copy
    /// where the table held none, or a new embryonic copy, past `[local] replica_limit`
    /// (`hasync_common::ReplicaRoom`): what peers send cannot take the room this member's own
    /// flows need.
    ReplicasOverLimit = "replicas-over-limit",
    /// Events written to the ring buffer.
    Events = "events",
    /// Events lost because the ring buffer was full.
    RingbufFull = "ringbuf-full",
    /// Frames passed untouched because the datapath is not configured yet.
    PassUnconfigured = "pass-unconfigured",
    /// Non-IP frames of the link layer's own protocols (ARP, RARP, LLDP, LACP and other slow
    /// protocols, STP), passed.
    PassNonIp = "pass-non-ip",
    /// Frames of any other ethertype (MPLS, PPPoE, 802.3 frames other than STP, ...), passed
    /// to the kernel; a virtual wire never lets them cross (they may carry IP the program
    /// cannot see).
    PassOtherEthertype = "pass-other-ethertype",
    /// ICMP/ICMPv6 link-scope control messages (neighbour and router discovery, MLD, ...) with
    /// the TTL or hop limit their protocol sends, passed untracked.
    PassUntracked = "pass-untracked-protocol",
    /// IP protocols other than TCP, UDP, ICMP, ICMPv6 (GRE, ESP, SCTP, ...), and ICMP messages
    /// neither queries, errors nor link-scope ones (with their TTL or hop limit), passed
    /// untracked by their zone's rule (`other_protocols = "pass"`, or the loose policy).
    PassOtherProtocol = "pass-other-protocol",
    /// The same, dropped by their zone's rule (`other_protocols = "drop"`, or the strict
    /// policy).
    DropOtherProtocol = "drop-other-protocol",
    /// ICMP/ICMPv6 errors quoting a packet of a live session, back to its sender: passed.
    IcmpErrorRelated = "icmp-error-related",
    /// ICMP/ICMPv6 errors related to no live session (or unreadable, or going the wrong way),
    /// dropped by the strict policy.
    DropIcmpErrorUnrelated = "drop-icmp-error-unrelated",
    /// The same, passed by the loose policy.
    PassIcmpErrorUnrelated = "pass-icmp-error-unrelated",
    /// Later fragments (IPv4 and IPv6, no ports) of a datagram whose first fragment passed in
    /// the last 10 s: passed.
    PassFragment = "pass-fragment",
    /// Later fragments of no datagram whose first fragment passed: dropped (strict policy).
    DropFragmentUnseenFirst = "drop-fragment-unseen-first",
    /// The same, passed untracked (loose policy).
    PassFragmentUnseenFirst = "pass-fragment-unseen-first",
    /// IPv4 fragments with offset 0 (tracked by their ports).
    Ipv4FirstFragment = "ipv4-first-fragment",
    /// IPv6 fragments seen (first fragments are tracked, later ones follow their first).
    Ipv6Fragment = "ipv6-fragment",
    /// Packets of a session that came in through an interface of another zone than the one
    /// its direction is bound to: dropped (strict policy).
    DropZoneMismatch = "drop-zone-mismatch",
    /// The same, passed (loose policy).
    PassZoneMismatch = "pass-zone-mismatch",
    /// Flows' first packets whose replies the routing table bound to a zone (the zone of the
    /// interface their destination is routed out of; or to none: a destination in no zone,
    /// local here, not routed, broadcast or multicast), in zones that check routes; and later
    /// packets of such a flow bound to none that no reply reached yet, which ask again (a
    /// route may have come since).
    ReplyZoneRouted = "reply-zone-routed",
    /// Flows' first packets, in zones that check routes, whose reply zone the routing table
    /// could not give (a helper error: a kernel before 6.3; a lightweight tunnel): learned
    /// from their first reply instead.
    ReplyZoneLearned = "reply-zone-learned",
    /// A flow's first packet whose source is not routed back into the zone it came in from (a
    /// spoofed source, or routing asymmetric across zones: see `route_check`): dropped (strict
    /// policy), no session made. Also a reply to a peer's session (a replica, or one taken
    /// over and not yet bound), checked as a first packet is: dropped, the session unchanged.
    DropReversePath = "drop-reverse-path",
    /// The same, passed untracked (loose policy).
    PassReversePath = "pass-reverse-path",
    /// A flow's first packet routed back out of the interface it came in on (a hairpin: its
    /// two ends on one link, which only a forger needs this member for): dropped (strict
    /// policy), no session made; or such a reply to a peer's session, as above.
    DropHairpin = "drop-hairpin",
    /// The same, passed untracked (loose policy).
    PassHairpin = "pass-hairpin",
    /// TCP RST or FIN whose sequence number lies outside the window the session has seen (a
    /// blind reset or close): dropped (strict policy), the session unchanged.
    DropTcpOutOfWindow = "drop-tcp-out-of-window",
    /// The same, passed (loose policy), the session unchanged.
    PassTcpOutOfWindow = "pass-tcp-out-of-window",
    /// An established session's RST inside the window but not at the sender's next sequence
    /// number (RFC 5961 §3.2): passed whatever the policy, so the endpoint can answer it with
    /// a challenge ACK; the session unchanged. A blind reset lands here with odds of the
    /// window in 2^32.
    PassTcpInexactRst = "pass-tcp-inexact-rst",
    /// TCP RST or FIN inside the window whose ACK acknowledges nothing the other side sent
    /// (not within the window of its end, as this member saw it): passed on, the session
    /// unchanged. A blind close lands here; so does a genuine one where this member stopped
    /// seeing the other direction.
    PassTcpUnconfirmed = "pass-tcp-unconfirmed",
    /// TCP without SYN, or an ICMP query's reply on its way through, without a session, passed
    /// by the loose policy.
    PassNoSessionLoose = "pass-no-session-loose",
    /// TCP without SYN, or an ICMP query's reply on its way through, without a session,
    /// dropped by the strict policy.
    DropNoSession = "drop-no-session",
    /// TCP without SYN, or an ICMP error, without a session, that came in through a zone
    /// checking routes and that the kernel would not forward (for this host itself, a
    /// subnet's broadcast, or no route; never a multicast destination): passed by either
    /// policy, since this host's own connections open without crossing XDP (their SYNs leave
    /// through the stack) and its own firewall decides what reaches it.
    PassToThisHost = "pass-to-this-host",
    /// Packets of established sessions forwarded by XDP (`forwarding = "xdp"`): FIB lookup,
    /// MAC rewrite, TTL decrement, DEVMAP redirect.
    ForwardedXdp = "forwarded-xdp",
    /// Left to the kernel (`forwarding = "xdp"`): the session has not seen both directions
    /// (TCP not established, UDP not answered), so the kernel's policy still sees the setup.
    PassFwdNotEstablished = "pass-fwd-not-established",
    /// A TCP segment other than RST or FIN outside the window its session has seen (conntrack
    /// calls it invalid): passed to the kernel, whatever the policy and the forwarding mode,
    /// and the session left exactly as it was: not refreshed, not announced, not taken over
    /// (a blind ACK keeps nothing alive). Counted here too: such a segment inside the window
    /// by its sequence number whose ACK acknowledges nothing this member saw, on a session
    /// this member does not own (nothing is taken over by it). Not counted here: that
    /// segment on an owned session, which it keeps alive (the other direction moved to
    /// another member), and the initiator's segments of a half-open session of ours (outside
    /// until an answer comes).
    PassTcpOutsideWindow = "pass-tcp-outside-window",
    /// Left to the kernel on purpose: about one packet in 16 s of every forwarded session,
    /// so the kernel's own connection tracking sees the flow alive.
    PassFwdRefresh = "pass-fwd-refresh",
    /// Left to the kernel: not for unicast forwarding (an Ethernet broadcast or multicast,
    /// an IPv4 multicast or broadcast address, an IPv6 multicast or link-local address).
    PassFwdNotUnicast = "pass-fwd-not-unicast",
    /// Left to the kernel: the route leaves through another zone than the session's other
    /// side (a route change, or a reply zone not learned yet).
    PassFwdZone = "pass-fwd-zone",
    /// Left to the kernel: a frame not sent to the ingress interface's MAC address (flooded by
    /// a switch, picked up by a promiscuous interface: the kernel drops it), or an interface
    /// whose address the agent has not written yet.
    PassFwdOtherHost = "pass-fwd-other-host",
    /// Left to the kernel: a VLAN-tagged frame (the kernel owns the VLAN devices).
    PassFwdVlan = "pass-fwd-vlan",
    /// Left to the kernel: a fragment.
    PassFwdFragment = "pass-fwd-fragment",
    /// Left to the kernel: IPv4 options, or an IPv6 hop-by-hop header.
    PassFwdIpOptions = "pass-fwd-ip-options",
    /// Left to the kernel: TTL or hop limit ≤ 1 (the kernel sends the ICMP time exceeded).
    PassFwdTtl = "pass-fwd-ttl",
    /// Left to the kernel: the next hop's MAC is not known yet (the kernel resolves it).
    PassFwdNoNeighbour = "pass-fwd-no-neighbour",
    /// Left to the kernel: the FIB lookup gave no forwarding route (local, unreachable,
    /// blackhole, prohibited, forwarding disabled on the interface, ...).
    PassFwdNoRoute = "pass-fwd-no-route",
    /// Left to the kernel: larger than the route's MTU (the kernel fragments it or sends the
    /// ICMP).
    PassFwdMtu = "pass-fwd-mtu",
    /// Left to the kernel: the egress interface takes no XDP redirects (not in a zone, or its
    /// driver lacks ndo_xdp_xmit).
    PassFwdEgress = "pass-fwd-egress",
    /// Frames that crossed a virtual wire (redirected to the wire's other end).
    VwireForwarded = "vwire-forwarded",
    /// Non-IP frames dropped on a virtual wire: any of another ethertype, and the link
    /// layer's own with `non_ip = "drop"`.
    DropVwireNonIp = "drop-vwire-non-ip",
    /// Frames dropped on a virtual wire end whose other end is not in the map: the wire is
    /// down (an end's driver takes no XDP redirects, the kernel cannot tell, or the agent is
    /// changing it). Nothing on a wire is for this host.
    DropVwireDown = "drop-vwire-down",
    /// Malformed or truncated frames passed (malformed = pass).
    PassMalformed = "pass-malformed",
    /// Malformed or truncated frames dropped (malformed = drop).
    DropMalformed = "drop-malformed",
    /// Malformed: shorter than an Ethernet header.
    ErrEthTruncated = "err-eth-truncated",
    /// Malformed: VLAN tag cut off.
    ErrVlanTruncated = "err-vlan-truncated",
    /// Malformed: more than two VLAN tags.
    ErrVlanTooDeep = "err-vlan-too-deep",
    /// Malformed: IPv4 header cut off.
    ErrIpv4Truncated = "err-ipv4-truncated",
    /// Malformed: IPv4 version field is not 4.
    ErrIpv4Version = "err-ipv4-version",
    /// Malformed: IPv4 IHL below 5.
    ErrIpv4Ihl = "err-ipv4-ihl",
    /// Malformed: IPv4 total length shorter than the header or longer than the frame.
    ErrIpv4TotalLen = "err-ipv4-total-length",
    /// Malformed: the IPv4 header (options included) fails its checksum.
    ErrIpv4Checksum = "err-ipv4-checksum",
    /// Malformed: IPv6 header cut off.
    ErrIpv6Truncated = "err-ipv6-truncated",
    /// Malformed: IPv6 version field is not 6.
    ErrIpv6Version = "err-ipv6-version",
    /// Malformed: IPv6 payload length runs past the frame.
    ErrIpv6PayloadLen = "err-ipv6-payload-length",
    /// Malformed: IPv6 extension header cut off (by the payload length or the frame).
    ErrIpv6ExtTruncated = "err-ipv6-ext-truncated",
    /// Malformed: more IPv6 extension headers than the program walks.
    ErrIpv6TooManyExt = "err-ipv6-too-many-ext",
    /// Malformed: TCP header cut off.
    ErrTcpTruncated = "err-tcp-truncated",
    /// Malformed: TCP data offset below 5 or past the frame.
    ErrTcpDataOffset = "err-tcp-data-offset",
    /// Malformed: impossible TCP flag combination (SYN+FIN, SYN+RST, none, ...).
    ErrTcpFlags = "err-tcp-flags",
    /// Malformed: UDP header cut off.
    ErrUdpTruncated = "err-udp-truncated",
    /// Malformed: the UDP length is below the header's 8 bytes or, outside a fragment, runs
    /// past the IP payload (conntrack takes it for invalid).
    ErrUdpLength = "err-udp-length",
    /// Malformed: ICMP/ICMPv6 header cut off.
    ErrIcmpTruncated = "err-icmp-truncated",
    /// Left to the kernel (`forwarding = "xdp"`): a TCP segment inside the window by its
    /// sequence number whose ACK acknowledges nothing this member saw (it keeps its session
    /// alive, but conntrack would call it invalid, and the kernel's policy decides).
    PassFwdUnacknowledged = "pass-fwd-unacknowledged",
    /// The initiator's SYN on an assured TCP connection still open here (established or
    /// closing): a new connection reusing the ports (the client lost the old one; this member
    /// missed its end). Passed on whatever the policy and the forwarding mode, for the
    /// endpoints to settle, and the session left as it was but for the SYN's sequence end,
    /// kept until the responder's SYN-ACK acknowledges it.
    PassTcpNewSyn = "pass-tcp-new-syn",
}

/// Number of counters.
pub const COUNTER_COUNT: usize = Counter::ALL.len();

/// The single value of the COUNTERS per-CPU array: the counters, and the last rare event of
/// each kind the program noted on this CPU, for its log.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Counters {
    /// One value per [`Counter`], indexed by `Counter as usize`.
    pub values: [u64; COUNTER_COUNT],
    /// Not counters: one [`LogNote`] per [`LogNoteKind`], indexed by `LogNoteKind as usize`.
    pub notes: [LogNote; LOG_NOTE_KINDS],
}
crate::assert_size!(Counters, COUNTER_COUNT * 8 + LOG_NOTE_KINDS * 64);

impl Default for Counters {
    fn default() -> Self {
        Counters {
            values: [0; COUNTER_COUNT],
            notes: [LogNote::default(); LOG_NOTE_KINDS],
        }
    }
}

/// The rare datapath events that are logged (`[local] datapath_log`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogNoteKind {
    /// This member took the session `key` over from `member`; its version is now `version`
    /// (logged at info).
    TakenOver = 0,
    /// A session `key` this member owned was replaced by `member`'s newer `version` (warn).
    Superseded = 1,
    /// A malformed frame: `reason`, `ifindex`, `len` (debug).
    Malformed = 2,
}

/// How many [`LogNoteKind`]s there are.
pub const LOG_NOTE_KINDS: usize = 3;

/// The last event of one kind on one CPU. The program notes it where it happens, a few stores
/// into the counters value it holds already (it has no stack left to build a log record); the
/// agent sees `seq` change and runs the log program (`LOG_PROGRAM`) for that CPU and kind, which
/// logs it with aya-log. So each kind is logged at most once per CPU per drain: a burst is
/// sampled, and counted in full by its counter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct LogNote {
    /// Odd while the program writes the note; bumped twice per note.
    pub seq: u32,
    /// The session's version after the event.
    pub version: u32,
    /// The malformed frame's reason (a [`Counter`] index).
    pub reason: u32,
    /// The malformed frame's ingress interface.
    pub ifindex: u32,
    /// The malformed frame's length.
    pub len: u32,
    /// The other member of the event.
    pub member: u8,
    /// Padding; zero.
    pub _pad: [u8; 3],
    /// The session's key.
    pub key: crate::FlowKey,
}
crate::assert_size!(LogNote, 64);

/// What the agent hands the log program (the start of its test-run data): log the note of
/// `kind` on `cpu` unless it is still the one numbered `seq`, the last the agent had logged.
/// The program writes the sequence of the note it logged back into `seq`, so a note that
/// changed since the agent read the counters is logged as it is now, and a CPU that keeps
/// noting one kind is still sampled once per drain. It answers XDP_PASS when it logged a
/// note or had nothing new (or the request names no note), XDP_DROP when the note was being
/// written (the agent asks again at its next drain).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct LogRequest {
    /// The id of the CPU whose note to log.
    pub cpu: u32,
    /// A [`LogNoteKind`].
    pub kind: u32,
    /// In: the [`LogNote::seq`] of the note the agent logged last. Out: the one logged now.
    pub seq: u32,
}

impl Counters {
    /// The note of `kind`.
    #[inline(always)]
    pub fn note_mut(&mut self, kind: LogNoteKind) -> Option<&mut LogNote> {
        self.notes.get_mut(kind as usize)
    }

    /// The note of `kind`.
    pub fn note(&self, kind: LogNoteKind) -> Option<&LogNote> {
        self.notes.get(kind as usize)
    }
}

impl Counters {
    /// Adds `n` to counter `c`.
    #[inline(always)]
    pub fn add(&mut self, c: Counter, n: u64) {
        if let Some(v) = self.values.get_mut(c as usize) {
            *v = v.wrapping_add(n);
        }
    }

    /// Adds 1 to counter `c`.
    #[inline(always)]
    pub fn inc(&mut self, c: Counter) {
        self.add(c, 1)
    }

    /// Value of counter `c`.
    pub fn get(&self, c: Counter) -> u64 {
        self.values.get(c as usize).copied().unwrap_or(0)
    }
}
