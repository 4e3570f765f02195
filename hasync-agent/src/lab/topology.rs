//! The lab's namespaces, links, addresses and routes.
//!
//! ```text
//!            br-in (198.18.0.0/24, fd00:18::/64)          br-out (198.18.1.0/24, fd00:18:1::/64)
//!  client ──┤ eth0 .100                  in0 .K ├── fwK ──┤ out0 .K            eth0 .100 ├── server
//!                                                   │ │
//!                        br-ha4 (198.18.100.0/24) ──┘ └── br-ha4b (198.18.101.0/24)
//! ```
//! The four bridges live in namespace `<prefix>hasw`; each member namespace `<prefix>fwK` has
//! `in0`, `out0`, `ha4` and `ha4b`. The client's default route and the server's return route
//! point at one member (fw1 at first): [`Topology::steer`] moves them.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
    time::Duration,
};

use super::{
    netns::{self, add_namespaces, del_namespaces, ip, ip_batch, ip_netns, sysctl, Processes},
    LabError, Result,
};

/// Most members a lab (and a cluster) has.
pub const MAX_MEMBERS: u8 = 16;

/// Longest accepted prefix: namespace names stay short enough to read.
const PREFIX_MAX: usize = 24;

/// The client's address.
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// The server's address.
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 100);
/// The client's IPv6 address.
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0x100);
/// The server's IPv6 address.
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 0x100);
/// The client side network.
pub const INSIDE_V4: &str = "198.18.0.0/24";
/// The client side IPv6 network.
pub const INSIDE_V6: &str = "fd00:18::/64";

/// A member's interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Link {
    /// `in0`, towards the client (zone trust).
    In,
    /// `out0`, towards the server (zone untrust).
    Out,
    /// `ha4`, the sync link.
    Ha4,
    /// `ha4b`, the backup sync link.
    Ha4Backup,
}

impl Link {
    pub const ALL: [Link; 4] = [Link::In, Link::Out, Link::Ha4, Link::Ha4Backup];

    /// The interface's name inside the member namespace.
    pub fn ifname(self) -> &'static str {
        match self {
            Link::In => "in0",
            Link::Out => "out0",
            Link::Ha4 => "ha4",
            Link::Ha4Backup => "ha4b",
        }
    }

    /// The bridge in `hasw` it is plugged into.
    pub fn bridge(self) -> &'static str {
        match self {
            Link::In => "br-in",
            Link::Out => "br-out",
            Link::Ha4 => "br-ha4",
            Link::Ha4Backup => "br-ha4b",
        }
    }

    /// The name of the veth peer in `hasw` for member `k`: `fw16-ha4b` at most, 9 bytes.
    fn switch_port(self, k: u8) -> String {
        let suffix = match self {
            Link::In => "in",
            Link::Out => "out",
            Link::Ha4 => "ha4",
            Link::Ha4Backup => "ha4b",
        };
        format!("fw{k}-{suffix}")
    }

    /// Member `k`'s IPv4 address on this link, with its prefix length.
    pub fn v4(self, k: u8) -> (Ipv4Addr, u8) {
        let third = match self {
            Link::In => 0,
            Link::Out => 1,
            Link::Ha4 => 100,
            Link::Ha4Backup => 101,
        };
        (Ipv4Addr::new(198, 18, third, k), 24)
    }

    /// Member `k`'s IPv6 address on this link (data links only: `fd00:18::K` and
    /// `fd00:18:1::K`, K written in hex), with its prefix length.
    pub fn v6(self, k: u8) -> Option<(Ipv6Addr, u8)> {
        match self {
            Link::In => Some((inside_v6(k), 64)),
            Link::Out => Some((outside_v6(k), 64)),
            Link::Ha4 | Link::Ha4Backup => None,
        }
    }
}

fn inside_v6(k: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, u16::from(k))
}

fn outside_v6(k: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, u16::from(k))
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.ifname())
    }
}

/// A lab's namespaces and links. Dropping it stops the processes started through
/// [`Topology::spawn`] (by PID) and deletes every namespace it created.
pub struct Topology {
    prefix: String,
    members: u8,
    /// Short names (`client`, `fw1`, ...) with full names, in creation order.
    names: Vec<(String, String)>,
    /// Full names of the namespaces that exist because we created them.
    created: Vec<String>,
    processes: Processes,
}

