//! Connect-time balancing of ClusterIP traffic from the node's own pods (a
//! "socket load balancer", as Cilium and Calico's eBPF mode have): a BPF
//! program on the cgroup-v2 `connect4` hook rewrites the address a pod's TCP
//! socket connects to, from the ClusterIP and port to one ready endpoint,
//! before any packet exists. The connection then runs exactly as one made
//! to the pod IP: no DNAT, no per-packet conntrack rewrite, no detour
//! through the node's IP stack. It remembers the ClusterIP and port each
//! socket asked for, and a second program, on `getpeername4`, reports them
//! as the socket's peer, as NAT would. The nftables table stays the data path for
//! everything else (NodePort, external and LoadBalancer addresses, UDP,
//! sessionAffinity, the round-robin scheduler, processes outside pods) and
//! for a pod whose connect the program passes over.
//!
//! The program only acts for sockets of the network namespaces registered in
//! [`PodSet`] (each pod's, by netns cookie), so several agents on one machine
//! (one link each on the cgroup root) and the host itself are left alone. The
//! link, program and maps belong to the agent process: when it exits they go
//! with it, and its pods fall back to the nftables rules, which stay.
//!
//! [`entry`] (which Services it serves, the map's bytes), [`program`] and
//! [`peer_program`] (the instructions) are pure; the rest is the `bpf(2)` calls, made
//! directly (a few dozen instructions do not call for a BPF toolchain).
use crate::model::{Scheduler, VirtualServer};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Endpoints a Service may have and still be balanced at connect time;
/// one with more keeps to the nftables rules.
pub const MAX_BACKENDS: usize = 64;
/// Size of a map key: the address and port as the hook sees them.
pub const KEY_SIZE: usize = 8;
/// Size of a map value: the endpoint count, then `MAX_BACKENDS` slots.
pub const VALUE_SIZE: usize = 8 + 8 * MAX_BACKENDS;
const MAX_SERVICES: u32 = 65_536;
const MAX_PODS: u32 = 4_096;

pub type Key = [u8; KEY_SIZE];

/// The key of a ClusterIP and port: both in network order, the port in the
/// low half of a 32-bit word (`bpf_sock_addr.user_port`).
pub fn key(ip: Ipv4Addr, port: u16) -> Key {
    let mut k = [0u8; KEY_SIZE];
    k[..4].copy_from_slice(&ip.octets());
    k[4..6].copy_from_slice(&port.to_be_bytes());
    k
}

/// What the program holds for one virtual server, if it balances it at
/// connect time: TCP to a ClusterIP, random choice, no session affinity,
/// 1 to `MAX_BACKENDS` ready endpoints (without any, the nftables rule
/// rejects the connection at once, as it should).
pub fn entry(vs: &VirtualServer) -> Option<(Key, Vec<u8>)> {
    let (ip, port) = vs.cluster?;
    let b = &vs.internal_backends;
    if vs.proto != "tcp"
        || vs.affinity.is_some()
        || vs.scheduler != Scheduler::Random
        || b.is_empty()
        || b.len() > MAX_BACKENDS
    {
        return None;
    }
    let mut v = vec![0u8; VALUE_SIZE];
    v[..4].copy_from_slice(&(b.len() as u32).to_ne_bytes());
    for (i, e) in b.iter().enumerate() {
        let at = 8 + 8 * i;
        v[at..at + 4].copy_from_slice(&e.ip.octets());
        v[at + 4..at + 6].copy_from_slice(&e.port.to_be_bytes());
    }
    Some((key(ip, port), v))
}

