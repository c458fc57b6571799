//! orc-netlink: the pod network of one node, built over netlink (rtnetlink), never
//! by running `ip`. It owns named network namespaces (bind mounts under a
//! directory of the agent's), the node bridge, one veth pair per pod and the
//! routes to other nodes' podCIDRs. It knows nothing of pods or the API: callers
//! pass names, paths and addresses. It must not depend on the agent or the API.
use futures::TryStreamExt;
use rtnetlink::packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InfoData, InfoKind, InfoVeth, LinkAttribute,
    LinkMessage,
};
use rtnetlink::{
    Handle, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth,
    RouteMessageBuilder,
};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("netlink: {context}: {source}")]
    Netlink {
        context: String,
        source: rtnetlink::Error,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, Error>;

fn nl(context: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
    let context = context.into();
    move |source| Error::Netlink { context, source }
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// A netlink connection in the calling thread's network namespace.
pub fn connect() -> Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(io("netlink socket"))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// A netlink connection inside the network namespace bound at `netns`. The
/// socket is opened by a thread that enters the namespace, so it stays there.
pub fn connect_in(netns: &Path) -> Result<Handle> {
    let path = netns.to_path_buf();
    let rt = tokio::runtime::Handle::current();
    let (conn, handle, _) = std::thread::spawn(move || -> Result<_> {
        let _in_runtime = rt.enter();
        let f = std::fs::File::open(&path).map_err(io(format!("open {}", path.display())))?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| Error::Io {
            context: format!("setns {}", path.display()),
            source: e.into(),
        })?;
        rtnetlink::new_connection().map_err(io("netlink socket"))
    })
    .join()
    .map_err(|_| Error::Other("netns thread panicked".into()))??;
    tokio::spawn(conn);
    Ok(handle)
}

/// Create a named network namespace: a new one, bind-mounted at `path`
/// (like `ip netns add`). An existing binding is kept.
pub fn create_netns(path: &Path) -> Result<()> {
    if is_netns(path) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("mkdir {}", dir.display())))?;
    }
    std::fs::File::create(path).map_err(io(format!("create {}", path.display())))?;
    let target = path.to_path_buf();
    std::thread::spawn(move || -> Result<()> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| Error::Io {
            context: "unshare(CLONE_NEWNET)".into(),
            source: e.into(),
        })?;
        let me = format!("/proc/self/task/{}/ns/net", nix::unistd::gettid());
        nix::mount::mount(
            Some(me.as_str()),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| Error::Io {
            context: format!("bind {me} on {}", target.display()),
            source: e.into(),
        })
    })
    .join()
    .map_err(|_| Error::Other("netns thread panicked".into()))?
    .inspect_err(|_| {
        let _ = std::fs::remove_file(path);
    })
}

/// Make `dir`, where pod network namespaces are bound, a private mount
/// point of its own (bound on itself, as `ip netns` does with /run/netns):
/// the bindings made under it then propagate into no other mount namespace,
/// and one detach takes them all out of a namespace that does not need
/// them (a container's shim does that). Bindings already there stay
/// visible. Done already: nothing changes.
pub fn bind_netns_dir(dir: &Path) -> Result<()> {
    use nix::mount::{mount, MsFlags};
    let private = || {
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_PRIVATE,
            None::<&str>,
        )
    };
    if private().is_ok() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(io(format!("mkdir {}", dir.display())))?;
    mount(
        Some(dir),
        dir,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| Error::Io {
        context: format!("bind {} on itself", dir.display()),
        source: e.into(),
    })?;
    private().map_err(|e| Error::Io {
        context: format!("make {} private", dir.display()),
        source: e.into(),
    })
}

/// Undo [`bind_netns_dir`] (its bindings should be gone first).
pub fn release_netns_dir(dir: &Path) {
    let _ = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH);
}

/// Is a network namespace bound at `path`?
pub fn is_netns(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    // A bind-mounted namespace file lives on the nsfs filesystem, whose device
    // differs from the directory's.
    match (
        std::fs::metadata(path),
        path.parent().map(std::fs::metadata),
    ) {
        (Ok(f), Some(Ok(d))) => f.dev() != d.dev(),
        _ => false,
    }
}