impl fmt::Debug for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Topology")
            .field("prefix", &self.prefix)
            .field("members", &self.members)
            .finish_non_exhaustive()
    }
}

/// Checks a lab prefix: at most 24 of A–Z, a–z, 0–9 and `-`.
pub fn check_prefix(prefix: &str) -> Result<()> {
    if prefix.len() > PREFIX_MAX
        || !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(LabError::Prefix(prefix.into()));
    }
    Ok(())
}

/// What [`Topology::plug`] is given, checked before its first command: `ns` a named namespace
/// that exists (iproute2 takes a `netns` it cannot find by name for a PID: "1" would have put
/// the pair's end in the root namespace), the interface names plain (no space or newline,
/// which would add lines to the `ip` batch), the address a lab's.
fn check_plug(ns: &str, ifname: &str, port: &str, cidr: &str) -> Result<()> {
    if !netns::netns_exists(ns) {
        return Err(LabError::NoSuchNamespace {
            name: ns.into(),
            known: "the named namespaces under /run/netns".into(),
        });
    }
    for name in [ifname, port] {
        let plain = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if name.is_empty() || name.len() > 15 || !name.chars().all(plain) {
            return Err(LabError::io(
                format!("interface name {name:?}"),
                std::io::Error::other("must be 1–15 of A–Z, a–z, 0–9, `-` and `_`"),
            ));
        }
    }
    let addr = cidr.split('/').next().unwrap_or_default();
    match addr.parse::<IpAddr>() {
        Ok(ip) if netns::is_lab_address(ip) && !cidr.contains(char::is_whitespace) => Ok(()),
        _ => Err(LabError::NotLabAddress(cidr.into())),
    }
}

/// The namespaces of a lab with `prefix` and `members` members, short and full names.
fn namespace_names(prefix: &str, members: u8) -> Vec<(String, String)> {
    let mut short = vec!["hasw".to_owned(), "client".to_owned(), "server".to_owned()];
    short.extend((1..=members).map(|k| format!("fw{k}")));
    short
        .into_iter()
        .map(|s| {
            let full = format!("{prefix}{s}");
            (s, full)
        })
        .collect()
}

/// The namespaces of that lab that exist now.
pub fn existing_namespaces(prefix: &str, members: u8) -> Vec<String> {
    namespace_names(prefix, members)
        .into_iter()
        .map(|(_, full)| full)
        .filter(|full| netns::netns_exists(full))
        .collect()
}

/// A prefix unique to this process for tests: `<tag><pid>-`. Namespaces of earlier runs with
/// the same tag whose process is gone (killed before cleaning up) are removed first, when
/// nothing runs in them; so are their labs' pins (`/sys/fs/bpf/hasync-lab-<tag><pid>-...`:
/// until stop 42 they stayed, tables sized for 65,536 sessions each, until a reboot).
pub fn test_prefix(tag: &str) -> Result<String> {
    check_prefix(tag)?;
    let me = std::process::id();
    for name in names_of_gone_runs(netns::NETNS_DIR, tag, me) {
        let idle = ip_netns(&["netns", "pids", &name]).is_ok_and(|p| p.trim().is_empty());
        if idle {
            let _ = ip_netns(&["netns", "del", &name]);
        }
    }
    let lab_tag = format!("hasync-lab-{tag}");
    let bpffs = crate::datapath::pin::BPFFS_MOUNT;
    for name in names_of_gone_runs(bpffs, &lab_tag, me) {
        let _ = crate::datapath::pin::teardown(&std::path::Path::new(bpffs).join(name));
    }
    Ok(format!("{tag}{me}-"))
}

/// The entries of `dir` named `<tag><pid>-...` whose process `pid` (not `me`) is gone.
fn names_of_gone_runs(dir: &str, tag: &str, me: u32) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| {
            name.strip_prefix(tag)
                .and_then(|rest| rest.split_once('-'))
                .and_then(|(pid, _)| pid.parse::<u32>().ok())
                .is_some_and(|pid| {
                    pid != me && !std::path::Path::new(&format!("/proc/{pid}")).exists()
                })
        })
        .collect()
}

