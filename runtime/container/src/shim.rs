//! The per-container supervisor, like containerd's shim or conmon, forked by
//! the runtime's zygote (`zygote`): a small process that
//! mounts the root filesystem when the bundle asks for it, creates and starts
//! the container through libcontainer in-process, becomes its subreaper,
//! writes its output to the CRI log file, waits for it, records how it ended
//! (exit code, signal, OOM kill) and deletes it. It outlives the node agent, so containers keep
//! running and their exits are not lost while the agent is down.
//!
//! It must run before any other thread exists: libcontainer clones the
//! calling process.
use crate::{ExitInfo, Result, EXIT_FILE, PID_FILE};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::wait::{waitpid, WaitStatus};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// What a shim is asked to run (sent to the zygote as JSON).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ShimArgs {
    /// libcontainer's state directory.
    pub state_root: PathBuf,
    pub id: String,
    /// The bundle: config.json and rootfs/.
    pub bundle: PathBuf,
    /// The CRI-format log file.
    pub log: PathBuf,
}

/// One line of CRI log format: `TIME STREAM TAG MESSAGE`.
pub fn cri_line(time: &str, stream: &str, partial: bool, msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + 48);
    out.extend_from_slice(time.as_bytes());
    out.push(b' ');
    out.extend_from_slice(stream.as_bytes());
    out.extend_from_slice(if partial { b" P " } else { b" F " });
    out.extend_from_slice(msg);
    out.push(b'\n');
    out
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// The longest piece of a line kept back waiting for its end; a longer
/// line is written as partial pieces of this size.
const LINE_MAX: usize = 16 * 1024;

/// One output stream of the container on its way into the log: its name
/// and what it has sent of a line not yet ended.
struct Lines {
    name: &'static str,
    pending: Vec<u8>,
}

impl Lines {
    /// The CRI lines for `data`, read from this stream at `time`.
    fn lines(&mut self, time: &str, data: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(data);
        let mut out = vec![];
        while let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
            out.extend(cri_line(time, self.name, false, &self.pending[..i]));
            self.pending.drain(..=i);
        }
        if self.pending.len() >= LINE_MAX {
            out.extend(cri_line(time, self.name, true, &self.pending));
            self.pending.clear();
        }
        out
    }

    /// The stream ended: the rest of its last line.
    fn rest(&mut self) -> Vec<u8> {
        if self.pending.is_empty() {
            return vec![];
        }
        let out = cri_line(&now(), self.name, false, &self.pending);
        self.pending.clear();
        out
    }
}

