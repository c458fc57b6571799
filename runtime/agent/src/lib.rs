//! orc-agent: the node agent (`orc node`), orc's kubelet. It registers the
//! Node, renews its Lease, reports status, and runs the pods bound to it: a
//! network namespace wired by `orc-netlink`, root filesystems from the
//! `orc-image` store, containers through `orc-container` (youki's
//! libcontainer under a shim forked by `orc shim-zygote`). One task per pod
//! reconciles what runs to what the pod asks; the decisions are the pure
//! functions of `pod`.
//! Everything it starts is recorded under its data directory, so a restarted
//! agent adopts running containers instead of restarting them. It talks to the
//! cluster only through the `Api` trait; it must not depend on the apiserver.
pub mod dns;
pub use orc_controllers::informer;
pub mod nat;
pub mod node;
pub mod pod;
pub mod probe;
pub mod server;
pub mod services;
pub mod worker;

pub use node::{run, Config};

use std::path::Path;

/// Undo everything an agent with this data directory made: kill its
/// containers and shims, unmount their root filesystems, remove their
/// cgroups, pod network namespaces (and so their veths) and pod state. The
/// image store stays. Returns the number of containers removed.
pub fn reset(data_dir: &Path, exe: &Path) -> usize {
    let rt = orc_container::Runtime::new(data_dir.join("containers"), data_dir.join("state"), exe);
    let n = rt.reset();
    let pods = data_dir.join("pods");
    for (uid, _) in worker::recorded_pods(&pods) {
        worker::remove_cgroups(&uid);
        worker::unmount_under(&worker::pod_dir(&pods, &uid));
    }
    // The pods' bindings, the directory's own, then any bindings it covered
    // (made before the directory was a mount point).
    for pass in 0..2 {
        if let Ok(rd) = std::fs::read_dir(data_dir.join("netns")) {
            for e in rd.flatten() {
                let _ = orc_netlink::delete_netns(&e.path());
                worker::remove_cgroups(&e.file_name().to_string_lossy());
            }
        }
        if pass == 0 {
            orc_netlink::release_netns_dir(&data_dir.join("netns"));
        }
    }
    dns::stop(data_dir);
    nat::remove();
    orc_proxy::remove();
    for d in ["pods", "containers", "state", "logs", "netns"] {
        let _ = std::fs::remove_dir_all(data_dir.join(d));
    }
    n
}
