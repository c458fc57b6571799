//! The default seccomp profile as a BPF program compiled once per process
//! tree, and the executor that installs it in a container's init process
//! just before the `execve` of the container's command.
//!
//! libcontainer compiles a spec's `linux.seccomp` with libseccomp in every
//! container's init process: about 0.45 ms of CPU there, plus 0.25 ms for the
//! kernel to check the linear filter it makes (measured on the 2-core
//! VM; a tenth of the init process's CPU). orc's containers mostly share one
//! profile, so the spec names it in an annotation instead
//! ([`ANNOTATION`]), the shim zygote compiles it once (a binary tree of
//! comparisons, which the kernel checks in 0.1 ms), and every shim and
//! container process forked from it inherits the program.
use crate::{Error, Result};
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use libseccomp::{ScmpAction, ScmpArch, ScmpFilterContext, ScmpSyscall};
use oci_spec::runtime::Spec;
use std::io::Read;
use std::sync::OnceLock;

/// The spec annotation that asks for the default profile
/// ([`crate::spec::DENIED_SYSCALLS`] refused with EPERM, everything else
/// allowed) to be installed by [`OrcExecutor`] rather than by libcontainer.
/// Only set with `process.noNewPrivileges`: without it, loading a filter
/// needs CAP_SYS_ADMIN, which the process no longer has by then.
pub const ANNOTATION: &str = "run.orc.seccomp";
/// The one value [`ANNOTATION`] takes.
pub const DEFAULT_PROFILE: &str = "default";

/// The compiled default profile: `struct sock_filter` instructions, 8 bytes
/// each, as the kernel takes them. Compiled on first use and kept.
pub fn default_program() -> Result<&'static [u8]> {
    static PROGRAM: OnceLock<std::result::Result<Vec<u8>, String>> = OnceLock::new();
    PROGRAM
        .get_or_init(|| compile(crate::spec::DENIED_SYSCALLS))
        .as_deref()
        .map_err(|e| Error::Spec(format!("default seccomp profile: {e}")))
}

/// `denied` refused with EPERM on every architecture of
/// [`crate::spec::SECCOMP_ARCHES`] (the ones `linux.seccomp` lists for other
/// runtimes), everything else allowed; names the kernel's tables do not
/// know are skipped, as libcontainer does.
fn compile(denied: &[&str]) -> std::result::Result<Vec<u8>, String> {
    let mut ctx = ScmpFilterContext::new(ScmpAction::Allow).map_err(|e| e.to_string())?;
    for name in crate::spec::SECCOMP_ARCHES {
        let arch: ScmpArch = name.parse().map_err(|e| format!("{name}: {e}"))?;
        ctx.add_arch(arch).map_err(|e| format!("{name}: {e}"))?;
    }
    // The caller sets no_new_privs (libcontainer does, from the spec).
    ctx.set_ctl_nnp(false).map_err(|e| e.to_string())?;
    // A binary tree: fewer comparisons per system call, for the kernel's
    // check at load time and for every call the container makes.
    ctx.set_ctl_optimize(2).map_err(|e| e.to_string())?;
    for name in denied {
        let Ok(sc) = ScmpSyscall::from_name(name) else {
            continue;
        };
        ctx.add_rule(ScmpAction::Errno(libc::EPERM), sc)
            .map_err(|e| format!("{name}: {e}"))?;
    }
    // libseccomp 2.5 exports to a file descriptor only. The program (a few
    // KiB) fits in a pipe's buffer, so no second thread has to read it
    // meanwhile (the zygote must stay single-threaded).
    let (mut r, w) = std::io::pipe().map_err(|e| format!("pipe: {e}"))?;
    ctx.export_bpf(&w).map_err(|e| e.to_string())?;
    drop(w);
    let mut prog = Vec::new();
    r.read_to_end(&mut prog).map_err(|e| format!("read: {e}"))?;
    if prog.is_empty() || prog.len() % 8 != 0 {
        return Err(format!("exported program has {} bytes", prog.len()));
    }
    Ok(prog)
}

/// Install `prog` (from [`default_program`]) as this thread's seccomp
/// filter. The process must have set no_new_privs.
pub fn install(prog: &[u8]) -> Result<()> {
    let fprog = libc::sock_fprog {
        len: (prog.len() / 8) as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: fprog points at `prog`, which outlives the call; the kernel
    // copies the program.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &fprog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        return Err(Error::Sys(
            "seccomp(SECCOMP_SET_MODE_FILTER)".into(),
            nix::errno::Errno::last(),
        ));
    }
    Ok(())
}

/// libcontainer's default executor, which first installs the profile the
/// spec's [`ANNOTATION`] names. It runs in the init process after
/// libcontainer's last step, so the filter applies from the `execve` of the
/// container's command on, as libcontainer's own seccomp does for a
/// no_new_privs process (it loads it a few calls earlier).
#[derive(Clone, Default)]
pub struct OrcExecutor;

/// Whether the spec asks for the default profile; an error names any other
/// value of [`ANNOTATION`].
fn wants_default(spec: &Spec) -> std::result::Result<bool, String> {
    match spec.annotations().as_ref().and_then(|a| a.get(ANNOTATION)) {
        None => Ok(false),
        Some(p) if p == DEFAULT_PROFILE => Ok(true),
        Some(p) => Err(format!(
            "annotation {ANNOTATION}: unknown seccomp profile {p:?}"
        )),
    }
}

impl Executor for OrcExecutor {
    fn exec(&self, spec: &Spec) -> std::result::Result<(), ExecutorError> {
        if wants_default(spec).map_err(ExecutorError::Other)? {
            default_program()
                .and_then(install)
                .map_err(|e| ExecutorError::Other(e.to_string()))?;
        }
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> std::result::Result<(), ExecutorValidationError> {
        wants_default(spec).map_err(ExecutorValidationError::ArgValidationError)?;
        DefaultExecutor {}.validate(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_profile_compiles_to_a_tree_over_three_architectures() {
        let prog = default_program().expect("compiles");
        let insns = prog.len() / 8;
        // More than a comparison per denied call and architecture would
        // be the linear form; a handful means rules went missing.
        assert!(insns > 40 && insns < 400, "{insns} instructions");
        // Compiled once: the same bytes, at the same address.
        assert!(std::ptr::eq(prog, default_program().unwrap()));
    }

    #[test]
    fn unknown_names_are_skipped_and_known_ones_kept() {
        let one = compile(&["mount"]).unwrap();
        let with_unknown = compile(&["mount", "no_such_call_anywhere"]).unwrap();
        assert_eq!(one, with_unknown);
        assert_ne!(one, compile(&["mount", "umount2"]).unwrap());
    }
}
