//! The forwarding maps: which interfaces XDP may redirect to (FWD_PORTS), the virtual wires'
//! pairs (VWIRE_PORTS), the routed interfaces' addresses (INGRESS_MACS), and the FIB
//! generation that invalidates the forwarding cache.

use std::collections::BTreeSet;

use aya::maps::{Array, DevMapHash, PerCpuArray};
use hasync_common::{maps as names, FibEntry, FibKey, IngressMac};

use super::{map_err, Datapath, DatapathError};

impl Datapath {
    fn devmap(
        &mut self,
        name: &'static str,
    ) -> Result<DevMapHash<&mut aya::maps::MapData>, DatapathError> {
        DevMapHash::try_from(self.map_mut(name)?).map_err(map_err(name))
    }

    /// Makes `map` hold exactly `entries` (key → target interface), as far as it can: an
    /// entry the kernel refuses (an interface gone since it was looked up) does not keep the
    /// others from being written. Says whether the map changed, and the first refusal.
    fn set_ports(&mut self, name: &'static str, entries: &[(u32, u32)]) -> Written {
        if entries.len() > names::PORTS_CAPACITY as usize {
            return Written::failed(DatapathError::TooManyPorts {
                map: name,
                count: entries.len(),
            });
        }
        let mut map = match self.devmap(name) {
            Ok(map) => map,
            Err(e) => return Written::failed(e),
        };
        let keys: Vec<u32> = match map.keys().collect::<Result<_, _>>() {
            Ok(keys) => keys,
            Err(e) => return Written::failed(map_err(name)(e)),
        };
        let mut w = Written::default();
        for key in keys
            .iter()
            .filter(|k| !entries.iter().any(|(e, _)| e == *k))
        {
            w.note(map.remove(*key).map_err(map_err(name)));
        }
        for &(key, target) in entries {
            let same = map.get(key, 0).is_ok_and(|v| v.if_index == target);
            if !same {
                w.note(
                    map.insert(key, target, None, 0)
                        .map_err(|source| DatapathError::Port {
                            map: name,
                            key,
                            source,
                        }),
                );
            }
        }
        w
    }

    /// Makes FWD_PORTS hold exactly `ifindexes`: the interfaces XDP forwarding may send to.
    /// Bumps the FIB generation when the set changed (also in part, before a refusal), so no
    /// cached next hop outlives its port.
    pub fn set_fwd_ports(&mut self, ifindexes: &[u32]) -> Result<bool, DatapathError> {
        let entries: Vec<(u32, u32)> = ifindexes.iter().map(|&i| (i, i)).collect();
        let w = self.set_ports(names::FWD_PORTS, &entries);
        if w.changed {
            self.bump_fib_generation()?;
        }
        w.result()
    }

    /// Makes VWIRE_PORTS hold exactly the wires `pairs` (each end → the other, both ways).
    pub fn set_vwire_ports(&mut self, pairs: &[(u32, u32)]) -> Result<bool, DatapathError> {
        let entries: Vec<(u32, u32)> = pairs.iter().flat_map(|&(a, b)| [(a, b), (b, a)]).collect();
        self.set_ports(names::VWIRE_PORTS, &entries).result()
    }

    /// Makes INGRESS_MACS hold exactly `macs` (ifindex → the interface's Ethernet address):
    /// XDP forwarding takes only frames sent to the address of the interface they came in on.
    /// Returns whether it changed.
    pub fn set_ingress_macs(&mut self, macs: &[(u32, [u8; 6])]) -> Result<bool, DatapathError> {
        if let Some(&(index, _)) = macs.iter().find(|(i, _)| *i >= names::ZONE_IFINDEX_LIMIT) {
            return Err(DatapathError::IfindexTooLarge(index));
        }
        let want: std::collections::BTreeMap<u32, [u8; 6]> = macs.iter().copied().collect();
        if want == self.ingress_macs {
            return Ok(false);
        }
        let gone: Vec<u32> = self
            .ingress_macs
            .keys()
            .filter(|i| !want.contains_key(i))
            .copied()
            .collect();
        let name = names::INGRESS_MACS;
        let mut map: Array<_, IngressMac> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        for index in gone {
            map.set(index, IngressMac::default(), 0)
                .map_err(map_err(name))?;
        }
        for (&index, &mac) in &want {
            let entry = IngressMac {
                mac,
                known: 1,
                _pad: 0,
            };
            map.set(index, entry, 0).map_err(map_err(name))?;
        }
        self.ingress_macs = want;
        Ok(true)
    }

    /// Keys the FIB cache on the source as well as the destination (`true`: some rule or
    /// route selects by source), or on the destination alone; every cached next hop is
    /// dropped when that changes. Kept across [`Datapath::set_config`]. True when it changed.
    pub fn set_fib_by_source(&mut self, by_source: bool) -> Result<bool, DatapathError> {
        if self.fib_by_source == Some(by_source) {
            return Ok(false);
        }
        self.fib_by_source = Some(by_source);
        let cfg = self.config()?;
        self.set_config(&cfg)?;
        self.bump_fib_generation().map(|_| true)
    }

    /// The keys of the next hops the XDP forwarding has cached in the current FIB generation,
    /// on any CPU, each once, in order (diagnostics and tests; an entry may have expired since).
    pub fn fib_cache_keys(&self) -> Result<Vec<FibKey>, DatapathError> {
        let generation = self.fib_generation()?;
        let name = names::FIB_CACHE;
        let map: PerCpuArray<_, FibEntry> =
            PerCpuArray::try_from(self.map(name)?).map_err(map_err(name))?;
        let mut keys = BTreeSet::new();
        for slot in 0..map.len() {
            let per_cpu = map.get(&slot, 0).map_err(map_err(name))?;
            // A slot never written holds all zeros: family 0.
            let live = per_cpu
                .iter()
                .filter(|e| e.key.family != 0 && e.generation == generation);
            keys.extend(live.map(|e| e.key));
        }
        Ok(keys.into_iter().collect())
    }

    /// The FIB generation: cached next hops of another one are looked up again.
    pub fn fib_generation(&self) -> Result<u32, DatapathError> {
        let name = names::FIB_GENERATION;
        let map: Array<_, u32> = Array::try_from(self.map(name)?).map_err(map_err(name))?;
        map.get(&0, 0).map_err(map_err(name))
    }

    /// Invalidates every cached next hop: routes or neighbours changed. Returns the new
    /// generation.
    pub fn bump_fib_generation(&mut self) -> Result<u32, DatapathError> {
        let name = names::FIB_GENERATION;
        let next = self.fib_generation()?.wrapping_add(1);
        let mut map: Array<_, u32> = Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        map.set(0, next, 0).map_err(map_err(name))?;
        Ok(next)
    }
}

/// What [`Datapath::set_ports`] did: whether the map changed, and its first error.
#[derive(Default)]
struct Written {
    changed: bool,
    error: Option<DatapathError>,
}

impl Written {
    fn failed(e: DatapathError) -> Written {
        Written {
            changed: false,
            error: Some(e),
        }
    }

    /// One write's outcome: a change, or an error (the first is kept).
    fn note(&mut self, done: Result<(), DatapathError>) {
        match done {
            Ok(()) => self.changed = true,
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
    }

    fn result(self) -> Result<bool, DatapathError> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(self.changed),
        }
    }
}