// The few BPF opcodes the program needs (linux/bpf_common.h, linux/bpf.h).
const LDX_W: u8 = 0x61; // r_dst = *(u32 *)(r_src + off)
const STX_W: u8 = 0x63; // *(u32 *)(r_dst + off) = r_src
const STX_DW: u8 = 0x7b; // *(u64 *)(r_dst + off) = r_src
const ST_DW: u8 = 0x7a; // *(u64 *)(r_dst + off) = imm
const MOV64_X: u8 = 0xbf;
const MOV64_K: u8 = 0xb7;
const ADD64_K: u8 = 0x07;
const ADD64_X: u8 = 0x0f;
const LSH64_K: u8 = 0x67;
const MOD32_X: u8 = 0x9c;
const JEQ_K: u8 = 0x15;
const JNE_K: u8 = 0x55;
const JGE_K: u8 = 0x35;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const LD_DW_IMM: u8 = 0x18;
const PSEUDO_MAP_FD: u8 = 1;
const FN_MAP_LOOKUP: i32 = 1;
const FN_MAP_UPDATE: i32 = 2;
const FN_PRANDOM: i32 = 7;
const FN_SOCKET_COOKIE: i32 = 46;
const FN_NETNS_COOKIE: i32 = 122;
// struct bpf_sock_addr
const CTX_USER_IP4: i16 = 4;
const CTX_USER_PORT: i16 = 24;
const CTX_PROTOCOL: i16 = 36;
const IPPROTO_TCP: i32 = 6;

fn ins(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    (code as u64)
        | ((dst as u64 & 0xf) << 8)
        | ((src as u64 & 0xf) << 12)
        | ((off as u16 as u64) << 16)
        | ((imm as u32 as u64) << 32)
}

/// The `connect4` program, with the three maps' file descriptors:
///
/// ```text
/// if protocol != TCP                          -> pass
/// if netns cookie not in pods                 -> pass
/// v = services[user_ip4, user_port] or        -> pass
/// i = random % v.count
/// peers[socket cookie] = user_ip4, user_port  (for getpeername)
/// user_ip4, user_port = v.backends[i]
/// pass (1: the connect goes on, to wherever the context now says)
/// ```
pub fn program(pods: RawFd, services: RawFd, peers: RawFd) -> Vec<u64> {
    let pass = |at: usize, here: usize| (at as i64 - here as i64 - 1) as i16;
    let mut p: Vec<u64> = Vec::new();
    // Jumps to the end are patched once its index is known.
    let mut to_pass: Vec<usize> = Vec::new();
    // r0 = the value under the key at r10+key in map `map`, or pass.
    let lookup = |p: &mut Vec<u64>, to_pass: &mut Vec<usize>, map: RawFd, key: i32| {
        p.push(ins(LD_DW_IMM, 1, PSEUDO_MAP_FD, 0, map));
        p.push(0);
        p.push(ins(MOV64_X, 2, 10, 0, 0));
        p.push(ins(ADD64_K, 2, 0, 0, key));
        p.push(ins(CALL, 0, 0, 0, FN_MAP_LOOKUP));
        to_pass.push(p.len());
        p.push(ins(JEQ_K, 0, 0, 0, 0));
    };
    p.push(ins(MOV64_X, 6, 1, 0, 0)); // r6 = ctx
    p.push(ins(LDX_W, 0, 6, CTX_PROTOCOL, 0));
    to_pass.push(p.len());
    p.push(ins(JNE_K, 0, 0, 0, IPPROTO_TCP));
    p.push(ins(CALL, 0, 0, 0, FN_NETNS_COOKIE)); // r1 is still ctx
    p.push(ins(STX_DW, 10, 0, -8, 0));
    lookup(&mut p, &mut to_pass, pods, -8);
    // key at r10-16: user_ip4, then user_port as a 32-bit word
    p.push(ins(ST_DW, 10, 0, -16, 0));
    p.push(ins(LDX_W, 1, 6, CTX_USER_IP4, 0));
    p.push(ins(STX_W, 10, 1, -16, 0));
    p.push(ins(LDX_W, 1, 6, CTX_USER_PORT, 0));
    p.push(ins(STX_W, 10, 1, -12, 0));
    lookup(&mut p, &mut to_pass, services, -16);
    p.push(ins(MOV64_X, 7, 0, 0, 0)); // r7 = value
    p.push(ins(LDX_W, 8, 7, 0, 0)); // r8 = count
    to_pass.push(p.len());
    p.push(ins(JEQ_K, 8, 0, 0, 0));
    p.push(ins(CALL, 0, 0, 0, FN_PRANDOM));
    p.push(ins(MOD32_X, 0, 8, 0, 0)); // w0 %= w8
    to_pass.push(p.len());
    p.push(ins(JGE_K, 0, 0, 0, MAX_BACKENDS as i32));
    p.push(ins(LSH64_K, 0, 0, 0, 3));
    p.push(ins(ADD64_X, 7, 0, 0, 0));
    // peers[cookie] = the key (the ClusterIP and port asked for)
    p.push(ins(MOV64_X, 1, 6, 0, 0));
    p.push(ins(CALL, 0, 0, 0, FN_SOCKET_COOKIE));
    p.push(ins(STX_DW, 10, 0, -24, 0));
    p.push(ins(LD_DW_IMM, 1, PSEUDO_MAP_FD, 0, peers));
    p.push(0);
    p.push(ins(MOV64_X, 2, 10, 0, 0));
    p.push(ins(ADD64_K, 2, 0, 0, -24));
    p.push(ins(MOV64_X, 3, 10, 0, 0));
    p.push(ins(ADD64_K, 3, 0, 0, -16));
    p.push(ins(MOV64_K, 4, 0, 0, 0));
    p.push(ins(CALL, 0, 0, 0, FN_MAP_UPDATE));
    p.push(ins(LDX_W, 1, 7, 8, 0));
    p.push(ins(STX_W, 6, 1, CTX_USER_IP4, 0));
    p.push(ins(LDX_W, 1, 7, 12, 0));
    p.push(ins(STX_W, 6, 1, CTX_USER_PORT, 0));
    let end = p.len();
    p.push(ins(MOV64_K, 0, 0, 0, 1));
    p.push(ins(EXIT, 0, 0, 0, 0));
    for at in to_pass {
        let off = pass(end, at) as u16 as u64;
        p[at] = (p[at] & !(0xffff << 16)) | (off << 16);
    }
    p
}