/// Remove a named network namespace (its veth ends go with it).
pub fn delete_netns(path: &Path) -> Result<()> {
    if is_netns(path) {
        nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).map_err(|e| Error::Io {
            context: format!("umount {}", path.display()),
            source: e.into(),
        })?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(io(format!("remove {}", path.display()))(e))
        }
        _ => Ok(()),
    }
}

/// The index of link `name`, if it exists.
pub async fn link_index(h: &Handle, name: &str) -> Result<Option<u32>> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(l)) => Ok(Some(l.header.index)),
        Ok(None) => Ok(None),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc_enodev() => Ok(None),
        Err(e) => Err(nl(format!("get link {name}"))(e)),
    }
}

fn libc_enodev() -> i32 {
    nix::errno::Errno::ENODEV as i32
}

/// Names of all links whose name starts with `prefix`.
pub async fn links_with_prefix(h: &Handle, prefix: &str) -> Result<Vec<String>> {
    let links: Vec<LinkMessage> = h
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("list links"))?;
    Ok(links
        .iter()
        .filter_map(|l| {
            l.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) if n.starts_with(prefix) => Some(n.clone()),
                _ => None,
            })
        })
        .collect())
}

async fn add_address(h: &Handle, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<()> {
    match h
        .address()
        .add(index, IpAddr::V4(ip), prefix)
        .execute()
        .await
    {
        Err(rtnetlink::Error::NetlinkError(e))
            if e.raw_code() == -(nix::errno::Errno::EEXIST as i32) =>
        {
            Ok(())
        }
        r => r.map_err(nl(format!("add address {ip}/{prefix}"))),
    }
}

/// The node bridge `name` with `gateway/prefix`, up. Idempotent.
pub async fn ensure_bridge(h: &Handle, name: &str, gateway: Ipv4Addr, prefix: u8) -> Result<u32> {
    let index = match link_index(h, name).await? {
        Some(i) => i,
        None => {
            h.link()
                .add(LinkBridge::new(name).build())
                .execute()
                .await
                .map_err(nl(format!("add bridge {name}")))?;
            link_index(h, name)
                .await?
                .ok_or_else(|| Error::Other(format!("bridge {name} vanished")))?
        }
    };
    add_address(h, index, gateway, prefix).await?;
    // A fixed MAC: a bridge left to itself takes the lowest MAC of its
    // ports, so adding a pod could change the gateway's MAC under the other
    // pods' ARP caches (their traffic to it then vanishes until the entries
    // expire, some 30 s).
    h.link()
        .set(
            LinkUnspec::new_with_index(index)
                .address(pod_mac(gateway).to_vec())
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(nl(format!("up {name}")))?;
    Ok(index)
}

/// What one pod's interface looks like.
#[derive(Debug, Clone)]
pub struct PodLink {
    /// Host end of the veth pair (at most 15 bytes).
    pub host_veth: String,
    pub bridge: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
}

/// The pod's MAC address, derived from its IP (`0a:58:` and the four
/// address bytes, as OVN-Kubernetes does): an address handed to a new pod
/// keeps its MAC, so neighbours' ARP caches stay right when IPs are reused.
pub fn pod_mac(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x0a, 0x58, o[0], o[1], o[2], o[3]]
}

/// Plug the namespace at `netns` into the bridge: a veth pair whose pod end
/// is `eth0` with the pod's address and a default route via the bridge.
/// Idempotent: an existing host end is replaced.
///
/// The pod end is created inside the pod's namespace, already named and
/// with its MAC. Made on the host and moved in afterwards, it cost an RCU
/// barrier per pod taken under the RTNL lock (`__dev_change_net_namespace`),
/// during which every other netlink request and every new network
/// namespace on the machine waited: a burst of pods was serialized on it.
pub async fn attach(host: &Handle, netns: &Path, l: &PodLink) -> Result<()> {
    let bridge = link_index(host, &l.bridge)
        .await?
        .ok_or_else(|| Error::Other(format!("no bridge {}", l.bridge)))?;
    let ns = std::fs::File::open(netns).map_err(io(format!("open {}", netns.display())))?;
    let pair = || {
        // Not up yet: the kernel (6.18) refuses a pod end made up in another
        // namespace with ENOTCONN.
        let pod_end = LinkUnspec::new_with_name("eth0")
            .address(pod_mac(l.ip).to_vec())
            .setns_by_fd(ns.as_raw_fd())
            .build();
        LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(l.host_veth.clone())
            .controller(bridge)
            .up()
            .set_info_data(InfoData::Veth(InfoVeth::Peer(pod_end)))
            .build()
    };
    match host.link().add(pair()).execute().await {
        Err(rtnetlink::Error::NetlinkError(e))
            if e.raw_code() == -(nix::errno::Errno::EEXIST as i32) =>
        {
            // A pair left by an earlier attempt: replace it (its pod end goes with it).
            detach(host, &l.host_veth).await?;
            host.link()
                .add(pair())
                .execute()
                .await
                .map_err(nl(format!("add veth {}", l.host_veth)))?;
        }
        r => r.map_err(nl(format!("add veth {}", l.host_veth)))?,
    }
    let hi = link_index(host, &l.host_veth)
        .await?
        .ok_or_else(|| Error::Other("veth vanished".into()))?;
    // Before the pair has a carrier (its pod end is still down).
    no_ipv6_addresses(host, hi, &l.host_veth).await?;
    // Hairpin: a pod reaching itself through a service comes back on its port.
    host.link()
        .set_port(LinkBridgePort::new(hi).hairpin(true).build())
        .execute()
        .await
        .map_err(nl("hairpin"))?;
    let pod = connect_in(netns)?;
    pod.link()
        .set(LinkUnspec::new_with_name("lo").up().build())
        .execute()
        .await
        .map_err(nl("lo up"))?;
    let pi = link_index(&pod, "eth0")
        .await?
        .ok_or_else(|| Error::Other("eth0 not in the pod namespace".into()))?;
    add_address(&pod, pi, l.ip, l.prefix).await?;
    no_ipv6_addresses(&pod, pi, "eth0").await?;
    pod.link()
        .set(LinkUnspec::new_with_index(pi).up().build())
        .execute()
        .await
        .map_err(nl("eth0 up"))?;
    pod.route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(l.gateway)
                .build(),
        )
        .replace()
        .execute()
        .await
        .map_err(nl("default route"))?;
    Ok(())
}

