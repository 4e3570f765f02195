//! The ids of a config file, read into their types ([`ClusterId`], [`MemberId`]). Any integer
//! that fits the id's byte is read, so that [`super::Config::validate`] names one out of range
//! by its key among every other problem (`cluster.id = 0 is out of range 1–99`); a larger one
//! is refused while parsing, in the same words (`cluster id 300 is out of range 1–99`).

use std::fmt;

use hasync_common::{ClusterId, MemberId};
use serde::{
    de::{Error, Visitor},
    Deserializer, Serializer,
};

/// The byte of an id called `what`, whose valid values are `lo`–`hi`.
fn id_byte<'de, D: Deserializer<'de>>(
    d: D,
    what: &'static str,
    range: (u8, u8),
) -> Result<u8, D::Error> {
    d.deserialize_i64(IdVisitor { what, range })
}

struct IdVisitor {
    what: &'static str,
    range: (u8, u8),
}

impl IdVisitor {
    fn byte<E: Error>(&self, v: impl Into<i128>) -> Result<u8, E> {
        let v = v.into();
        let (lo, hi) = self.range;
        u8::try_from(v)
            .map_err(|_| E::custom(format!("{} {v} is out of range {lo}–{hi}", self.what)))
    }
}

impl Visitor<'_> for IdVisitor {
    type Value = u8;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (lo, hi) = self.range;
        write!(f, "a {}, an integer {lo}–{hi}", self.what)
    }

    fn visit_i64<E: Error>(self, v: i64) -> Result<u8, E> {
        self.byte(v)
    }

    fn visit_u64<E: Error>(self, v: u64) -> Result<u8, E> {
        self.byte(v)
    }
}

/// `#[serde(with = "ids::cluster_id")]`.
pub mod cluster_id {
    use super::*;

    pub fn serialize<S: Serializer>(id: &ClusterId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(id.0)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ClusterId, D::Error> {
        id_byte(d, "cluster id", (ClusterId::MIN, ClusterId::MAX)).map(ClusterId)
    }
}

/// `#[serde(with = "ids::member_id")]`.
pub mod member_id {
    use super::*;

    pub fn serialize<S: Serializer>(id: &MemberId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(id.0)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<MemberId, D::Error> {
        id_byte(d, "member id", (1, MemberId::MAX)).map(MemberId)
    }
}
