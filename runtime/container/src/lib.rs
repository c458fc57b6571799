//! orc-container: runs containers through youki's libcontainer, in orc's own
//! process (the shim supervisor, one per container, forked by the runtime's
//! zygote), never by running a runtime binary. It owns the OCI spec a
//! container gets (`spec`), the shim (`shim`), the fork server that starts
//! shims (`zygote`) and the on-disk state of the containers of a node (`Runtime`):
//! a bundle directory per container with `config.json`, `setup.json` (what
//! the shim prepares: network namespace, root filesystem mount), `rootfs/`,
//! the init's pid and, once it ended, `exit.json`, and a directory per
//! container for its writable layer. It knows nothing of pods, images or the
//! API, and must not depend on them.
pub mod seccomp;
pub mod shim;
pub mod spec;
pub mod zygote;

pub use spec::{ContainerConfig, Mount, NetNs};

use serde::{Deserialize, Serialize};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const PID_FILE: &str = "pid";
/// What the shim prepares before it creates the container (see [`Setup`]).
pub const SETUP_FILE: &str = "setup.json";
pub const EXIT_FILE: &str = "exit.json";
pub const SHIM_PID_FILE: &str = "shim.pid";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("{0}: {1}")]
    Sys(String, #[source] nix::errno::Errno),
    #[error("invalid spec: {0}")]
    Spec(String),
    #[error("libcontainer: {0}")]
    Libcontainer(#[from] libcontainer::error::LibcontainerError),
    #[error("{0}")]
    Start(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// How a container ended, as its shim saw it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExitInfo {
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub oom_killed: bool,
    pub started_at: String,
    pub finished_at: String,
}

/// What a container's shim prepares, in a mount namespace of its own,
/// before it creates the container (the bundle's `setup.json`).
///
/// Why a namespace of its own, as small as can be: every container start
/// reads the mount table (youki's cgroup v1 lookups read
/// `/proc/self/mountinfo` once per controller, the container's own setup
/// again) and copies it (the container's mount namespace), all under the
/// kernel's one mount lock. A mount per pod in the table the shims see made
/// each start slower the more pods the node held, and made every start wait
/// on the others.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Setup {
    /// Mounted on the bundle's `rootfs/` (an overlay of image layers, say):
    /// the container sees it, the node's mount table does not.
    #[serde(default)]
    pub rootfs: Option<RootfsMount>,
    /// A bound network namespace (nsfs file) the shim joins; the container
    /// inherits it (its spec names no network namespace: [`spec::NetNs::Shim`]).
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// Mount points of the node the container does not need (the directory
    /// of bound pod network namespaces, one mount per pod): the shim detaches
    /// them from its namespace, after joining `netns`. One that is not a
    /// mount point is skipped.
    #[serde(default)]
    pub detach: Vec<PathBuf>,
}

/// A file system to mount (see [`Setup::rootfs`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RootfsMount {
    pub fstype: String,
    pub source: String,
    pub options: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum State {
    /// Its init runs with this pid (in the host pid namespace).
    Running {
        pid: i32,
    },
    Exited(ExitInfo),
    /// Neither running nor with a recorded exit (the shim died, or the
    /// machine rebooted).
    Unknown,
}

/// The containers of one node, under a directory.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// Bundles, one directory per container id.
    pub dir: PathBuf,
    /// libcontainer's state root.
    pub state_root: PathBuf,
    /// Where each container's writable layer goes (see [`Runtime::writable`]):
    /// in its bundle, unless [`Runtime::with_writable_dir`] said elsewhere.
    writable_dir: Option<PathBuf>,
    /// The `orc` binary, whose `shim-zygote` subcommand forks the shims.
    pub exe: PathBuf,
    zygote: zygote::Handle,
}