fn cidr(addr: impl Into<IpAddr>, len: u8) -> String {
    format!("{}/{len}", addr.into())
}

/// The first line of every namespace's batch: `ip netns add` leaves the loopback down.
const LO_UP: &str = "link set lo up";

/// An endpoint's `eth0` in namespace `ns`: its addresses (IPv6 without DAD: usable at once),
/// up, then its `routes`.
fn configure_endpoint(ns: &str, (v4, v6): (Ipv4Addr, Ipv6Addr), routes: [String; 2]) -> Result<()> {
    let mut lines = vec![
        LO_UP.into(),
        format!("addr add {} dev eth0", cidr(v4, 24)),
        format!("addr add {} dev eth0 nodad", cidr(v6, 64)),
        "link set eth0 up".into(),
    ];
    lines.extend(routes);
    ip_batch(ns, &lines)
}

impl Topology {
    /// Builds the lab: `prefix` ("" for the interactive lab, e.g. "t7-" for a test) and 1–16
    /// members. Refuses if any of its namespaces exists. Needs root.
    pub fn create(prefix: &str, members: u8) -> Result<Topology> {
        check_prefix(prefix)?;
        if members == 0 || members > MAX_MEMBERS {
            return Err(LabError::Members(usize::from(members)));
        }
        let names = namespace_names(prefix, members);
        let existing = existing_namespaces(prefix, members);
        if !existing.is_empty() {
            return Err(LabError::NamespacesExist { names: existing });
        }
        let mut topo = Topology {
            prefix: prefix.to_owned(),
            members,
            names,
            created: Vec::new(),
            processes: Processes::default(),
        };
        // On any error below, dropping `topo` deletes what was created so far.
        topo.build()?;
        Ok(topo)
    }

    fn build(&mut self) -> Result<()> {
        self.create_namespaces()?;
        self.enable_forwarding()?;
        self.build_switch()?;
        // The client's default route and the server's return route go through fw1.
        let (fw1_in, _) = Link::In.v4(1);
        let (fw1_out, _) = Link::Out.v4(1);
        configure_endpoint(
            self.client(),
            (CLIENT_V4, CLIENT_V6),
            [
                format!("route add default via {fw1_in}"),
                format!("route add ::/0 via {}", inside_v6(1)),
            ],
        )?;
        configure_endpoint(
            self.server(),
            (SERVER_V4, SERVER_V6),
            [
                format!("route add {INSIDE_V4} via {fw1_out}"),
                format!("route add {INSIDE_V6} via {}", outside_v6(1)),
            ],
        )?;
        for k in self.member_ids() {
            self.configure_member(k)?;
        }
        Ok(())
    }

    /// Every namespace, in one `ip -batch`; those added are recorded as created even if a
    /// later one failed.
    fn create_namespaces(&mut self) -> Result<()> {
        let mut fulls: Vec<String> = self.names.iter().map(|(_, f)| f.clone()).collect();
        let (added, result) = add_namespaces(&fulls);
        fulls.truncate(added);
        self.created = fulls;
        result
    }

    /// Members forward IPv4 and IPv6, without reverse path filters or redirects.
    fn enable_forwarding(&self) -> Result<()> {
        for k in self.member_ids() {
            let fw = self.fw(k).to_owned();
            // Before the interfaces exist, so they inherit `default`.
            for (key, value) in [
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
                ("net.ipv4.conf.all.send_redirects", "0"),
                ("net.ipv4.conf.default.send_redirects", "0"),
                ("net.ipv6.conf.all.forwarding", "1"),
            ] {
                sysctl(&fw, key, value)?;
            }
        }
        Ok(())
    }

