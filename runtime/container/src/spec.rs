//! The OCI runtime spec (`config.json`) of one container, from a plain
//! description. Pure: no I/O.
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// A bind or special mount into the container.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Mount {
    pub destination: String,
    pub source: String,
    #[serde(default)]
    pub read_only: bool,
    /// "bind" (default) or a filesystem type such as "tmpfs".
    #[serde(default)]
    pub kind: String,
}

/// What a container is, in the terms the runtime needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ContainerConfig {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub hostname: String,
    pub readonly_rootfs: bool,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    pub privileged: bool,
    pub allow_privilege_escalation: bool,
    /// The container's network namespace.
    pub netns: NetNs,
    pub mounts: Vec<Mount>,
    /// cgroup v1 cpu.shares.
    pub cpu_shares: Option<u64>,
    /// CFS quota (µs per period) and period (µs).
    pub cpu_quota: Option<i64>,
    pub cpu_period: Option<u64>,
    pub memory_limit: Option<i64>,
    /// cgroupsPath, e.g. `/orc/pod<uid>/<container-id>`.
    pub cgroup_path: String,
    pub tty: bool,
}

/// Which network namespace a container gets.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub enum NetNs {
    /// A new one of its own (only a loopback device).
    #[default]
    New,
    /// The one bound at this path (a bind-mounted nsfs file).
    Path(String),
    /// Its shim's: the spec names none, and the shim joins the pod's before
    /// it creates the container (`Setup::netns`), so the container's mount
    /// namespace need not see where the pod's is bound.
    Shim,
}

/// Docker's and containerd's default capability set.
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability (for privileged containers) as of Linux 6.x.
pub const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Architectures the default seccomp profile covers, as in Docker's default
/// profile: 32-bit programs (x86, x32) get the same rules as 64-bit ones.
pub const SECCOMP_ARCHES: &[&str] = &["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"];

/// The default seccomp profile as OCI's `linux.seccomp`: [`DENIED_SYSCALLS`]
/// refused with EPERM (errno 1), on [`SECCOMP_ARCHES`]. orc's own containers
/// get the same profile compiled once (`crate::seccomp`).
pub fn default_seccomp() -> serde_json::Value {
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": SECCOMP_ARCHES,
        "syscalls": [{"names": DENIED_SYSCALLS, "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
    })
}

/// A spec of [`oci_spec`] for another OCI runtime (runc): the profile that
/// orc's executor installs is written out as `linux.seccomp`.
pub fn inline_seccomp(spec: &mut serde_json::Value) {
    let named = spec["annotations"]
        .as_object_mut()
        .and_then(|a| a.remove(crate::seccomp::ANNOTATION));
    if named.is_some() {
        spec["linux"]["seccomp"] = default_seccomp();
    }
}

/// System calls the default seccomp profile refuses with EPERM: kernel
/// modules, mounts, kexec, reboot, namespaces, keyrings, clocks, BPF and the
/// other calls Docker's default profile keeps from unprivileged containers.
pub const DENIED_SYSCALLS: &[&str] = &[
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "get_kernel_syms",
    "query_module",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "mount",
    "umount2",
    "pivot_root",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "swapon",
    "swapoff",
    "unshare",
    "setns",
    "open_by_handle_at",
    "name_to_handle_at",
    "bpf",
    "perf_event_open",
    "keyctl",
    "add_key",
    "request_key",
    "userfaultfd",
    "acct",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "iopl",
    "ioperm",
    "quotactl",
    "lookup_dcookie",
    "nfsservctl",
    "uselib",
    "syslog",
];

/// `NET_ADMIN` and `CAP_NET_ADMIN` both name CAP_NET_ADMIN.
pub fn cap_name(c: &str) -> String {
    let up = c.trim().to_ascii_uppercase();
    if up.starts_with("CAP_") {
        up
    } else {
        format!("CAP_{up}")
    }
}