/// Give link `index` no IPv6 address of its own, as Docker does for the
/// containers of a network without IPv6: the pod network is IPv4, and each
/// veth that came up with a link-local address made the kernel run
/// duplicate address detection, router solicitation and MLD reports for it,
/// each flooded to all the bridge's ports: in a burst of 100 pods onto one
/// node, kernel workers doing that took about 5 % of the CPU. IPv6 itself
/// stays: sockets bound to `::` still take IPv4, and `lo` keeps `::1`.
/// Must come before the link has a carrier, when addresses are made.
async fn no_ipv6_addresses(h: &Handle, index: u32, name: &str) -> Result<()> {
    let r = h
        .link()
        .set(
            LinkUnspec::new_with_index(index)
                .append_extra_attribute(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
                    vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)],
                )]))
                .build(),
        )
        .execute()
        .await;
    match r {
        // A kernel without IPv6 makes no addresses anyway.
        Err(rtnetlink::Error::NetlinkError(e))
            if e.raw_code() == -(nix::errno::Errno::EAFNOSUPPORT as i32) =>
        {
            Ok(())
        }
        r => r.map_err(nl(format!("{name}: addrgenmode none"))),
    }
}

/// Remove a host veth (and so its pod end). Missing is fine.
pub async fn detach(host: &Handle, host_veth: &str) -> Result<()> {
    if let Some(i) = link_index(host, host_veth).await? {
        host.link()
            .del(i)
            .execute()
            .await
            .map_err(nl(format!("delete {host_veth}")))?;
    }
    Ok(())
}

