//! The control-socket protocol: newline-delimited JSON, one request per line, one response per
//! line, in order. A client may send several requests on one connection.
//!
//! ```text
//! → {"request":"show-members"}
//! ← {"ok":true,"error":null,"data":{"cluster_id":7,"local":1,"members":[...]}}
//! → {"request":"show-sessions","count_only":false,"filter":{"proto":"tcp","port":443},"offset":0,"limit":1000}
//! ← {"ok":true,"error":null,"data":{"total":2,"by_owner":{"1":2},"sessions":[...]}}
//! → {"request":"show-sessions","filter":{"prot":"tcp"}}
//! ← {"ok":false,"error":"malformed request: unknown field `prot`, ...","data":null}
//! ```
//!
//! Fields other than `request` may be left out; they take their defaults.

use std::net::IpAddr;

use hasync_common::{
    flow::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP},
    MemberId, State,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::view::SessionView;

/// Longest request line the server accepts, newline excluded.
pub const MAX_REQUEST_LINE: usize = 64 * 1024;

/// Most sessions one `show-sessions` answer lists, whatever `limit` asks: an answer is one
/// line held in memory on both sides (about 150 bytes per session).
pub const MAX_SESSION_PAGE: u64 = 100_000;

/// `limit` if it is a page size a request may ask for (1 to [`MAX_SESSION_PAGE`]), else the
/// error that says so.
pub fn check_limit(limit: u64) -> Result<u64, String> {
    if (1..=MAX_SESSION_PAGE).contains(&limit) {
        Ok(limit)
    } else {
        Err(format!(
            "limit {limit} is out of range 1–{MAX_SESSION_PAGE}"
        ))
    }
}

/// Protocol names a session filter accepts, with their IP protocol numbers.
pub const PROTOCOLS: [(&str, u8); 4] = [
    ("tcp", IPPROTO_TCP),
    ("udp", IPPROTO_UDP),
    ("icmp", IPPROTO_ICMP),
    ("icmpv6", IPPROTO_ICMPV6),
];

/// The name `show` uses for an IP protocol number: `tcp`, `udp`, `icmp`, `icmpv6`, else
/// `proto-N`.
pub fn proto_name(proto: u8) -> String {
    hasync_common::flow::proto_name(proto).map_or_else(|| format!("proto-{proto}"), str::to_owned)
}

/// What the operator asks the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// The cluster's members and their states: a [`super::view::MembersView`].
    ShowMembers {},
    /// The session table, filtered and paged: a [`super::view::SessionsView`].
    ShowSessions {
        /// Only the totals; no `sessions` list.
        #[serde(default)]
        count_only: bool,
        #[serde(default)]
        filter: SessionFilter,
        /// Matching sessions to skip before the listed ones.
        #[serde(default)]
        offset: u64,
        /// Most sessions to list, 1 to [`MAX_SESSION_PAGE`]; `None` lists up to that many.
        #[serde(default)]
        limit: Option<u64>,
    },
    /// The session table's counts as the expiry sweep's last pass over it found them (as
    /// old as that pass's start, which the answer's `counted_ms_ago` says; no walk of its own): a
    /// [`super::view::SessionsView`] without a page. The sweep counts the sessions it left,
    /// not the expired ones it removed, and owners 0–16 only by owner. Before the first
    /// pass completes, counted by a walk as `show-sessions` does. What the metrics and the
    /// dashboard show.
    ShowSessionCounts {},
    /// Sync statistics per peer and link: a [`super::view::StatisticsView`].
    ShowStatistics {},
    /// Datapath counters: a [`super::view::CountersView`].
    ShowCounters {
        /// Only counters whose name starts with this.
        #[serde(default)]
        prefix: Option<String>,
    },
    /// Flaps per member: a [`super::view::FlapsView`].
    ShowFlaps {},
    /// Suspend the local member (it stays suspended until `functional`): answers a
    /// [`super::view::LocalStateView`].
    Suspend {},
    /// Leave the suspended state (through tentative): answers a
    /// [`super::view::LocalStateView`].
    Functional {},
}

impl Request {
    /// Parses one request line (surrounding whitespace ignored): `None` for a blank line, else
    /// the request or the answer to a malformed one.
    pub fn parse_line(line: &[u8]) -> Option<Result<Request, Response>> {
        let text = line.trim_ascii();
        if text.is_empty() {
            return None;
        }
        Some(
            serde_json::from_slice(text)
                .map_err(|e| Response::error(format!("malformed request: {e}"))),
        )
    }

    /// Does it change the member's state (rather than show something)? Readers of the
    /// control socket may ask only for what does not; every request is named here, so a new
    /// one must be placed.
    pub fn changes_state(&self) -> bool {
        match self {
            Request::Suspend {} | Request::Functional {} => true,
            Request::ShowMembers {}
            | Request::ShowSessions { .. }
            | Request::ShowSessionCounts {}
            | Request::ShowStatistics {}
            | Request::ShowCounters { .. }
            | Request::ShowFlaps {} => false,
        }
    }

