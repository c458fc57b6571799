//! orc's libcgroups (`runtime/libcgroups`, see its ORC.md) keeps the cgroup v1
//! mount points it reads once: they must be the ones the mount table holds.

use libcgroups::v1::{util, ControllerType};
use std::path::PathBuf;

/// The `cgroup` (v1) mount points of `/proc/self/mountinfo`, parsed here.
fn from_mountinfo() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("read mountinfo")
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split(' ').next() == Some("cgroup"))
                .then(|| PathBuf::from(left.split(' ').nth(4).unwrap()))
        })
        .collect()
}

#[test]
fn kept_mount_points_are_the_mount_tables() {
    let want = from_mountinfo();
    // Twice: the second answer comes from what the first read kept.
    assert_eq!(util::list_subsystem_mount_points().unwrap(), want);
    assert_eq!(util::list_subsystem_mount_points().unwrap(), want);
    for (ctrl, name) in [
        (ControllerType::Memory, "memory"),
        (ControllerType::Pids, "pids"),
        (ControllerType::Cpu, "cpu"),
    ] {
        let found = util::get_subsystem_mount_point(&ctrl);
        // "cpu" is also mounted as "cpu,cpuacct" on some hosts.
        match want.iter().find(|p| {
            let last = p.file_name().unwrap().to_string_lossy().to_string();
            last.split(',').any(|c| c == name)
        }) {
            Some(p) => assert_eq!(&found.unwrap(), p, "{name}"),
            None => assert!(found.is_err(), "{name}: found {found:?}, not mounted"),
        }
    }
}