/// Copy the container's standard output and error into the log, a line at
/// a time, until both have ended (at the latest when the container's pid
/// namespace is gone, and its processes with it). One thread, polling both:
/// a thread per stream cost every container start two thread creations and
/// an allocator arena each.
fn copy_output(streams: [File; 2], log: &mut dyn Write) {
    let mut open: Vec<(File, Lines)> = streams
        .into_iter()
        .zip(["stdout", "stderr"])
        .map(|(from, name)| {
            (
                from,
                Lines {
                    name,
                    pending: vec![],
                },
            )
        })
        .collect();
    let mut buf = vec![0u8; LINE_MAX];
    while !open.is_empty() {
        let mut fds: Vec<libc::pollfd> = open
            .iter()
            .map(|(from, _)| libc::pollfd {
                fd: from.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: fds is a valid array of fds.len() pollfd structures.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        let mut ended = vec![];
        for (i, fd) in fds.iter().enumerate() {
            if fd.revents == 0 {
                continue;
            }
            let (from, s) = &mut open[i];
            let out = match from.read(&mut buf) {
                Ok(0) => {
                    ended.push(i);
                    s.rest()
                }
                Ok(n) => s.lines(&now(), &buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    ended.push(i);
                    s.rest()
                }
            };
            if !out.is_empty() {
                let _ = log.write_all(&out);
            }
        }
        for i in ended.into_iter().rev() {
            open.remove(i);
        }
    }
}

fn pipe() -> Result<(File, OwnedFd)> {
    let (r, w) = nix::unistd::pipe().map_err(|e| crate::Error::Sys("pipe".into(), e))?;
    Ok((File::from(r), w))
}

/// The cgroup's OOM kill count (v1 memory.oom_control or v2 memory.events).
fn oom_kills(cgroup_path: &str) -> u64 {
    let rel = cgroup_path.trim_start_matches('/');
    let files = [
        format!("/sys/fs/cgroup/memory/{rel}/memory.oom_control"),
        format!("/sys/fs/cgroup/{rel}/memory.events"),
        format!("/sys/fs/cgroup/unified/{rel}/memory.events"),
    ];
    for f in files {
        if let Ok(s) = std::fs::read_to_string(&f) {
            if let Some(n) = s
                .lines()
                .find_map(|l| l.strip_prefix("oom_kill "))
                .and_then(|n| n.trim().parse().ok())
            {
                return n;
            }
        }
    }
    0
}

/// Write `bytes` to `path` through a temporary file and a rename, so a
/// concurrent reader sees the old content or the new, never a torn file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, path)
}

/// Run the shim. Reports `{"pid":N}` or `{"error":"..."}` as one line on
/// standard output once the container started (or failed to), then detaches
/// from it. Returns the shim's exit code.
pub fn run(a: &ShimArgs) -> i32 {
    // Our own session: the agent's terminal or process group signals do not
    // reach the containers.
    let _ = nix::unistd::setsid();
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let report = |line: String| {
        let mut out = unsafe { File::from_raw_fd(1) };
        let _ = out.write_all(format!("{line}\n").as_bytes());
        let _ = out.flush();
        // Detach standard output: the agent may go away.
        if let Ok(null) = File::options().write(true).open("/dev/null") {
            let _ = nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 1);
        }
        std::mem::forget(out);
    };
    match start(a) {
        Ok((pid, out, err, cgroup, started)) => {
            report(serde_json::json!({ "pid": pid }).to_string());
            supervise(a, pid, out, err, &cgroup, started)
        }
        Err(e) => {
            report(serde_json::json!({ "error": e.to_string() }).to_string());
            // Leave nothing half-made behind.
            if let Ok(mut c) = Container::load(a.state_root.join(&a.id)) {
                let _ = c.delete(true);
            }
            1
        }
    }
}

type Started = (i32, File, File, String, String);

/// Carry out the bundle's `setup.json`, if it has one (see [`crate::Setup`]):
/// join its network namespace, then, in a mount namespace of the shim's own
/// (host mounts still propagate into it, its mounts do not propagate out),
/// detach what the container does not need and mount its root file system.
/// The namespace goes when the shim and the container have ended.
fn prepare(bundle: &Path) -> Result<()> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    let file = bundle.join(crate::SETUP_FILE);
    let setup: crate::Setup = match std::fs::read(&file) {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|e| crate::Error::Spec(format!("{}: {e}", file.display())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(crate::Error::Io(format!("read {}", file.display()), e)),
    };
    if let Some(ns) = &setup.netns {
        // Before the detach below, which may take its binding out of sight.
        let f =
            File::open(ns).map_err(|e| crate::Error::Io(format!("open {}", ns.display()), e))?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
            crate::Error::Sys(format!("join network namespace {}", ns.display()), e)
        })?;
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| crate::Error::Sys("unshare(CLONE_NEWNS)".into(), e))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(|e| crate::Error::Sys("make / a slave mount".into(), e))?;
    for d in &setup.detach {
        match umount2(d, MntFlags::MNT_DETACH) {
            // Not a mount point (or gone): nothing to hide.
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(crate::Error::Sys(format!("detach {}", d.display()), e)),
        }
    }
    if let Some(m) = &setup.rootfs {
        let target = bundle.join("rootfs");
        mount(
            Some(m.source.as_str()),
            &target,
            Some(m.fstype.as_str()),
            MsFlags::empty(),
            Some(m.options.as_str()),
        )
        .map_err(|e| crate::Error::Sys(format!("mount {} on {}", m.fstype, target.display()), e))?;
    }
    Ok(())
}