    /// Short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Request::ShowMembers {} => "show-members",
            Request::ShowSessions { .. } => "show-sessions",
            Request::ShowSessionCounts {} => "show-session-counts",
            Request::ShowStatistics {} => "show-statistics",
            Request::ShowCounters { .. } => "show-counters",
            Request::ShowFlaps {} => "show-flaps",
            Request::Suspend {} => "suspend",
            Request::Functional {} => "functional",
        }
    }
}

/// The agent's answer to one request. `data` is the view the request asked for (`null` on
/// error), as the JSON text it is written out as: the agent renders a view straight to text,
/// never through a tree of JSON values (a full session page of 100,000 sessions took 69 MiB
/// as such a tree, beside its 17 MiB view and 16 MiB of text, against 13 MB of JSON).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default = "null_data")]
    pub data: Box<RawValue>,
}

fn null_data() -> Box<RawValue> {
    RawValue::NULL.to_owned()
}

impl PartialEq for Response {
    fn eq(&self, other: &Response) -> bool {
        (self.ok, &self.error, self.data.get()) == (other.ok, &other.error, other.data.get())
    }
}

impl Response {
    /// A successful answer carrying `data` (a view from [`super::view`]).
    pub fn ok(data: impl Serialize) -> Response {
        match serde_json::value::to_raw_value(&data) {
            Ok(data) => Response {
                ok: true,
                error: None,
                data,
            },
            // Only a map with non-string keys or a failing Serialize impl gets here: a bug.
            Err(e) => Response::error(format!("internal error rendering the answer: {e}")),
        }
    }

    /// A failed answer; `message` names what went wrong and, where it helps, what to do.
    pub fn error(message: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(message.into()),
            data: null_data(),
        }
    }

    /// The answer's data read as `T` (a view, or [`serde_json::Value`]).
    pub fn view<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.data.get())
    }

    /// `Ok(data)` → [`Response::ok`], `Err(message)` → [`Response::error`].
    pub fn from_result<T: Serialize, E: std::fmt::Display>(result: Result<T, E>) -> Response {
        match result {
            Ok(data) => Response::ok(data),
            Err(e) => Response::error(e.to_string()),
        }
    }
}

/// Which sessions `show-sessions` counts and lists. Every field set must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionFilter {
    /// Owner member id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<u8>,
    /// Zone name, as in the configuration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// `tcp`, `udp`, `icmp` or `icmpv6`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proto: Option<String>,
    /// Either endpoint's address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
    /// Either endpoint's port (TCP and UDP only: an ICMP echo identifier is not a port).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// State name (`established`, `udp-replied`, ...; see [`State::name`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

impl SessionFilter {
    /// Checks every value, naming the first bad one and what is allowed. `zones` are the
    /// configured zone names, if the caller knows them.
    pub fn check(&self, zones: Option<&[String]>) -> Result<(), String> {
        let SessionFilter {
            owner,
            zone,
            proto,
            address: _,
            port: _,
            state,
        } = self;
        if let Some(owner) = *owner {
            if !MemberId(owner).is_valid() {
                return Err(format!("owner {owner} is out of range 1–{}", MemberId::MAX));
            }
        }
        if let Some(proto) = proto {
            if !PROTOCOLS.iter().any(|(name, _)| name == proto) {
                let known: Vec<&str> = PROTOCOLS.iter().map(|(name, _)| *name).collect();
                return Err(format!(
                    "protocol \"{proto}\" is not one of {}",
                    known.join(", ")
                ));
            }
        }
        if let Some(state) = state {
            if !State::ALL.iter().any(|s| s.name() == state) {
                let known: Vec<&str> = State::ALL.iter().map(|s| s.name()).collect();
                return Err(format!(
                    "state \"{state}\" is not a session state (known: {})",
                    known.join(", ")
                ));
            }
        }
        if let (Some(zone), Some(zones)) = (zone, zones) {
            if !zones.iter().any(|z| z == zone) {
                return Err(if zones.is_empty() {
                    format!("zone \"{zone}\" is not configured (this member has no zones)")
                } else {
                    format!(
                        "zone \"{zone}\" is not configured (known: {})",
                        zones.join(", ")
                    )
                });
            }
        }
        Ok(())
    }

    /// Does `s` pass every condition set?
    pub fn matches(&self, s: &SessionView) -> bool {
        let SessionFilter {
            owner,
            zone,
            proto,
            address,
            port,
            state,
        } = self;
        owner.is_none_or(|o| s.owner == o)
            && zone.as_ref().is_none_or(|z| s.zone == *z)
            && proto.as_ref().is_none_or(|p| s.proto == *p)
            && address.is_none_or(|a| s.src == a || s.dst == a)
            && port.is_none_or(|p| {
                (s.proto == "tcp" || s.proto == "udp") && (s.sport == p || s.dport == p)
            })
            && state.as_ref().is_none_or(|st| s.state == *st)
    }