/// The capability set: defaults (all when privileged), minus drops, plus adds.
pub fn capabilities(c: &ContainerConfig) -> Vec<String> {
    let base = if c.privileged { ALL_CAPS } else { DEFAULT_CAPS };
    let drop: Vec<String> = c.cap_drop.iter().map(|d| cap_name(d)).collect();
    let mut caps: Vec<String> = if drop.iter().any(|d| d == "CAP_ALL") {
        vec![]
    } else {
        base.iter()
            .map(|s| s.to_string())
            .filter(|s| !drop.contains(s))
            .collect()
    };
    for a in &c.cap_add {
        let a = cap_name(a);
        if a == "CAP_ALL" {
            return ALL_CAPS.iter().map(|s| s.to_string()).collect();
        }
        if !caps.contains(&a) {
            caps.push(a);
        }
    }
    caps
}

/// The `config.json` for a container whose root filesystem is `rootfs`
/// (relative to the bundle).
pub fn oci_spec(c: &ContainerConfig) -> Value {
    let caps = capabilities(c);
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", if c.privileged {"rw"} else {"ro"}]}),
    ];
    for m in &c.mounts {
        let kind = if m.kind.is_empty() { "bind" } else { &m.kind };
        let mut options: Vec<&str> = if kind == "bind" {
            vec!["rbind", "rprivate"]
        } else {
            vec!["nosuid", "nodev"]
        };
        options.push(if m.read_only { "ro" } else { "rw" });
        mounts.push(json!({"destination": m.destination, "type": kind, "source": m.source, "options": options}));
    }
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    match &c.netns {
        NetNs::New => namespaces.push(json!({"type": "network"})),
        NetNs::Path(p) => namespaces.push(json!({"type": "network", "path": p})),
        NetNs::Shim => {}
    }
    let mut resources = json!({});
    if let Some(s) = c.cpu_shares {
        resources["cpu"]["shares"] = json!(s);
    }
    if let Some(q) = c.cpu_quota {
        resources["cpu"]["quota"] = json!(q);
        resources["cpu"]["period"] = json!(c.cpu_period.unwrap_or(100_000));
    }
    if let Some(m) = c.memory_limit {
        resources["memory"]["limit"] = json!(m);
        // No swap beyond the limit, as the kubelet sets it.
        resources["memory"]["swap"] = json!(m);
    }
    let mut linux = json!({
        "namespaces": namespaces,
        "resources": resources,
        "cgroupsPath": c.cgroup_path,
    });
    if !c.privileged {
        linux["maskedPaths"] = json!([
            "/proc/acpi",
            "/proc/asound",
            "/proc/kcore",
            "/proc/keys",
            "/proc/latency_stats",
            "/proc/timer_list",
            "/proc/timer_stats",
            "/proc/sched_debug",
            "/proc/scsi",
            "/sys/firmware"
        ]);
        linux["readonlyPaths"] = json!([
            "/proc/bus",
            "/proc/fs",
            "/proc/irq",
            "/proc/sys",
            "/proc/sysrq-trigger"
        ]);
    }
    let no_new_privileges = !c.allow_privilege_escalation && !c.privileged;
    let mut annotations = json!({});
    if !c.privileged {
        if no_new_privileges {
            // Installed by orc's executor from a program compiled once per
            // node (see crate::seccomp); `inline_seccomp` spells it out.
            annotations[crate::seccomp::ANNOTATION] = json!(crate::seccomp::DEFAULT_PROFILE);
        } else {
            // Loaded by libcontainer while the process may still do so.
            linux["seccomp"] = default_seccomp();
        }
    }
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": c.tty,
            "user": {"uid": c.uid, "gid": c.gid, "additionalGids": c.additional_gids},
            "args": c.args,
            "env": c.env,
            "cwd": if c.cwd.is_empty() { "/" } else { &c.cwd },
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": no_new_privileges,
        },
        "root": {"path": "rootfs", "readonly": c.readonly_rootfs},
        "hostname": c.hostname,
        "mounts": mounts,
        "linux": linux,
        "annotations": annotations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &Value) -> oci_spec::runtime::Spec {
        serde_json::from_value(v.clone()).expect("a valid OCI spec")
    }

    #[test]
    fn defaults_are_unprivileged() {
        let c = ContainerConfig {
            args: vec!["sh".into()],
            hostname: "web-0".into(),
            cgroup_path: "/orc/podx/c".into(),
            netns: NetNs::Path("/run/orc/netns/x".into()),
            memory_limit: Some(64 << 20),
            cpu_shares: Some(512),
            cpu_quota: Some(50_000),
            ..Default::default()
        };
        let v = oci_spec(&c);
        parse(&v);
        let caps: Vec<&str> = v["process"]["capabilities"]["bounding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert!(!caps.contains(&"CAP_SYS_ADMIN"));
        assert!(!caps.contains(&"CAP_SYS_MODULE"));
        assert_eq!(v["process"]["noNewPrivileges"], true);
        // The default profile, named for orc's executor; spelled out for runc.
        assert_eq!(v["annotations"][crate::seccomp::ANNOTATION], "default");
        assert!(v["linux"]["seccomp"].is_null());
        let mut runc = v.clone();
        inline_seccomp(&mut runc);
        parse(&runc);
        assert!(runc["annotations"][crate::seccomp::ANNOTATION].is_null());
        assert_eq!(runc["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ALLOW");
        assert!(runc["linux"]["seccomp"]["syscalls"][0]["names"]
            .as_array()
            .unwrap()
            .contains(&json!("mount")));
        // Without no_new_privs the filter must be loaded while the process
        // still may: by libcontainer, from the spec.
        let esc = oci_spec(&ContainerConfig {
            allow_privilege_escalation: true,
            ..c.clone()
        });
        parse(&esc);
        assert_eq!(esc["process"]["noNewPrivileges"], false);
        assert!(esc["annotations"][crate::seccomp::ANNOTATION].is_null());
        assert!(esc["linux"]["seccomp"]["syscalls"][0]["names"]
            .as_array()
            .unwrap()
            .contains(&json!("mount")));
        assert_eq!(v["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(v["linux"]["resources"]["cpu"]["period"], 100_000);
        assert_eq!(v["linux"]["namespaces"][4]["path"], "/run/orc/netns/x");
        assert_eq!(v["hostname"], "web-0");
        // Joined by the shim: the spec names no network namespace at all.
        let shim = oci_spec(&ContainerConfig {
            netns: NetNs::Shim,
            ..c.clone()
        });
        parse(&shim);
        let ns = shim["linux"]["namespaces"].as_array().unwrap();
        assert_eq!(ns.len(), 4);
        assert!(ns.iter().all(|n| n["type"] != "network"));
    }

    #[test]
    fn capabilities_add_drop_and_privileged() {
        let mut c = ContainerConfig {
            cap_add: vec!["NET_ADMIN".into()],
            cap_drop: vec!["CAP_KILL".into()],
            ..Default::default()
        };
        let caps = capabilities(&c);
        assert!(caps.contains(&"CAP_NET_ADMIN".to_string()));
        assert!(!caps.contains(&"CAP_KILL".to_string()));
        c.cap_drop = vec!["ALL".into()];
        assert_eq!(capabilities(&c), vec!["CAP_NET_ADMIN".to_string()]);
        let p = ContainerConfig {
            privileged: true,
            ..Default::default()
        };
        assert!(capabilities(&p).contains(&"CAP_SYS_ADMIN".to_string()));
        let v = oci_spec(&p);
        parse(&v);
        assert!(v["linux"]["seccomp"].is_null());
        assert!(v["annotations"][crate::seccomp::ANNOTATION].is_null());
        assert_eq!(v["process"]["noNewPrivileges"], false);
    }

    #[test]
    fn volumes_become_mounts() {
        let c = ContainerConfig {
            mounts: vec![
                Mount {
                    destination: "/data".into(),
                    source: "/var/lib/orc/pods/x/volumes/data".into(),
                    read_only: true,
                    kind: String::new(),
                },
                Mount {
                    destination: "/cache".into(),
                    source: "tmpfs".into(),
                    read_only: false,
                    kind: "tmpfs".into(),
                },
            ],
            ..Default::default()
        };
        let v = oci_spec(&c);
        parse(&v);
        let m = v["mounts"].as_array().unwrap();
        let data = m.iter().find(|m| m["destination"] == "/data").unwrap();
        assert_eq!(data["type"], "bind");
        assert!(data["options"].as_array().unwrap().contains(&json!("ro")));
        assert_eq!(
            m.iter().find(|m| m["destination"] == "/cache").unwrap()["type"],
            "tmpfs"
        );
    }
}