/// The spec's `linux.cgroupsPath` ("" when it has none), read without
/// building the rest of the document: libcontainer parses it anyway.
fn cgroups_path(config: &[u8]) -> Result<String> {
    #[derive(serde::Deserialize)]
    struct Spec {
        #[serde(default)]
        linux: Option<Linux>,
    }
    #[derive(serde::Deserialize)]
    struct Linux {
        #[serde(rename = "cgroupsPath", default)]
        cgroups_path: Option<String>,
    }
    let spec: Spec =
        serde_json::from_slice(config).map_err(|e| crate::Error::Spec(e.to_string()))?;
    Ok(spec.linux.and_then(|l| l.cgroups_path).unwrap_or_default())
}

fn start(a: &ShimArgs) -> Result<Started> {
    prepare(&a.bundle)?;
    let cgroup =
        cgroups_path(&std::fs::read(a.bundle.join("config.json")).map_err(|e| {
            crate::Error::Io(format!("read {}/config.json", a.bundle.display()), e)
        })?)?;
    if let Some(dir) = a.log.parent() {
        std::fs::create_dir_all(dir).map_err(|e| crate::Error::Io("log dir".into(), e))?;
    }
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let devnull = File::open("/dev/null").map_err(|e| crate::Error::Io("/dev/null".into(), e))?;
    let mut c = ContainerBuilder::new(a.id.clone(), SyscallType::default())
        .with_root_path(&a.state_root)?
        .with_executor(crate::seccomp::OrcExecutor)
        .with_stdin(OwnedFd::from(devnull))
        .with_stdout(out_w)
        .with_stderr(err_w)
        .as_init(&a.bundle)
        .with_systemd(false)
        .with_detach(true)
        .build()?;
    let started = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    c.start()?;
    let pid = c
        .pid()
        .ok_or_else(|| crate::Error::Spec("container has no pid after start".into()))?
        .as_raw();
    write_atomic(&a.bundle.join(PID_FILE), pid.to_string().as_bytes())
        .map_err(|e| crate::Error::Io("pid file".into(), e))?;
    Ok((pid, out_r, err_r, cgroup, started))
}

fn supervise(a: &ShimArgs, pid: i32, out: File, err: File, cgroup: &str, started: String) -> i32 {
    match File::options().create(true).append(true).open(&a.log) {
        Ok(mut log) => copy_output([out, err], &mut log),
        // Still read them: a container must not block on a full pipe.
        Err(_) => copy_output([out, err], &mut std::io::sink()),
    }
    let (mut code, mut signal) = (255, None);
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(p, c)) if p.as_raw() == pid => {
                code = c;
                break;
            }
            Ok(WaitStatus::Signaled(p, s, _)) if p.as_raw() == pid => {
                code = 128 + s as i32;
                signal = Some(s as i32);
                break;
            }
            Err(nix::errno::Errno::ECHILD) => break,
            _ => {}
        }
    }
    let oom = signal == Some(libc::SIGKILL) && oom_kills(cgroup) > 0;
    // Reap whatever else was reparented to us.
    while let Ok(s) = waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
        if s == WaitStatus::StillAlive {
            break;
        }
    }
    let info = ExitInfo {
        exit_code: code,
        signal,
        oom_killed: oom,
        started_at: started,
        finished_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    };
    if let Ok(mut c) = Container::load(a.state_root.join(&a.id)) {
        if let Err(e) = c.delete(true) {
            tracing::warn!("delete {}: {e}", a.id);
        }
    }
    let _ = write_atomic(
        &a.bundle.join(EXIT_FILE),
        &serde_json::to_vec(&info).expect("exit info serializes"),
    );
    0
}