    /// No condition set.
    pub fn is_empty(&self) -> bool {
        *self == SessionFilter::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(r: &Request) {
        let line = serde_json::to_string(r).expect("serialize");
        assert!(!line.contains('\n'), "one line: {line}");
        let back: Request = serde_json::from_str(&line).expect("parse");
        assert_eq!(&back, r, "{line}");
    }

    #[test]
    fn every_request_round_trips_as_one_line() {
        for r in [
            Request::ShowMembers {},
            Request::ShowSessions {
                count_only: true,
                filter: SessionFilter::default(),
                offset: 0,
                limit: None,
            },
            Request::ShowSessions {
                count_only: false,
                filter: SessionFilter {
                    owner: Some(2),
                    zone: Some("trust".into()),
                    proto: Some("tcp".into()),
                    address: Some("2001:db8::1".parse().unwrap()),
                    port: Some(443),
                    state: Some("established".into()),
                },
                offset: 1000,
                limit: Some(500),
            },
            Request::ShowSessionCounts {},
            Request::ShowStatistics {},
            Request::ShowCounters { prefix: None },
            Request::ShowCounters {
                prefix: Some("err-".into()),
            },
            Request::ShowFlaps {},
            Request::Suspend {},
            Request::Functional {},
        ] {
            round_trip(&r);
        }
    }

    #[test]
    fn the_wire_form_is_readable_and_fields_may_be_left_out() {
        assert_eq!(
            serde_json::to_string(&Request::ShowFlaps {}).unwrap(),
            r#"{"request":"show-flaps"}"#
        );
        let r: Request =
            serde_json::from_str(r#"{"request":"show-sessions","filter":{"port":53}}"#).unwrap();
        assert_eq!(
            r,
            Request::ShowSessions {
                count_only: false,
                filter: SessionFilter {
                    port: Some(53),
                    ..SessionFilter::default()
                },
                offset: 0,
                limit: None,
            }
        );
        let r: Request = serde_json::from_str(r#"{"request":"show-counters"}"#).unwrap();
        assert_eq!(r, Request::ShowCounters { prefix: None });
    }

    #[test]
    fn unknown_requests_and_misspelt_fields_are_refused() {
        for (line, want) in [
            (r#"{"request":"show-everything"}"#, "unknown variant"),
            (
                r#"{"request":"show-sessions","filter":{"prot":"tcp"}}"#,
                "prot",
            ),
            (r#"{"request":"show-sessions","ofset":3}"#, "ofset"),
            (r#"{"nothing":1}"#, "request"),
            // Requests without parameters take none (before stop 42 a `member` here was
            // skipped and the local member suspended: seen failing).
            (r#"{"request":"suspend","member":2}"#, "member"),
            (r#"{"request":"functional","force":true}"#, "force"),
            (
                r#"{"request":"show-session-counts","filter":{"owner":2}}"#,
                "filter",
            ),
            (r#"{"request":"show-members","zone":"dmz"}"#, "zone"),
            (
                r#"{"request":"show-sessions","filter":{"port":70000}}"#,
                "70000",
            ),
        ] {
            let e = serde_json::from_str::<Request>(line).expect_err(line);
            assert!(e.to_string().contains(want), "{line}: {e}");
        }
    }

    #[test]
    fn responses_round_trip() {
        let ok = Response::ok(serde_json::json!({"total": 3}));
        let line = serde_json::to_string(&ok).unwrap();
        assert_eq!(line, r#"{"ok":true,"error":null,"data":{"total":3}}"#);
        assert_eq!(serde_json::from_str::<Response>(&line).unwrap(), ok);
        let err = Response::from_result::<(), _>(Err("zone \"dmz\" is not configured"));
        assert!(!err.ok);
        assert_eq!(err.data.get(), "null");
        assert_eq!(err.error.as_deref(), Some("zone \"dmz\" is not configured"));
    }

    #[test]
    fn filter_values_are_checked_naming_the_value_and_what_is_allowed() {
        let zones = ["trust".to_string(), "untrust".to_string()];
        for (filter, want) in [
            (
                SessionFilter {
                    owner: Some(17),
                    ..Default::default()
                },
                "owner 17 is out of range 1–16",
            ),
            (
                SessionFilter {
                    proto: Some("sctp".into()),
                    ..Default::default()
                },
                "protocol \"sctp\" is not one of tcp, udp, icmp, icmpv6",
            ),
            (
                SessionFilter {
                    state: Some("open".into()),
                    ..Default::default()
                },
                "state \"open\" is not a session state (known: syn-sent,",
            ),
            (
                SessionFilter {
                    zone: Some("dmz".into()),
                    ..Default::default()
                },
                "zone \"dmz\" is not configured (known: trust, untrust)",
            ),
        ] {
            let e = filter.check(Some(&zones)).expect_err(want);
            assert!(e.contains(want), "{e}");
        }
        let fine = SessionFilter {
            owner: Some(16),
            zone: Some("trust".into()),
            proto: Some("icmpv6".into()),
            state: Some("icmp-echo".into()),
            ..Default::default()
        };
        assert_eq!(fine.check(Some(&zones)), Ok(()));
        // Without the zone list, any zone name passes.
        let dmz = SessionFilter {
            zone: Some("dmz".into()),
            ..Default::default()
        };
        assert_eq!(dmz.check(None), Ok(()));
    }
}
