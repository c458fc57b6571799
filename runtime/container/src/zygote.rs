//! The shims' fork server (`orc shim-zygote`): one single-threaded process
//! per [`Runtime`](crate::Runtime), started on its first container, that
//! forks a shim for each request instead of the runtime executing the `orc`
//! binary anew. Each request is a JSON [`ShimArgs`] on a `SOCK_SEQPACKET`
//! socket with, as `SCM_RIGHTS`, the pipe the shim reports on. The zygote
//! ignores SIGCHLD, so the kernel reaps the shims; it ends when the socket's
//! other end closes (its runtime's process is gone), and the shims live on.
use crate::shim::ShimArgs;
use crate::{Error, Result};
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

/// A runtime's zygote, started when first needed and again if it died.
#[derive(Debug, Default, Clone)]
pub struct Handle(Arc<Mutex<Option<OwnedFd>>>);

fn spawn(exe: &Path) -> Result<OwnedFd> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| Error::Sys("socketpair".into(), e))?;
    let mut child = Command::new(exe)
        .arg("shim-zygote")
        .stdin(Stdio::from(theirs))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| Error::Io(format!("spawn {} shim-zygote", exe.display()), e))?;
    // It ends when `ours` closes; reap it then.
    std::thread::spawn(move || child.wait());
    Ok(ours)
}

impl Handle {
    /// Have the zygote fork a shim for `req`; returns the read end of the
    /// pipe the shim reports on (`{"pid":N}` or `{"error":"..."}`, one line).
    pub fn fork(&self, exe: &Path, req: &ShimArgs) -> Result<File> {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| Error::Sys("pipe".into(), e))?;
        let body = serde_json::to_vec(req).expect("request serializes");
        let mut z = self.0.lock().unwrap();
        let mut last = None;
        // A zygote that died (killed, say) is replaced once.
        for _ in 0..2 {
            if z.is_none() {
                *z = Some(spawn(exe)?);
            }
            let sock = z.as_ref().expect("spawned").as_raw_fd();
            let fds = [w.as_raw_fd()];
            match sendmsg::<()>(
                sock,
                &[IoSlice::new(&body)],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => return Ok(File::from(r)),
                Err(e) => {
                    *z = None;
                    last = Some(e);
                }
            }
        }
        Err(Error::Sys(
            "send to the shim zygote".into(),
            last.expect("tried"),
        ))
    }
}

extern "C" {
    /// glibc's `on_exit`: an exit handler that is given the exit status.
    fn on_exit(
        f: extern "C" fn(libc::c_int, *mut libc::c_void),
        arg: *mut libc::c_void,
    ) -> libc::c_int;
}

extern "C" fn end_now(status: libc::c_int, _: *mut libc::c_void) {
    // SAFETY: _exit ends the process at once; nothing runs after it.
    unsafe { libc::_exit(status) }
}

/// Make `exit` in this process and all it forks end the process as soon as
/// it is called, skipping the exit handlers registered before this one
/// (handlers run last registered first). Those are the static destructors of
/// the C++ libraries the `orc` binary links (RocksDB's tables of option
/// types, for the masters): each shim, and each of libcontainer's
/// processes, ran them when it ended, writing to heap pages it shares with
/// the zygote and so copying them: about a tenth of the intermediate
/// process's CPU. Rust flushes its own standard streams before `exit`.
fn skip_exit_handlers() {
    // SAFETY: registers a handler that only calls _exit.
    unsafe { on_exit(end_now, std::ptr::null_mut()) };
}

/// The zygote's loop (`orc shim-zygote`, its socket on standard input).
/// It must run before any other thread exists: its children run the shim,
/// which clones itself for the container.
pub fn run() -> i32 {
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    skip_exit_handlers();
    // std detects the CPU's features once per process, when first asked
    // (memchr asks); in a VM each CPUID traps to the hypervisor. Asked here,
    // every shim and container process inherits the answer.
    #[cfg(target_arch = "x86_64")]
    let _ = std::is_x86_feature_detected!("avx2");
    // Where the cgroup v1 hierarchies are mounted: libcgroups keeps it once
    // read, and each container's intermediate process would otherwise read the
    // mount table a dozen times, under a lock every mount on the machine takes.
    let _ = libcgroups::v1::util::list_subsystem_mount_points();
    // The default seccomp profile, compiled once for every container of
    // this runtime (an error is reported by the container that needs it).
    let _ = crate::seccomp::default_program();
    let sock: RawFd = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let (n, fd) =
            match recvmsg::<()>(sock, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
                Ok(m) => {
                    let fd = m.cmsgs().ok().into_iter().flatten().find_map(|c| match c {
                        ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
                        _ => None,
                    });
                    (m.bytes, fd)
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return 1,
            };
        if n == 0 {
            // The runtime's side closed: its process is gone.
            return 0;
        }
        // Ours from here: closed in this process once the child has it.
        let Some(report) = fd.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }) else {
            continue;
        };
        let Ok(req) = serde_json::from_slice::<ShimArgs>(&buf[..n]) else {
            continue;
        };
        match unsafe { nix::unistd::fork() } {
            Ok(nix::unistd::ForkResult::Child) => {
                std::process::exit(child(req, report));
            }
            Ok(nix::unistd::ForkResult::Parent { .. }) => drop(report),
            Err(e) => {
                let mut f = File::from(report);
                let _ = std::io::Write::write_all(
                    &mut f,
                    format!("{}\n", serde_json::json!({ "error": format!("fork: {e}") }))
                        .as_bytes(),
                );
            }
        }
    }
}

/// In the forked child: standard streams for the shim (nothing in, the
/// report pipe out, `shim.log` for errors), then the shim.
fn child(req: ShimArgs, report: OwnedFd) -> i32 {
    unsafe {
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        libc::prctl(libc::PR_SET_NAME, c"orc-shim".as_ptr(), 0, 0, 0);
    }
    let null = File::open("/dev/null");
    let log = File::create(req.bundle.join("shim.log"));
    let (Ok(null), Ok(log)) = (null, log) else {
        return 1;
    };
    for (from, to) in [
        (null.as_raw_fd(), 0),
        (report.as_raw_fd(), 1),
        (log.as_raw_fd(), 2),
    ] {
        if nix::unistd::dup2(from, to).is_err() {
            return 1;
        }
    }
    drop((null, log, report));
    let _ = std::fs::write(
        req.bundle.join(crate::SHIM_PID_FILE),
        std::process::id().to_string(),
    );
    crate::shim::run(&req)
}