/// Run `args` inside running container `id` (its namespaces, cgroup,
/// user, capabilities and seccomp) with this process's standard streams;
/// returns its exit code (128+N for a signal, 126 when it cannot start).
/// With `tty` the command gets a terminal made inside the container (its
/// devpts), whose other end this process relays to its own streams.
/// Like `run`, it must be called before any other thread exists.
pub fn exec(state_root: &Path, id: &str, args: Vec<String>, tty: bool) -> i32 {
    match exec_inner(state_root, id, args, tty) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("exec in {id}: {e}");
            126
        }
    }
}

fn exec_inner(state_root: &Path, id: &str, args: Vec<String>, tty: bool) -> Result<i32> {
    let mut b = ContainerBuilder::new(id.to_string(), SyscallType::default())
        .with_root_path(state_root)?
        .with_executor(crate::seccomp::OrcExecutor);
    // A container made with NetNs::Shim shares its shim's network
    // namespace, which its spec does not name, so youki's tenant would not
    // join it: join the init's here, and the command inherits it.
    let container = Container::load(state_root.join(id))?;
    let init = container
        .pid()
        .ok_or_else(|| crate::Error::Start(format!("container {id} is not running")))?;
    let ns_path = format!("/proc/{init}/ns/net");
    let ns = File::open(&ns_path).map_err(|e| crate::Error::Io(ns_path.clone(), e))?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| crate::Error::Sys(format!("join {ns_path}"), e))?;
    let work = std::env::temp_dir().join(format!("orc-exec-{}", std::process::id()));
    let mut listener = None;
    let mut process = None;
    if tty {
        // The init's process with a terminal and our command.
        let spec: serde_json::Value = serde_json::from_slice(
            &std::fs::read(container.bundle().join("config.json"))
                .map_err(|e| crate::Error::Io("config.json".into(), e))?,
        )
        .map_err(|e| crate::Error::Spec(e.to_string()))?;
        let mut p = spec["process"].clone();
        p["terminal"] = serde_json::json!(true);
        p["args"] = serde_json::json!(args);
        if !p["env"].as_array().is_some_and(|e| {
            e.iter()
                .any(|v| v.as_str().is_some_and(|v| v.starts_with("TERM=")))
        }) {
            if let Some(env) = p["env"].as_array_mut() {
                env.push(serde_json::json!("TERM=xterm"));
            }
        }
        std::fs::create_dir_all(&work).map_err(|e| crate::Error::Io("exec dir".into(), e))?;
        let pj = work.join("process.json");
        std::fs::write(&pj, p.to_string())
            .map_err(|e| crate::Error::Io("process.json".into(), e))?;
        let sock = work.join("console.sock");
        listener = Some(
            std::os::unix::net::UnixListener::bind(&sock)
                .map_err(|e| crate::Error::Io("console socket".into(), e))?,
        );
        b = b.with_console_socket(Some(&sock));
        process = Some(pj);
    }
    let tenant = b.as_tenant().with_detach(tty);
    let tenant = match &process {
        Some(pj) => tenant.with_process(Some(pj)),
        None => tenant.with_container_args(args),
    };
    let built = tenant.build();
    let pid = match built {
        Ok(pid) => pid,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work);
            return Err(e.into());
        }
    };
    if let Some(l) = listener {
        let master = receive_fd(&l);
        let _ = std::fs::remove_dir_all(&work);
        let master = master?;
        let mut to = master
            .try_clone()
            .map_err(|e| crate::Error::Io("pty".into(), e))?;
        // Input to the terminal; output from it until it closes.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin(), &mut to);
        });
        let mut from = master;
        let mut out = std::io::stdout();
        let mut buf = [0u8; 8192];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || out.write_all(&buf[..n]).is_err() {
                break;
            }
            let _ = out.flush();
        }
    }
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, c)) => return Ok(c),
            Ok(WaitStatus::Signaled(_, s, _)) => return Ok(128 + s as i32),
            Err(nix::errno::Errno::EINTR) | Ok(_) => continue,
            Err(_) => return Ok(255),
        }
    }
}