    /// The switch: its loopback, bridges, then one veth pair per port, created in `hasw` with
    /// the peer placed straight into its namespace.
    fn build_switch(&self) -> Result<()> {
        let mut lines = vec![LO_UP.to_owned()];
        for link in Link::ALL {
            let br = link.bridge();
            lines.push(format!(
                "link add {br} type bridge stp_state 0 forward_delay 0 mcast_snooping 0"
            ));
            lines.push(format!("link set {br} up"));
        }
        let mut port = |port: &str, bridge: &str, peer: &str, peer_ns: &str| {
            lines.push(format!(
                "link add {port} type veth peer name {peer} netns {peer_ns}"
            ));
            lines.push(format!("link set {port} master {bridge} up"));
        };
        port("client", "br-in", "eth0", self.client());
        port("server", "br-out", "eth0", self.server());
        for k in self.member_ids() {
            for link in Link::ALL {
                port(
                    &link.switch_port(k),
                    link.bridge(),
                    link.ifname(),
                    self.fw(k),
                );
            }
        }
        ip_batch(self.hasw(), &lines)
    }

    /// Member `k`'s loopback and interfaces: addresses (IPv6 without DAD: usable at once),
    /// up, no reverse path filter.
    fn configure_member(&self, k: u8) -> Result<()> {
        let mut lines = vec![LO_UP.to_owned()];
        for link in Link::ALL {
            let name = link.ifname();
            let (a4, l4) = link.v4(k);
            lines.push(format!("addr add {} dev {name}", cidr(a4, l4)));
            if let Some((a6, l6)) = link.v6(k) {
                lines.push(format!("addr add {} dev {name} nodad", cidr(a6, l6)));
            }
            lines.push(format!("link set {name} up"));
        }
        ip_batch(self.fw(k), &lines)?;
        for link in Link::ALL {
            sysctl(
                self.fw(k),
                &format!("net.ipv4.conf.{}.rp_filter", link.ifname()),
                "0",
            )?;
        }
        Ok(())
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Number of members.
    pub fn members(&self) -> u8 {
        self.members
    }

    /// Member numbers, 1..=N.
    pub fn member_ids(&self) -> std::ops::RangeInclusive<u8> {
        1..=self.members
    }

    /// The full name of namespace `name` (`client`, `server`, `hasw`, `fw1`, ...).
    ///
    /// # Panics
    /// If the lab has no such namespace: a test's typo.
    pub fn ns(&self, name: &str) -> &str {
        match self.try_ns(name) {
            Ok(full) => full,
            Err(e) => panic!("{e}"),
        }
    }

    /// The full name of namespace `name`.
    pub fn try_ns(&self, name: &str) -> Result<&str> {
        self.names
            .iter()
            .find(|(short, _)| short == name)
            .map(|(_, full)| full.as_str())
            .ok_or_else(|| LabError::NoSuchNamespace {
                name: name.into(),
                known: self
                    .names
                    .iter()
                    .map(|(s, _)| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Every namespace's full name.
    pub fn namespaces(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(|(_, full)| full.as_str())
    }

    pub fn client(&self) -> &str {
        &self.names[1].1
    }

    pub fn server(&self) -> &str {
        &self.names[2].1
    }

    /// The namespace holding the bridges.
    pub fn hasw(&self) -> &str {
        &self.names[0].1
    }

    /// Member `k`'s namespace.
    ///
    /// # Panics
    /// If `k` is not 1..=N.
    pub fn fw(&self, k: u8) -> &str {
        match self.check_member(k) {
            Ok(()) => &self.names[2 + usize::from(k)].1,
            Err(e) => panic!("{e}"),
        }
    }

    fn check_member(&self, k: u8) -> Result<()> {
        if k == 0 || k > self.members {
            return Err(LabError::NoSuchMember {
                member: k,
                members: self.members,
            });
        }
        Ok(())
    }

    /// `ip -n <namespace name> ARGS...`, with `name` a short name (`fw1`).
    pub fn ip(&self, name: &str, args: &[&str]) -> Result<String> {
        ip(self.try_ns(name)?, args)
    }

    /// Makes the lab carry frames that members forward in XDP: the switch ports facing the
    /// members' data interfaces take XDP redirects (GRO on), and the client and the server
    /// send finished checksums (see [`netns::Offload`]).
    pub fn ready_for_xdp_forwarding(&self) -> Result<()> {
        for k in self.member_ids() {
            for link in [Link::In, Link::Out] {
                netns::set_offload(self.hasw(), &link.switch_port(k), netns::Offload::Gro, true)?;
            }
        }
        for ns in [self.client(), self.server()] {
            netns::set_offload(ns, "eth0", netns::Offload::TxChecksum, false)?;
        }
        Ok(())
    }

    /// Sends client→server traffic through member `k` and the server's replies back through
    /// it.
    pub fn steer(&self, k: u8) -> Result<()> {
        self.steer_client(k)?;
        self.steer_server(k)
    }

    /// Points the client's default routes at member `k` (the server's stay): asymmetric paths.
    pub fn steer_client(&self, k: u8) -> Result<()> {
        self.check_member(k)?;
        let (gw4, _) = Link::In.v4(k);
        let gw6 = inside_v6(k);
        ip_batch(
            self.client(),
            &[
                format!("route replace default via {gw4}"),
                format!("route replace ::/0 via {gw6}"),
            ],
        )
    }

    /// Points the server's return routes at member `k`.
    pub fn steer_server(&self, k: u8) -> Result<()> {
        self.check_member(k)?;
        let (gw4, _) = Link::Out.v4(k);
        let gw6 = outside_v6(k);
        ip_batch(
            self.server(),
            &[
                format!("route replace {INSIDE_V4} via {gw4}"),
                format!("route replace {INSIDE_V6} via {gw6}"),
            ],
        )
    }

    /// Sets member `k`'s interface down (administratively, as `ip link set down` on the member).
    pub fn link_down(&self, k: u8, link: Link) -> Result<()> {
        self.check_member(k)?;
        ip(self.fw(k), &["link", "set", link.ifname(), "down"]).map(drop)
    }

    /// Sets member `k`'s interface up again.
    pub fn link_up(&self, k: u8, link: Link) -> Result<()> {
        self.check_member(k)?;
        ip(self.fw(k), &["link", "set", link.ifname(), "up"]).map(drop)
    }

    /// Pulls the cable: sets the switch side down, so member `k` sees its interface lose carrier
    /// (`NO-CARRIER`) while it stays administratively up.
    pub fn cable_down(&self, k: u8, link: Link) -> Result<()> {
        self.check_member(k)?;
        ip(self.hasw(), &["link", "set", &link.switch_port(k), "down"]).map(drop)
    }

    /// Plugs the cable back in.
    pub fn cable_up(&self, k: u8, link: Link) -> Result<()> {
        self.check_member(k)?;
        ip(self.hasw(), &["link", "set", &link.switch_port(k), "up"]).map(drop)
    }

    /// Drops `percent` % (1–100) of the packets member `k` receives, sends or forwards on
    /// `link`, with nftables inside the member: the link stays up but is lossy or silent.
    /// Replaces an earlier drop on the same link.
    pub fn drop_with_nft(&self, k: u8, link: Link, percent: u8) -> Result<()> {
        self.check_member(k)?;
        if percent == 0 || percent > 100 {
            return Err(LabError::io(
                format!("drop_with_nft(fw{k}, {link})"),
                std::io::Error::other(format!("{percent} % is out of range 1–100")),
            ));
        }
        let _ = self.undrop_nft(k, link);
        let name = link.ifname();
        let verdict = if percent == 100 {
            "drop".to_owned()
        } else {
            format!("numgen random mod 100 < {percent} drop")
        };
        let script = format!(
            "table inet hasync_lab_{name} {{\n\
             \tchain in {{ type filter hook input priority raw; policy accept; iifname \"{name}\" {verdict}; }}\n\
             \tchain transit {{ type filter hook forward priority raw; policy accept; iifname \"{name}\" {verdict}; oifname \"{name}\" {verdict}; }}\n\
             \tchain out {{ type filter hook output priority raw; policy accept; oifname \"{name}\" {verdict}; }}\n\
             }}\n"
        );
        self.nft(&format!("fw{k}"), &script)
    }

    /// Runs the nftables `script` (`nft -f -`) inside namespace `name` (a short name: `fw1`,
    /// `server`).
    pub fn nft(&self, name: &str, script: &str) -> Result<()> {
        let mut cmd = netns::command_in(self.try_ns(name)?, "nft")?;
        cmd.args(["-f", "-"]);
        netns::output(&mut cmd, Some(script)).map(drop)
    }

    /// Removes the drop [`Topology::drop_with_nft`] put on member `k`'s `link`.
    pub fn undrop_nft(&self, k: u8, link: Link) -> Result<()> {
        self.check_member(k)?;
        let table = format!("hasync_lab_{}", link.ifname());
        self.nft(&format!("fw{k}"), &format!("delete table inet {table}\n"))
    }

    /// Plugs namespace `ns` (a full name, created by the caller, e.g. an intruder for a fault
    /// run) into `link`'s bridge: a veth pair created in `hasw` as port `port`, its peer placed
    /// straight into `ns` as `ifname` with address `cidr` (a lab address), both up. Deleting
    /// `ns` removes the pair.
    pub fn plug(&self, ns: &str, ifname: &str, link: Link, port: &str, cidr: &str) -> Result<()> {
        check_plug(ns, ifname, port, cidr)?;
        ip_batch(
            self.hasw(),
            &[
                format!("link add {port} type veth peer name {ifname} netns {ns}"),
                format!("link set {port} master {} up", link.bridge()),
            ],
        )?;
        ip_batch(
            ns,
            &[
                format!("addr add {cidr} dev {ifname}"),
                format!("link set {ifname} up"),
            ],
        )
    }

    /// A command that runs `program` inside namespace `name` (a short name: `fw1`): it joins
    /// the namespace between fork and exec. Start it with [`Topology::spawn`].
    pub fn command(&self, name: &str, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        netns::command_in(self.try_ns(name)?, program)
    }

    /// Starts `cmd` (made by [`Topology::command`]), keeping it to stop, by PID, on drop.
    pub fn spawn(&self, label: &str, cmd: Command) -> Result<u32> {
        self.processes.spawn(label, cmd)
    }

    /// The processes this lab started.
    pub fn processes(&self) -> &Processes {
        &self.processes
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Processes first: a namespace outlives `ip netns del` while anything runs in it.
        self.processes.stop_all(Duration::from_secs(3));
        let created: Vec<String> = self.created.iter().rev().cloned().collect();
        if let Err(e) = del_namespaces(&created) {
            eprintln!("lab cleanup: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs root. A namespace given by a name that is not a named namespace (a number, which
    /// iproute2 would take for a PID: "1" is the root namespace's), an interface name that
    /// would add a line to the batch, or an address outside the lab's ranges are refused
    /// before any command runs (before stop 42 the namespace was checked only after the pair
    /// was made: seen failing, "1" accepted).
    /// Only entries of this tag whose process is gone are a dead run's: not this process's,
    /// not a live one's, not another tag's (a prefix of it included).
    #[test]
    fn a_gone_run_is_told_by_its_tag_and_a_dead_pid() {
        let dir = crate::control::testing::TempDir::new("goneruns");
        let me = std::process::id();
        let dead = 4_194_304 + 7; // above pid_max's largest value: never a live process
        for name in [
            format!("t{dead}-fw1"),
            format!("t{me}-fw1"),
            "t1-fw1".to_owned(),
            format!("tt{dead}-fw1"),
            format!("t{dead}"),
        ] {
            std::fs::create_dir(dir.path().join(name)).expect("entry");
        }
        let path = dir.path().to_str().expect("utf-8");
        assert_eq!(names_of_gone_runs(path, "t", me), [format!("t{dead}-fw1")]);
    }

    #[test]
    fn a_plug_into_anything_but_a_named_namespace_is_refused_first() {
        let name = format!("plugchk{}", std::process::id());
        let ip = |verb: &str| {
            std::process::Command::new("ip")
                .args(["netns", verb, &name])
                .status()
                .expect("ip")
        };
        assert!(ip("add").success());
        let results = [
            check_plug("1", "x0", "p0", "198.18.100.250/24").is_err(),
            check_plug("/proc/self/ns/net", "x0", "p0", "198.18.100.250/24").is_err(),
            check_plug("../../../proc/self/ns/net", "x0", "p0", "198.18.100.250/24").is_err(),
            check_plug(&name, "x0\nlink del hasw", "p0", "198.18.100.250/24").is_err(),
            check_plug(&name, "x0", "p0", "10.0.0.1/24").is_err(),
            check_plug(&name, "x0", "p0", "198.18.100.250/24").is_ok(),
        ];
        ip("del");
        assert_eq!(results, [true; 6]);
    }
}
