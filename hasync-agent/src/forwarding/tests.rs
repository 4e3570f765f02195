use std::collections::BTreeMap;

use super::*;

/// Interfaces by name: index and whether they take redirects (`None`: the kernel cannot tell);
/// and the IPsec policies that select forwarded or sent traffic.
struct Fake(
    BTreeMap<&'static str, (u32, Option<bool>)>,
    Result<Option<String>, String>,
);

impl Devices for Fake {
    fn index(&self, name: &str) -> Option<u32> {
        self.0.get(name).map(|d| d.0)
    }
    fn takes_redirects(&mut self, ifindex: u32) -> Result<bool, String> {
        let d = self.0.values().find(|d| d.0 == ifindex).ok_or("gone")?;
        d.1.ok_or_else(|| "no netdev family".to_owned())
    }
    fn mac(&self, name: &str) -> Option<[u8; 6]> {
        self.0.get(name).map(|d| [2, 0, 0, 0, 0, d.0 as u8])
    }
    fn ipsec_policies(&mut self) -> Result<Option<String>, String> {
        self.1.clone()
    }
}

fn config(extra: &str) -> Config {
    let text = format!(
        r#"
[cluster]
id = 1
key_file = "/nonexistent"
[local]
member = 1
{extra}
[ha4]
interface = "ha4"
address = "198.18.100.1/24"
[[zones]]
name = "trust"
interfaces = ["in0", "in1"]
[[zones]]
name = "untrust"
interfaces = ["out0", "w0", "w1"]
[[members]]
id = 1
serial = "a"
ha4 = "198.18.100.1"
"#
    );
    let wires = "\n[[vwire]]\nname = \"vw\"\ninterfaces = [\"w0\", \"w1\"]\n";
    Config::from_toml("t.toml".as_ref(), &(text + wires)).expect("parses")
}

#[test]
fn only_zone_interfaces_that_take_redirects_are_ports_and_wires_need_both_ends() {
    let mut devices = Fake(
        BTreeMap::from([
            ("in0", (4, Some(true))),
            ("in1", (5, Some(false))),
            ("out0", (6, None)),
            ("w0", (7, Some(true))),
            ("w1", (8, Some(true))),
        ]),
        Ok(None),
    );
    let ports = plan(&config("forwarding = \"xdp\""), &mut devices, &[]);
    assert_eq!(
        ports.forward,
        vec![4],
        "not in1 (no xmit), not out0 (unknown), not a wire end"
    );
    assert_eq!(ports.wires, vec![(7, 8)]);
    let mac = |i: u8| [2, 0, 0, 0, 0, i];
    assert_eq!(
        ports.macs,
        vec![(4, mac(4)), (5, mac(5)), (6, mac(6))],
        "every routed zone interface is an ingress, a port or not"
    );
    assert_eq!(ports.left_out.len(), 2, "{:#?}", ports.left_out);
    assert!(ports.left_out[0].contains("in1: its driver takes no XDP redirects"));
    assert!(ports.left_out[1].contains("out0: its XDP features are unknown: no netdev family"));

    devices.0.remove("w1");
    let ports = plan(&config(""), &mut devices, &[]);
    assert!(
        ports.forward.is_empty() && ports.macs.is_empty(),
        "forwarding = kernel: no routed ports"
    );
    assert!(ports.wires.is_empty());
    assert_eq!(
        ports.left_out,
        vec!["virtual wire vw is down: w1: no such interface"]
    );
}

/// A zone interface made again with an ifindex above what ZONES holds (65,535: no zone can
/// bind it, so its traffic is the kernel's) is left out, named, and the others' ports and
/// addresses still reach the maps: seen failing, its address went into INGRESS_MACS' list,
/// whose write then failed whole every second, so no other interface's address change
/// reached XDP.
#[test]
fn an_interface_with_an_index_no_zone_can_bind_is_left_out_alone() {
    let mut devices = Fake(
        BTreeMap::from([
            ("in0", (4, Some(true))),
            ("in1", (70_000, Some(true))),
            ("out0", (6, Some(true))),
        ]),
        Ok(None),
    );
    let ports = plan(&config("forwarding = \"xdp\""), &mut devices, &[]);
    assert_eq!(ports.forward, vec![4, 6]);
    let indexes: Vec<u32> = ports.macs.iter().map(|(i, _)| *i).collect();
    assert_eq!(indexes, vec![4, 6]);
    assert!(
        ports.left_out.iter().any(|l| l
            == "forwarding to in1: its ifindex 70000 is above the largest a zone can bind (65535): the kernel forwards its traffic"),
        "{:#?}",
        ports.left_out
    );
}