fn alive(pid: i32) -> bool {
    pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

fn read_pid(p: &Path) -> Option<i32> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

impl Runtime {
    pub fn new(
        dir: impl Into<PathBuf>,
        state_root: impl Into<PathBuf>,
        exe: impl Into<PathBuf>,
    ) -> Self {
        Runtime {
            dir: dir.into(),
            state_root: state_root.into(),
            exe: exe.into(),
            writable_dir: None,
            zygote: Default::default(),
        }
    }

    /// Keep the containers' writable layers under `dir` (one directory per
    /// container id) rather than in their bundles: bundles and state can
    /// then live in memory (a tmpfs) while what the containers write goes
    /// to disk.
    pub fn with_writable_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.writable_dir = Some(dir.into());
        self
    }

    /// The directory for container `id`'s writable layer (an overlay's
    /// upper and work directories, say); [`Runtime::remove`] removes it.
    pub fn writable(&self, id: &str) -> PathBuf {
        match &self.writable_dir {
            Some(d) => d.join(id),
            None => self.bundle(id).join("rw"),
        }
    }

    pub fn bundle(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Write the bundle's config.json (the rootfs is the caller's).
    pub fn write_spec(&self, id: &str, cfg: &ContainerConfig) -> Result<PathBuf> {
        let b = self.bundle(id);
        std::fs::create_dir_all(&b).map_err(|e| Error::Io(format!("mkdir {}", b.display()), e))?;
        let spec = spec::oci_spec(cfg);
        serde_json::from_value::<oci_spec::runtime::Spec>(spec.clone())
            .map_err(|e| Error::Spec(e.to_string()))?;
        std::fs::write(
            b.join("config.json"),
            serde_json::to_vec_pretty(&spec).expect("spec serializes"),
        )
        .map_err(|e| Error::Io("write config.json".into(), e))?;
        Ok(b)
    }

    /// Have the shim of container `id` prepare `setup` before it creates
    /// the container.
    pub fn write_setup(&self, id: &str, setup: &Setup) -> Result<()> {
        let b = self.bundle(id);
        std::fs::create_dir_all(b.join("rootfs"))
            .map_err(|e| Error::Io(format!("mkdir {}/rootfs", b.display()), e))?;
        std::fs::write(
            b.join(SETUP_FILE),
            serde_json::to_vec(setup).expect("setup serializes"),
        )
        .map_err(|e| Error::Io(format!("write {SETUP_FILE}"), e))
    }

    /// Start container `id` (its bundle ready) under a new shim; blocks until
    /// the shim reports the container started. Returns the init's pid.
    ///
    /// The shim is forked by this runtime's zygote (`orc shim-zygote`), not
    /// executed: loading the `orc` binary afresh for each container (its
    /// relocations and some 950 page faults, about 7 ms of CPU) made orc's
    /// path slower than runc's.
    pub fn start(&self, id: &str, log: &Path) -> Result<i32> {
        let b = self.bundle(id);
        let req = shim::ShimArgs {
            state_root: self.state_root.clone(),
            id: id.to_string(),
            bundle: b.clone(),
            log: log.to_path_buf(),
        };
        let report = self.zygote.fork(&self.exe, &req)?;
        let mut line = String::new();
        let _ = std::io::BufReader::new(report).read_line(&mut line);
        let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap_or_else(|_| {
            let log = std::fs::read_to_string(b.join("shim.log")).unwrap_or_default();
            serde_json::json!({"error": format!("shim ended without a word: {}", log.trim())})
        });
        match v["pid"].as_i64() {
            Some(pid) => Ok(pid as i32),
            None => Err(Error::Start(
                v["error"].as_str().unwrap_or("unknown").to_string(),
            )),
        }
    }

    pub fn state(&self, id: &str) -> State {
        let b = self.bundle(id);
        if let Some(info) = std::fs::read(b.join(EXIT_FILE))
            .ok()
            .and_then(|s| serde_json::from_slice(&s).ok())
        {
            return State::Exited(info);
        }
        match (
            read_pid(&b.join(PID_FILE)),
            read_pid(&b.join(SHIM_PID_FILE)),
        ) {
            (Some(pid), Some(shim)) if alive(shim) => State::Running { pid },
            // The shim may be finishing its bookkeeping right now.
            _ if b.join(EXIT_FILE).exists() => self.state(id),
            _ => State::Unknown,
        }
    }

    /// Send a signal to the container's init.
    pub fn kill(&self, id: &str, signal: i32) -> Result<()> {
        if let State::Running { pid } = self.state(id) {
            let sig = nix::sys::signal::Signal::try_from(signal)
                .map_err(|e| Error::Sys("signal".into(), e))?;
            match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => return Err(Error::Sys(format!("kill {pid}"), e)),
            }
        }
        Ok(())
    }

    /// Forget a container that has ended: unmount its root filesystem and
    /// remove its bundle. A container still running is killed first.
    pub fn remove(&self, id: &str) -> Result<()> {
        let b = self.bundle(id);
        if let State::Running { .. } = self.state(id) {
            self.kill(id, libc::SIGKILL)?;
            for _ in 0..100 {
                if !matches!(self.state(id), State::Running { .. }) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        // A shim that died leaves libcontainer's state (and cgroup) behind.
        let state = self.state_root.join(id);
        if state.exists() {
            if let Ok(mut c) = libcontainer::container::Container::load(state.clone()) {
                let _ = c.delete(true);
            }
            let _ = std::fs::remove_dir_all(&state);
        }
        let rootfs = b.join("rootfs");
        let _ = nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH);
        for d in [self.writable(id), b] {
            match std::fs::remove_dir_all(&d) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::Io(format!("remove {}", d.display()), e))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Kill every container and its shim at once and remove them all (a
    /// node reset). Returns how many there were.
    pub fn reset(&self) -> usize {
        let ids = self.ids();
        for id in &ids {
            let b = self.bundle(id);
            for f in [SHIM_PID_FILE, PID_FILE] {
                if let Some(pid) = read_pid(&b.join(f)).filter(|p| *p > 1) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        for id in &ids {
            let _ = self.remove(id);
        }
        ids.len()
    }

    /// The command that runs `args` inside running container `id`
    /// (`orc shim-exec`), for the caller to wire and wait for.
    pub fn exec_command(&self, id: &str, args: &[String], tty: bool) -> Command {
        let mut c = Command::new(&self.exe);
        c.arg("shim-exec")
            .arg("--state-root")
            .arg(&self.state_root)
            .arg("--id")
            .arg(id);
        if tty {
            c.arg("--tty");
        }
        c.arg("--").args(args);
        c
    }

    /// Ids of every container with a bundle.
    pub fn ids(&self) -> Vec<String> {
        std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }
}
