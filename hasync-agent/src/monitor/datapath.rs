//! The datapath's health: every second the attachments are compared with a fresh netlink
//! dump, and what broke is attached again where possible (not while suspended).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use hasync_common::ZoneBinding;
use tracing::{info, warn};

use super::record;
use crate::{
    cluster::{Condition, Membership},
    config::Config,
    datapath::{
        error_chain,
        health::{AttachmentFault, BrokenAttachment},
        Datapath,
    },
    lock::lock,
    netlink::{list_now, Ifaces},
};

/// How often the datapath's attachments are checked against the kernel's list.
const DATAPATH_EVERY: Duration = Duration::from_secs(1);

pub(super) async fn watch_datapath(
    config: Config,
    dp: Arc<Mutex<Datapath>>,
    membership: Arc<Mutex<Membership>>,
) {
    let mut tick = tokio::time::interval(DATAPATH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let config = Arc::new(config);
    loop {
        tick.tick().await;
        // A suspended member's datapath is the operator's to take apart: seen, not mended.
        let mend = !lock(&membership).suspended;
        let (config, dp) = (config.clone(), dp.clone());
        let checked = tokio::task::spawn_blocking(move || check_datapath(&config, &dp, mend)).await;
        match checked {
            Ok(Some(cause)) => record(&membership, Condition::Datapath, cause),
            // Could not look (netlink failed): the last verdict stands.
            Ok(None) => {}
            Err(e) => warn!(error = %e, "one datapath check failed; checking again next second"),
        }
    }
}

/// Checks the attachments; `Some(cause)` when something is broken (after trying to mend it
/// when `mend`: the next check, a second later, sees whether that worked), `Some(None)` when
/// all is well, `None` when the kernel's list could not be read.
fn check_datapath(config: &Config, dp: &Mutex<Datapath>, mend: bool) -> Option<Option<String>> {
    let ifaces = match list_now() {
        Ok(t) => t,
        Err(e) => {
            warn!(error = %e, "cannot list the interfaces to check the datapath");
            return None;
        }
    };
    let mut dp = lock(dp);
    let broken = dp.broken_attachments(&ifaces);
    if broken.is_empty() {
        return Some(None);
    }
    let mut causes: Vec<String> = broken.iter().map(ToString::to_string).collect();
    for b in broken.iter().filter(|b| mend && b.repairable()) {
        match repair(&mut dp, config, b, &ifaces) {
            Ok(()) => info!(interface = %b.interface, "XDP attached again"),
            Err(e) => causes.push(format!("attaching {} again failed: {e}", b.interface)),
        }
    }
    Some(Some(causes.join("; ")))
}

/// Attaches `b`'s interface again; a re-created interface gets its zone binding at its new
/// index, and its old index none (unless another configured interface has it now).
fn repair(
    dp: &mut Datapath,
    config: &Config,
    b: &BrokenAttachment,
    ifaces: &Ifaces,
) -> Result<(), String> {
    if let AttachmentFault::Recreated { index } = b.fault {
        let binding = config
            .interface_zones()
            .find(|(name, _, _)| *name == b.interface)
            .map(|(_, _, binding)| binding);
        if let Some(binding) = binding {
            let taken = config
                .interface_zones()
                .any(|(name, _, _)| ifaces.get(name).is_some_and(|i| i.index == b.ifindex));
            if !taken {
                dp.set_zone(b.ifindex, ZoneBinding::default())
                    .map_err(|e| error_chain(&e))?;
            }
            dp.set_zone(index, binding).map_err(|e| error_chain(&e))?;
        }
    }
    dp.reattach(&b.interface)
        .map(drop)
        .map_err(|e| error_chain(&e))
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use hasync_common::ZoneId;

    use super::*;
    use crate::{
        datapath::{
            ifindex,
            testing::{in_fresh_netns, ip},
        },
        startup::{bring_up, StartPlan},
    };

    /// A zone interface missing when the agent started (which no longer fails the start) is
    /// a broken attachment the check names, then, once the interface exists, attached by the
    /// check with its zone at its index: the path the running agent takes, end to end.
    #[test]
    fn an_interface_missing_at_the_start_is_attached_and_zoned_once_it_exists() {
        let (first, second, third, zone) = in_fresh_netns(|| {
            let text = crate::config::tests::sample(Path::new("/nonexistent/cluster.key"));
            let mut config = Config::from_toml(Path::new("test.toml"), &text).expect("config");
            config.local.pin_dir = PathBuf::new();
            config.local.session_capacity = 4096;
            config.zones[0].interfaces = vec!["hsr-a0".into()];
            config.zones[1].interfaces = Vec::new();
            let plan = StartPlan::from_config(&config);
            let (started, ()) = bring_up(&plan, |_| Ok(())).expect("started");
            let dp = Mutex::new(started.dp);
            let first = check_datapath(&config, &dp, true);
            ip(&[
                "link", "add", "hsr-a0", "type", "veth", "peer", "name", "hsr-a1",
            ]);
            let second = check_datapath(&config, &dp, true);
            let third = check_datapath(&config, &dp, true);
            let index = ifindex("hsr-a0").expect("index");
            let zone = lock(&dp).zone_of(index).expect("zone").zone;
            (first, second, third, zone)
        });
        let first = first.flatten().expect("broken at the start");
        assert!(first.contains("interface hsr-a0 is gone"), "{first}");
        assert!(second.flatten().is_some(), "broken until mended");
        assert_eq!(third, Some(None), "attached once it exists");
        assert_eq!(zone, ZoneId(1), "zoned at its index");
    }
}