/// A zone that turns its route check off is still a routed zone: its interfaces stay ports
/// (its binding carries a flag, as a wire's end does, but only wire ends are left out).
#[test]
fn a_zone_without_route_check_keeps_its_ports() {
    let mut devices = Fake(
        BTreeMap::from([
            ("in0", (4, Some(true))),
            ("in1", (5, Some(true))),
            ("out0", (6, Some(true))),
            ("w0", (7, Some(true))),
            ("w1", (8, Some(true))),
        ]),
        Ok(None),
    );
    let mut c = config("forwarding = \"xdp\"");
    c.zones[0].route_check = Some(false);
    let ports = plan(&c, &mut devices, &[]);
    assert_eq!(ports.forward, vec![4, 5, 6], "{:#?}", ports.left_out);
    assert_eq!(ports.wires, vec![(7, 8)]);
}

/// A wire end whose XDP features the kernel could not tell (the `netdev` socket timed out, an
/// older kernel) keeps its wire: a redirect the end cannot take is dropped, as a wire that is
/// down drops, so leaving it out only made sure of the drop (before stop 42, a failed query
/// emptied the wires and their traffic was dropped: seen failing). A routed port stays out
/// (the kernel forwards instead).
#[test]
fn a_wire_whose_ends_features_are_unknown_is_kept() {
    let mut devices = Fake(
        BTreeMap::from([
            ("in0", (4, Some(true))),
            ("in1", (5, None)),
            ("out0", (6, Some(true))),
            ("w0", (7, None)),
            ("w1", (8, Some(true))),
        ]),
        Ok(None),
    );
    let ports = plan(&config("forwarding = \"xdp\""), &mut devices, &[]);
    assert_eq!(ports.wires, vec![(7, 8)], "{:#?}", ports.left_out);
    assert_eq!(ports.forward, vec![4, 6]);
    assert!(
        ports.left_out[0].contains("virtual wire vw: w0: its XDP features are unknown"),
        "{:#?}",
        ports.left_out
    );
    devices.0.insert("w1", (8, Some(false)));
    let ports = plan(&config(""), &mut devices, &[]);
    assert!(ports.wires.is_empty(), "an end that says no is down");
}

/// A routed port whose features the kernel could not tell this time (the `netdev` query timed
/// out, and every later query of that check failed with it) stays a port if the last check
/// found it one: before stop 51 it was left out, its flows went to the kernel for a second
/// and came back (the generation bumped both times; seen failing). One not a port before
/// waits for an answer.
#[test]
fn a_routed_port_whose_features_are_unknown_keeps_the_last_verdict() {
    let mut devices = Fake(
        BTreeMap::from([
            ("in0", (4, Some(true))),
            ("in1", (5, Some(true))),
            ("out0", (6, None)),
        ]),
        Ok(None),
    );
    let c = config("forwarding = \"xdp\"");
    let first = plan(&c, &mut devices, &[]);
    assert_eq!(first.forward, vec![4, 5], "out0 not known yet");
    devices.0.insert("in0", (4, None));
    devices.0.insert("in1", (5, None));
    let next = plan(&c, &mut devices, &first.forward);
    assert_eq!(next.forward, vec![4, 5], "{:#?}", next.left_out);
    assert!(
        next.left_out
            .iter()
            .any(|l| l.contains("in0: its XDP features are unknown") && l.ends_with("; kept")),
        "{:#?}",
        next.left_out
    );
    devices.0.insert("in1", (5, Some(false)));
    let after = plan(&c, &mut devices, &next.forward);
    assert_eq!(after.forward, vec![4], "an answer of no is taken");
}

