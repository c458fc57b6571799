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

use std::path::{Path, PathBuf};

/// `DIR/run`: what lasts only as long as the machine runs (container
/// bundles, libcontainer's state, the pods' network namespace bindings, pod
/// records and sandbox files), on
/// a tmpfs of the agent's own, as containerd keeps its under /run. A reboot
/// leaves no bundle or pid file naming a process that is gone, and starting
/// a container writes no file to disk but its writable layer and log: a
/// burst of pods no longer waits on the disk's inode allocator (on this
/// project's VMs, ext4 without a journal, each new inode skipped past every
/// one deleted in the last minute).
pub fn run_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("run")
}

/// Where the pods' network namespaces are bound (a private mount point).
pub fn netns_dir(data_dir: &Path) -> PathBuf {
    run_dir(data_dir).join("netns")
}

/// The container runtime of an agent with this data directory: bundles and
/// state under [`run_dir`], writable layers on disk under `DIR/rw`.
pub fn runtime(data_dir: &Path, exe: &Path) -> orc_container::Runtime {
    let run = run_dir(data_dir);
    orc_container::Runtime::new(run.join("containers"), run.join("state"), exe)
        .with_writable_dir(data_dir.join("rw"))
}

/// Ask the file system to spread `dir`'s subdirectories over its block
/// groups, as it does the root's (ext4's `chattr +T`, `FS_TOPDIR_FL`).
/// Each container's writable layer is a directory under `DIR/rw`, and
/// everything inside it (upper and work directories, the files overlayfs
/// makes and deletes at every mount) is allocated near it. Without the
/// flag they all share one group, and where ext4 has no journal each new
/// inode skips past every inode of its group deleted in the last minute
/// (`recently_deleted`): a burst of pods paid for all the layers the
/// minutes before it removed. File systems without the flag ignore it.
pub fn spread_subdirs(dir: &Path) {
    use std::os::fd::AsRawFd;
    const FS_TOPDIR_FL: libc::c_long = 0x0002_0000;
    let Ok(f) = std::fs::File::open(dir) else {
        return;
    };
    let mut flags: libc::c_long = 0;
    // SAFETY: both ioctls take a pointer to a long, which outlives them.
    unsafe {
        if libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) == 0
            && flags & FS_TOPDIR_FL == 0
        {
            flags |= FS_TOPDIR_FL;
            libc::ioctl(f.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags);
        }
    }
}

/// Mount [`run_dir`]'s tmpfs, unless it is one already (an agent restart).
pub fn mount_run_dir(data_dir: &Path) -> Result<(), String> {
    let run = run_dir(data_dir);
    std::fs::create_dir_all(&run).map_err(|e| format!("mkdir {}: {e}", run.display()))?;
    let on_tmpfs = nix::sys::statfs::statfs(&run)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
    if on_tmpfs {
        return Ok(());
    }
    nix::mount::mount(
        Some("tmpfs"),
        &run,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some("mode=0700,size=256m"),
    )
    .map_err(|e| format!("mount a tmpfs on {}: {e}", run.display()))
}

/// Undo everything an agent with this data directory made: kill its
/// containers and shims, unmount their root filesystems, remove their
/// cgroups, pod network namespaces (and so their veths) and pod state. The
/// image store stays. Returns the number of containers removed.
pub fn reset(data_dir: &Path, exe: &Path) -> usize {
    // An agent of an earlier release kept bundles, state and bindings on
    // disk, under `containers`, `state` and `netns`.
    let legacy =
        orc_container::Runtime::new(data_dir.join("containers"), data_dir.join("state"), exe);
    let n = runtime(data_dir, exe).reset() + legacy.reset();
    for pods in [run_dir(data_dir).join("pods"), data_dir.join("pods")] {
        for (uid, _) in worker::recorded_pods(&pods) {
            worker::remove_cgroups(&uid);
        }
    }
    // Memory-backed emptyDirs.
    for e in std::fs::read_dir(data_dir.join("pods"))
        .into_iter()
        .flatten()
        .flatten()
    {
        worker::unmount_under(&e.path());
    }
    // The pods' bindings, the directory's own, then any bindings it covered
    // (made before the directory was a mount point).
    for netns in [netns_dir(data_dir), data_dir.join("netns")] {
        for pass in 0..2 {
            if let Ok(rd) = std::fs::read_dir(&netns) {
                for e in rd.flatten() {
                    let _ = orc_netlink::delete_netns(&e.path());
                    worker::remove_cgroups(&e.file_name().to_string_lossy());
                }
            }
            if pass == 0 {
                orc_netlink::release_netns_dir(&netns);
            }
        }
    }
    let _ = nix::mount::umount2(&run_dir(data_dir), nix::mount::MntFlags::MNT_DETACH);
    dns::stop(data_dir);
    nat::remove();
    orc_proxy::remove();
    for d in ["pods", "rw", "logs", "run", "containers", "state", "netns"] {
        let _ = std::fs::remove_dir_all(data_dir.join(d));
    }
    n
}