/// The `getpeername4` program: a socket the connect program sent to an
/// endpoint shows the ClusterIP and port it asked for as its peer, as it
/// would through the NAT rules.
///
/// ```text
/// if peers[socket cookie] is (ip, port): user_ip4, user_port = ip, port
/// 1
/// ```
pub fn peer_program(peers: RawFd) -> Vec<u64> {
    vec![
        ins(MOV64_X, 6, 1, 0, 0),
        ins(CALL, 0, 0, 0, FN_SOCKET_COOKIE),
        ins(STX_DW, 10, 0, -8, 0),
        ins(LD_DW_IMM, 1, PSEUDO_MAP_FD, 0, peers),
        0,
        ins(MOV64_X, 2, 10, 0, 0),
        ins(ADD64_K, 2, 0, 0, -8),
        ins(CALL, 0, 0, 0, FN_MAP_LOOKUP),
        ins(JEQ_K, 0, 0, 4, 0),
        ins(LDX_W, 1, 0, 0, 0),
        ins(STX_W, 6, 1, CTX_USER_IP4, 0),
        ins(LDX_W, 1, 0, 4, 0),
        ins(STX_W, 6, 1, CTX_USER_PORT, 0),
        ins(MOV64_K, 0, 0, 0, 1),
        ins(EXIT, 0, 0, 0, 0),
    ]
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bpf {what}: {source}")]
    Bpf {
        what: &'static str,
        source: io::Error,
    },
    #[error("bpf program rejected: {source}\n{log}")]
    Verifier { source: io::Error, log: String },
    #[error("no cgroup2 file system is mounted (/proc/self/mountinfo)")]
    NoCgroup2,
    #[error("{0}: {1}")]
    Io(String, io::Error),
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const MAP_HASH: u32 = 1;
const MAP_LRU_HASH: u32 = 9;
const F_NO_PREALLOC: u32 = 1;
const PROG_CGROUP_SOCK_ADDR: u32 = 18;
const ATTACH_INET4_CONNECT: u32 = 10;
const ATTACH_INET4_GETPEERNAME: u32 = 29;
/// Sockets whose ClusterIP is remembered for getpeername (least recently
/// used ones make room).
const MAX_PEERS: u32 = 65_536;

/// `union bpf_attr`, as bytes: what each command reads is at the front and
/// the kernel wants the rest zero.
struct Attr([u8; 128]);
impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn u32(mut self, at: usize, v: u32) -> Self {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(mut self, at: usize, v: u64) -> Self {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn name(mut self, at: usize, n: &str) -> Self {
        let b = n.as_bytes();
        let l = b.len().min(15);
        self.0[at..at + l].copy_from_slice(&b[..l]);
        self
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, writable buffer of the size passed; every
    // pointer inside it refers to memory that outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            attr.0.len() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn fd(r: i64) -> OwnedFd {
    // SAFETY: the kernel just returned this descriptor to us; nobody else owns it.
    unsafe { OwnedFd::from_raw_fd(r as RawFd) }
}

fn map_create(name: &str, key: u32, value: u32, max: u32) -> Result<OwnedFd, Error> {
    map_create_of(MAP_HASH, F_NO_PREALLOC, name, key, value, max)
}

fn map_create_of(
    kind: u32,
    flags: u32,
    name: &str,
    key: u32,
    value: u32,
    max: u32,
) -> Result<OwnedFd, Error> {
    let mut a = Attr::new()
        .u32(0, kind)
        .u32(4, key)
        .u32(8, value)
        .u32(12, max)
        .u32(16, flags)
        .name(28, name);
    bpf(BPF_MAP_CREATE, &mut a)
        .map(fd)
        .map_err(|source| Error::Bpf {
            what: "map create",
            source,
        })
}

fn map_update(map: &OwnedFd, key: &[u8], value: &[u8]) -> Result<(), Error> {
    let mut a = Attr::new()
        .u32(0, map.as_raw_fd() as u32)
        .u64(8, key.as_ptr() as u64)
        .u64(16, value.as_ptr() as u64);
    bpf(BPF_MAP_UPDATE_ELEM, &mut a)
        .map(|_| ())
        .map_err(|source| Error::Bpf {
            what: "map update",
            source,
        })
}

fn map_delete(map: &OwnedFd, key: &[u8]) -> Result<(), Error> {
    let mut a = Attr::new()
        .u32(0, map.as_raw_fd() as u32)
        .u64(8, key.as_ptr() as u64);
    match bpf(BPF_MAP_DELETE_ELEM, &mut a) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(source) => Err(Error::Bpf {
            what: "map delete",
            source,
        }),
    }
}

/// Where the cgroup2 file system is mounted (the unified hierarchy).
pub fn cgroup2_root() -> Result<PathBuf, Error> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::Io("/proc/self/mountinfo".into(), e))?;
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .ok_or(Error::NoCgroup2)
}