/// A route to `dst/prefix` through `via` (another node's podCIDR), replaced
/// if it exists.
pub async fn ensure_route(h: &Handle, dst: Ipv4Addr, prefix: u8, via: Ipv4Addr) -> Result<()> {
    h.route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(dst, prefix)
                .gateway(via)
                .build(),
        )
        .replace()
        .execute()
        .await
        .map_err(nl(format!("route {dst}/{prefix} via {via}")))
}

/// The IPv4 address of the interface that carries the default route: the
/// node's own address.
pub async fn default_address(h: &Handle) -> Result<Option<Ipv4Addr>> {
    use rtnetlink::packet_route::route::RouteAttribute;
    let routes: Vec<_> = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(nl("list routes"))?;
    let oif = routes.iter().find_map(|r| {
        if r.header.destination_prefix_length != 0 {
            return None;
        }
        r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        })
    });
    let Some(oif) = oif else { return Ok(None) };
    Ok(address_messages(h, Some(oif)).await?.iter().find_map(v4_of))
}

/// The address messages of interface `index` (all interfaces: None).
async fn address_messages(
    h: &Handle,
    index: Option<u32>,
) -> Result<Vec<rtnetlink::packet_route::address::AddressMessage>> {
    let mut req = h.address().get();
    if let Some(i) = index {
        req = req.set_link_index_filter(i);
    }
    req.execute()
        .try_collect()
        .await
        .map_err(nl("list addresses"))
}

/// The IPv4 address an address message carries.
fn v4_of(m: &rtnetlink::packet_route::address::AddressMessage) -> Option<Ipv4Addr> {
    use rtnetlink::packet_route::address::AddressAttribute;
    m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
        _ => None,
    })
}

/// The index of the interface holding `ip`.
pub async fn interface_of(h: &Handle, ip: Ipv4Addr) -> Result<Option<u32>> {
    Ok(address_messages(h, None)
        .await?
        .iter()
        .find(|m| v4_of(m) == Some(ip))
        .map(|m| m.header.index))
}

/// The /32 addresses on interface `index` (those a node announces for
/// LoadBalancer Services).
pub async fn host_addresses(h: &Handle, index: u32) -> Result<Vec<Ipv4Addr>> {
    Ok(address_messages(h, Some(index))
        .await?
        .iter()
        .filter(|m| m.header.prefix_len == 32)
        .filter_map(v4_of)
        .collect())
}

/// Add `ip`/32 to interface `index` (the kernel then answers ARP for it).
pub async fn add_host_address(h: &Handle, index: u32, ip: Ipv4Addr) -> Result<()> {
    add_address(h, index, ip, 32).await
}

/// Remove `ip`/32 from interface `index`.
pub async fn del_host_address(h: &Handle, index: u32, ip: Ipv4Addr) -> Result<()> {
    for m in address_messages(h, Some(index)).await? {
        if m.header.prefix_len == 32 && v4_of(&m) == Some(ip) {
            h.address()
                .del(m)
                .execute()
                .await
                .map_err(nl(format!("delete address {ip}/32")))?;
        }
    }
    Ok(())
}

/// Host-side veth name for a pod: `orc` + 11 hex digits of its uid.
pub fn veth_name(pod_uid: &str) -> String {
    let hex: String = pod_uid
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .take(11)
        .collect();
    format!("orc{hex}")
}

/// Where the agent binds pod namespaces.
pub fn netns_path(dir: &Path, pod_uid: &str) -> PathBuf {
    dir.join(pod_uid)
}

/// Turn on IPv4 forwarding in the calling thread's namespace.
pub fn enable_forwarding() -> Result<()> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(io("ip_forward"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn pod_mac_follows_the_ip() {
        let m = super::pod_mac(std::net::Ipv4Addr::new(198, 18, 1, 7));
        assert_eq!(m, [0x0a, 0x58, 198, 18, 1, 7]);
        // Locally administered, unicast.
        assert_eq!(m[0] & 0b11, 0b10);
    }

    use super::*;

    #[test]
    fn veth_names_fit_ifnamsiz() {
        let n = veth_name("0f8e6a42-1b2c-4d5e-9f00-aabbccddeeff");
        assert_eq!(n, "orc0f8e6a421b2");
        assert!(n.len() <= 15);
    }
}