/// The terminal's master end, sent by libcontainer over the console socket.
fn receive_fd(l: &std::os::unix::net::UnixListener) -> Result<File> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::AsRawFd;
    let (conn, _) = l
        .accept()
        .map_err(|e| crate::Error::Io("console socket".into(), e))?;
    let mut name = [0u8; 256];
    let mut iov = [std::io::IoSliceMut::new(&mut name)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )
    .map_err(|e| crate::Error::Sys("recvmsg".into(), e))?;
    for c in msg
        .cmsgs()
        .map_err(|e| crate::Error::Sys("cmsgs".into(), e))?
    {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(fd) = fds.first() {
                return Ok(unsafe { File::from_raw_fd(*fd) });
            }
        }
    }
    Err(crate::Error::Start(
        "no terminal came over the console socket".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_lines() {
        assert_eq!(
            cri_line("2026-01-01T00:00:00.000000000Z", "stdout", false, b"hi"),
            b"2026-01-01T00:00:00.000000000Z stdout F hi\n"
        );
        assert_eq!(cri_line("T", "stderr", true, b"x"), b"T stderr P x\n");
    }

    #[test]
    fn lines_end_where_the_stream_ends_them() {
        let mut l = Lines {
            name: "stdout",
            pending: vec![],
        };
        assert_eq!(l.lines("T", b"a\nb"), b"T stdout F a\n");
        assert_eq!(l.lines("U", b"c\nd\n"), b"U stdout F bc\nU stdout F d\n");
        assert!(l.rest().is_empty());
        // A line longer than LINE_MAX goes out in partial pieces.
        let long = vec![b'x'; LINE_MAX];
        let out = l.lines("V", &long);
        assert!(out.starts_with(b"V stdout P xx"));
        assert_eq!(out.len(), "V stdout P ".len() + LINE_MAX + 1);
        assert!(l.lines("W", b"tail").is_empty());
        assert!(l.rest().ends_with(b" stdout F tail\n"));
    }

    #[test]
    fn both_streams_reach_the_log_until_they_close() {
        let (out_r, out_w) = pipe().unwrap();
        let (err_r, err_w) = pipe().unwrap();
        let writer = std::thread::spawn(move || {
            let (mut o, mut e) = (File::from(out_w), File::from(err_w));
            o.write_all(b"one\n").unwrap();
            e.write_all(b"two\nthree").unwrap();
            drop(e);
            o.write_all(b"four\n").unwrap();
        });
        let mut log = vec![];
        copy_output([out_r, err_r], &mut log);
        writer.join().unwrap();
        let text = String::from_utf8(log).unwrap();
        let lines: Vec<(&str, &str)> = text
            .lines()
            .map(|l| {
                let mut f = l.splitn(4, ' ');
                let (_, stream, tag) = (f.next(), f.next().unwrap(), f.next().unwrap());
                assert_eq!(tag, "F");
                (stream, f.next().unwrap())
            })
            .collect();
        for want in [
            ("stdout", "one"),
            ("stderr", "two"),
            ("stderr", "three"),
            ("stdout", "four"),
        ] {
            assert!(lines.contains(&want), "{want:?} missing from {text}");
        }
        assert_eq!(lines.len(), 4, "{text}");
    }

    #[test]
    fn cgroups_path_alone() {
        let spec = br#"{"ociVersion":"1.0.2","process":{"args":["sh"]},"linux":{"namespaces":[{"type":"pid"}],"cgroupsPath":"/orc/podu/c"}}"#;
        assert_eq!(cgroups_path(spec).unwrap(), "/orc/podu/c");
        assert_eq!(cgroups_path(br#"{"linux":{}}"#).unwrap(), "");
        assert_eq!(cgroups_path(b"{}").unwrap(), "");
        assert!(cgroups_path(b"{").is_err());
    }
}