/// The network namespaces whose sockets the program balances: a pod's is
/// added when its sandbox is made (or adopted) and removed before it goes.
#[derive(Clone)]
pub struct PodSet(Arc<OwnedFd>);

impl PodSet {
    pub fn add(&self, cookie: u64) -> Result<(), Error> {
        map_update(&self.0, &cookie.to_ne_bytes(), &1u32.to_ne_bytes())
    }
    pub fn remove(&self, cookie: u64) -> Result<(), Error> {
        map_delete(&self.0, &cookie.to_ne_bytes())
    }
}

/// The loaded program, attached to the cgroup root for as long as this
/// value (the agent) lives, and its maps.
pub struct SockLb {
    pods: PodSet,
    services: OwnedFd,
    /// The programs, their links and the peers map.
    _held: [OwnedFd; 5],
}

/// Load a `cgroup/sock_addr` program for the hook `attach`.
fn load(insns: &[u64], name: &str, attach: u32) -> Result<OwnedFd, Error> {
    let license = c"Apache-2.0";
    let mut log = vec![0u8; 64 * 1024];
    let mut try_load = |log_level: u32| {
        let mut a = Attr::new()
            .u32(0, PROG_CGROUP_SOCK_ADDR)
            .u32(4, insns.len() as u32)
            .u64(8, insns.as_ptr() as u64)
            .u64(16, license.as_ptr() as u64)
            .u32(24, log_level)
            .u32(28, if log_level > 0 { log.len() as u32 } else { 0 })
            .u64(
                32,
                if log_level > 0 {
                    log.as_mut_ptr() as u64
                } else {
                    0
                },
            )
            .name(48, name)
            .u32(68, attach);
        bpf(BPF_PROG_LOAD, &mut a)
    };
    match try_load(0) {
        Ok(r) => Ok(fd(r)),
        Err(_) => {
            // Again, with the verifier's log to say why.
            let source = try_load(1)
                .err()
                .unwrap_or_else(|| io::Error::other("rejected once, accepted on the second try"));
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            Err(Error::Verifier {
                source,
                log: String::from_utf8_lossy(&log[..end]).into_owned(),
            })
        }
    }
}