/// While IPsec policies select forwarded or sent traffic (or the kernel cannot say whether),
/// no routed port is offered: XDP would forward an established flow past them, in the clear
/// (found by a review: nothing looked at the policies). Wires, bridged, keep their place.
#[test]
fn ipsec_policies_leave_every_routed_port_to_the_kernel() {
    let mut devices = Fake(
        BTreeMap::from([
            ("in0", (4, Some(true))),
            ("out0", (6, Some(true))),
            ("w0", (7, Some(true))),
            ("w1", (8, Some(true))),
        ]),
        Ok(Some(
            "2 IPsec policies select forwarded or sent traffic (`ip xfrm policy`)".into(),
        )),
    );
    let c = config("forwarding = \"xdp\"");
    let ports = plan(&c, &mut devices, &[4, 6]);
    assert!(ports.forward.is_empty(), "{:?}", ports.forward);
    assert_eq!(ports.wires, vec![(7, 8)]);
    assert!(
        ports.left_out.iter().any(|l| l
            .starts_with("forwarding in XDP: 2 IPsec policies select forwarded or sent traffic")),
        "{:#?}",
        ports.left_out
    );
    devices.1 = Err("XFRM netlink socket: timed out".into());
    let unknown = plan(&c, &mut devices, &[4, 6]);
    assert!(unknown.forward.is_empty(), "unknown is not none");
    devices.1 = Ok(None);
    assert_eq!(plan(&c, &mut devices, &[]).forward, vec![4, 6]);
}

/// A device the kernel refuses to describe (gone since the interface table was read) is that
/// device's answer alone: the next device is still asked on the same socket (before stop 42
/// the refusal failed every later query of the check, and the wires after it were dropped:
/// seen failing).
#[test]
fn a_refused_query_leaves_the_next_device_to_be_asked() {
    let features = Features::open().expect("the netdev family (Linux 6.3 or later)");
    let mut system = System {
        ifaces: Arc::default(),
        features: Ok(features),
    };
    let gone = system.takes_redirects(u32::MAX - 1);
    assert!(gone.is_err(), "{gone:?}");
    let lo = system.takes_redirects(1);
    assert!(lo.is_ok(), "the loopback device was not asked: {lo:?}");
}

/// Notifications that never pause for [`COALESCE`] (a routing daemon's churn, neighbours
/// flapping) still bump the generation within [`BURST_MAX`] of the burst's first: before stop
/// 42 the burst was read until it paused, and cached next hops stayed in use (until their
/// entries' 2 s lifetime) for as long as the churn lasted (seen failing: no end in 2 s).
#[tokio::test]
async fn a_burst_that_never_pauses_is_cut_after_its_longest() {
    let started = tokio::time::Instant::now();
    let next = || async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        Change::None
    };
    let burst = tokio::time::timeout(
        Duration::from_secs(2),
        rest_of_burst(Change::BySource, next),
    );
    let change = burst.await.expect("the burst was cut");
    assert_eq!(change, Change::BySource);
    assert!(started.elapsed() >= BURST_MAX, "{:?}", started.elapsed());
}

/// The FIB generation's bump after a burst waits for the datapath's lock off the async
/// workers: a route change that comes with a re-created interface (whose XDP the datapath
/// monitor attaches again, holding the lock) must not stop the agent's other tasks. Seen
/// failing (a plain lock: the timer waited for the holder). Both bumps land.
#[test]
fn the_bump_after_a_burst_leaves_the_workers_free_while_the_datapath_is_held() {
    let dp = Arc::new(Mutex::new(crate::datapath::testing::datapath()));
    let before = crate::lock::lock(&dp).fib_generation().expect("read");
    let bumping = Arc::clone(&dp);
    let ran = crate::lock::timer_runs_while_held(&dp, move || after_burst(&bumping, None));
    assert!(ran, "a timer task waited for the datapath's holder");
    let after = crate::lock::lock(&dp).fib_generation().expect("read");
    assert_eq!(after, before.wrapping_add(2));
}
