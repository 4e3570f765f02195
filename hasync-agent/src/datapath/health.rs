//! Is the datapath still in place? Each attachment is compared with what the kernel lists
//! now: the interface may be gone, re-created under the same name (a new index, no XDP), or
//! stripped of its program or given another one. The agent treats any of these as a
//! datapath failure (the member goes Non-functional) and repairs what it can.

use std::fmt;

use super::{AttachMode, Datapath};
use crate::netlink::Ifaces;

/// What is wrong with one attachment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttachmentFault {
    /// No interface has that name any more.
    Gone,
    /// An interface of that name exists, but it is another one (re-created).
    Recreated { index: u32 },
    /// The interface runs no XDP program in the attachment's mode.
    Detached,
    /// Another XDP program runs in its place.
    Replaced { program: u32 },
    /// Attaching again failed earlier; the interface runs no program of ours.
    NotAttached,
}

/// One broken attachment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokenAttachment {
    pub interface: String,
    /// The index it was attached at.
    pub ifindex: u32,
    pub mode: AttachMode,
    pub fault: AttachmentFault,
}

impl BrokenAttachment {
    /// Can attaching again mend it? Not while the interface is missing.
    pub fn repairable(&self) -> bool {
        self.fault != AttachmentFault::Gone
    }
}

impl fmt::Display for BrokenAttachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.interface;
        match self.fault {
            AttachmentFault::Gone => write!(f, "interface {i} is gone"),
            AttachmentFault::Recreated { index } => {
                write!(
                    f,
                    "interface {i} was re-created (ifindex {index}) without XDP"
                )
            }
            AttachmentFault::Detached => write!(f, "XDP ({}) was detached from {i}", self.mode),
            AttachmentFault::Replaced { program } => {
                write!(f, "another XDP program (id {program}) runs on {i}")
            }
            AttachmentFault::NotAttached => write!(f, "XDP could not be attached to {i} again"),
        }
    }
}

impl Datapath {
    /// The attachments that `ifaces` (a fresh [`crate::netlink::list_now`]) shows broken.
    pub fn broken_attachments(&self, ifaces: &Ifaces) -> Vec<BrokenAttachment> {
        let ours = self.program_id();
        self.attachments()
            .iter()
            .filter_map(|a| {
                let fault = match ifaces.get(&a.interface) {
                    None => AttachmentFault::Gone,
                    Some(i) if i.index != a.ifindex => {
                        AttachmentFault::Recreated { index: i.index }
                    }
                    Some(i) => {
                        let running = match a.mode {
                            AttachMode::Native => i.xdp.native,
                            AttachMode::Generic => i.xdp.generic,
                        };
                        match running {
                            None => AttachmentFault::Detached,
                            Some(id) if ours.is_some_and(|o| o != id) => {
                                AttachmentFault::Replaced { program: id }
                            }
                            Some(_) => return None,
                        }
                    }
                };
                Some(BrokenAttachment {
                    interface: a.interface.clone(),
                    ifindex: a.ifindex,
                    mode: a.mode,
                    fault,
                })
            })
            .chain(self.lost_attachments().iter().map(|(name, index, mode)| {
                let fault = match ifaces.get(name) {
                    None => AttachmentFault::Gone,
                    Some(i) if i.index != *index => AttachmentFault::Recreated { index: i.index },
                    Some(_) => AttachmentFault::NotAttached,
                };
                BrokenAttachment {
                    interface: name.clone(),
                    ifindex: *index,
                    mode: *mode,
                    fault,
                }
            }))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        datapath::testing::{datapath, in_fresh_netns, ip},
        netlink::list_now,
    };

    fn veth() {
        ip(&[
            "link", "add", "hsh-a0", "type", "veth", "peer", "name", "hsh-a1",
        ]);
        ip(&["link", "set", "hsh-a0", "up"]);
    }

    /// The kernel's list shows our program on the interface; a deleted interface is gone, a
    /// re-created one is another, and attaching again mends that.
    #[test]
    fn a_gone_or_recreated_interface_is_a_broken_attachment_until_reattached() {
        in_fresh_netns(|| {
            veth();
            let mut dp = datapath();
            assert_eq!(dp.attach("hsh-a0").expect("attach"), AttachMode::Native);
            let now = list_now().expect("dump");
            assert_eq!(now["hsh-a0"].xdp.native, dp.program_id());
            assert!(dp.program_id().is_some());
            assert_eq!(dp.broken_attachments(&now), []);

            ip(&["link", "del", "hsh-a0"]);
            let broken = dp.broken_attachments(&list_now().expect("dump"));
            assert_eq!(broken.len(), 1);
            assert_eq!(broken[0].fault, AttachmentFault::Gone);
            assert!(!broken[0].repairable());
            assert_eq!(broken[0].to_string(), "interface hsh-a0 is gone");

            veth();
            let now = list_now().expect("dump");
            let broken = dp.broken_attachments(&now);
            let index = now["hsh-a0"].index;
            assert_eq!(broken[0].fault, AttachmentFault::Recreated { index });
            assert!(broken[0].repairable());
            dp.reattach("hsh-a0").expect("reattach");
            assert_eq!(dp.attachments().len(), 1);
            assert_eq!(dp.broken_attachments(&list_now().expect("dump")), []);
        });
    }
}