/// Attach `prog` to the cgroup `cg` for the hook `attach`, for as long as
/// the returned link is open.
fn link(prog: &OwnedFd, cg: &std::fs::File, attach: u32) -> Result<OwnedFd, Error> {
    let mut a = Attr::new()
        .u32(0, prog.as_raw_fd() as u32)
        .u32(4, cg.as_raw_fd() as u32)
        .u32(8, attach);
    bpf(BPF_LINK_CREATE, &mut a)
        .map(fd)
        .map_err(|source| Error::Bpf {
            what: "link create",
            source,
        })
}

impl SockLb {
    /// Load the program and attach it to the root of the cgroup2 hierarchy.
    pub fn attach() -> Result<SockLb, Error> {
        let pods = map_create("orc_lb_pods", 8, 4, MAX_PODS)?;
        let services = map_create(
            "orc_lb_svc",
            KEY_SIZE as u32,
            VALUE_SIZE as u32,
            MAX_SERVICES,
        )?;
        let peers = map_create_of(
            MAP_LRU_HASH,
            0,
            "orc_lb_peers",
            8,
            KEY_SIZE as u32,
            MAX_PEERS,
        )?;
        let root = cgroup2_root()?;
        let cg =
            std::fs::File::open(&root).map_err(|e| Error::Io(root.display().to_string(), e))?;
        let connect = load(
            &program(pods.as_raw_fd(), services.as_raw_fd(), peers.as_raw_fd()),
            "orc_connect4",
            ATTACH_INET4_CONNECT,
        )?;
        let connect_link = link(&connect, &cg, ATTACH_INET4_CONNECT)?;
        let peer = load(
            &peer_program(peers.as_raw_fd()),
            "orc_peername4",
            ATTACH_INET4_GETPEERNAME,
        )?;
        let peer_link = link(&peer, &cg, ATTACH_INET4_GETPEERNAME)?;
        Ok(SockLb {
            pods: PodSet(Arc::new(pods)),
            services,
            _held: [connect, connect_link, peer, peer_link, peers],
        })
    }

    pub fn pods(&self) -> PodSet {
        self.pods.clone()
    }

    pub fn set(&self, key: &Key, value: &[u8]) -> Result<(), Error> {
        map_update(&self.services, key, value)
    }

    pub fn remove(&self, key: &Key) -> Result<(), Error> {
        map_delete(&self.services, key)
    }
}

/// The cookie of the network namespace bound at `path` (`SO_NETNS_COOKIE`
/// of a socket opened in it, by a thread that enters it).
pub fn netns_cookie(path: &Path) -> Result<u64, Error> {
    let f = std::fs::File::open(path).map_err(|e| Error::Io(path.display().to_string(), e))?;
    let here = path.display().to_string();
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: plain syscalls on descriptors this thread owns; the
            // thread (not the process) changes namespace and then ends.
            unsafe {
                if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(Error::Io(
                        format!("setns {here}"),
                        io::Error::last_os_error(),
                    ));
                }
                cookie_here()
            }
        })
        .join()
        .unwrap_or_else(|_| Err(Error::Io(here.clone(), io::Error::other("thread panicked"))))
    })
}

/// The cookie of the calling thread's network namespace.
pub fn cookie_here() -> Result<u64, Error> {
    // SAFETY: a socket this function owns and closes; getsockopt writes at
    // most `len` bytes into `cookie`.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return Err(Error::Io("socket".into(), io::Error::last_os_error()));
        }
        let s = OwnedFd::from_raw_fd(s);
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        const SO_NETNS_COOKIE: libc::c_int = 71;
        if libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        ) != 0
        {
            return Err(Error::Io(
                "getsockopt SO_NETNS_COOKIE".into(),
                io::Error::last_os_error(),
            ));
        }
        Ok(cookie)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Backend;

    fn vs(n: usize) -> VirtualServer {
        VirtualServer {
            key: "ns/web/http".into(),
            proto: "tcp",
            cluster: Some((Ipv4Addr::new(198, 19, 0, 1), 80)),
            external: vec![],
            node_port: None,
            internal_backends: (0..n)
                .map(|i| Backend {
                    ip: Ipv4Addr::new(198, 18, 0, 2 + i as u8),
                    port: 8080,
                })
                .collect(),
            external_backends: vec![],
            external_local: false,
            affinity: None,
            scheduler: Scheduler::Random,
        }
    }

    #[test]
    fn entry_bytes() {
        let (k, v) = entry(&vs(2)).unwrap();
        assert_eq!(k, [198, 19, 0, 1, 0, 80, 0, 0]);
        assert_eq!(v.len(), VALUE_SIZE);
        assert_eq!(u32::from_ne_bytes(v[..4].try_into().unwrap()), 2);
        assert_eq!(&v[8..16], &[198, 18, 0, 2, 0x1f, 0x90, 0, 0]);
        assert_eq!(&v[16..24], &[198, 18, 0, 3, 0x1f, 0x90, 0, 0]);
        assert!(v[24..].iter().all(|&b| b == 0));
    }

    #[test]
    fn what_stays_with_nftables() {
        assert!(entry(&vs(0)).is_none(), "no endpoint: nft rejects");
        assert!(entry(&vs(MAX_BACKENDS)).is_some());
        assert!(entry(&vs(MAX_BACKENDS + 1)).is_none());
        let mut v = vs(1);
        v.affinity = Some(10800);
        assert!(entry(&v).is_none());
        let mut v = vs(1);
        v.scheduler = Scheduler::RoundRobin;
        assert!(entry(&v).is_none());
        let mut v = vs(1);
        v.proto = "udp";
        assert!(entry(&v).is_none());
        let mut v = vs(1);
        v.cluster = None;
        assert!(entry(&v).is_none());
    }

    #[test]
    fn jumps_land_on_the_exit() {
        let p = program(3, 4, 5);
        let end = p.len() - 2;
        assert_eq!(p[end], ins(MOV64_K, 0, 0, 0, 1));
        let mut jumps = 0;
        for (i, &x) in p.iter().enumerate() {
            let code = (x & 0xff) as u8;
            if matches!(code, JEQ_K | JNE_K | JGE_K) {
                let off = ((x >> 16) & 0xffff) as u16 as i16;
                assert_eq!(i as i64 + 1 + off as i64, end as i64, "jump at {i}");
                jumps += 1;
            }
        }
        assert_eq!(jumps, 5);
        // The map descriptors sit in the two wide loads.
        let fds: Vec<i32> = p
            .iter()
            .filter(|&&x| (x & 0xff) as u8 == LD_DW_IMM)
            .map(|&x| (x >> 32) as i32)
            .collect();
        assert_eq!(fds, vec![3, 4, 5]);
        // The getpeername program's one jump skips the rewrite to its exit.
        let q = peer_program(5);
        let at = q.iter().position(|&x| (x & 0xff) as u8 == JEQ_K).unwrap();
        let off = ((q[at] >> 16) & 0xffff) as u16 as i16;
        assert_eq!(at as i64 + 1 + off as i64, q.len() as i64 - 2);
        assert_eq!(q[q.len() - 2], ins(MOV64_K, 0, 0, 0, 1));
    }
}
