//! Masquerade for pod traffic that leaves the cluster: an nftables table of
//! the agent's (`ip orc-nat`), written whole with `nft -f`. Pod-to-pod traffic
//! (inside the cluster CIDR) keeps its addresses, as the Kubernetes network
//! model asks.

pub const TABLE: &str = "orc-nat";

/// The ruleset (pure): replace the table with one postrouting rule.
pub fn ruleset(pod_cidr: &str, cluster_cidr: &str, bridge: &str) -> String {
    format!(
        "table ip {TABLE} {{}}\nflush table ip {TABLE}\ntable ip {TABLE} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    ip saddr {pod_cidr} ip daddr != {cluster_cidr} oifname != \"{bridge}\" masquerade\n  }}\n}}\n"
    )
}

pub fn apply(pod_cidr: &str, cluster_cidr: &str, bridge: &str) -> Result<(), String> {
    orc_proxy::nft(&ruleset(pod_cidr, cluster_cidr, bridge)).map_err(|e| e.to_string())
}

/// Remove the table (a node reset).
pub fn remove() {
    let _ = orc_proxy::nft(&format!("table ip {TABLE} {{}}\ndelete table ip {TABLE}\n"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masquerades_only_what_leaves_the_cluster() {
        let r = ruleset("198.18.3.0/24", "198.18.0.0/16", "orc0");
        assert!(r.contains(
            "ip saddr 198.18.3.0/24 ip daddr != 198.18.0.0/16 oifname != \"orc0\" masquerade"
        ));
        assert!(r.contains("type nat hook postrouting priority srcnat"));
        assert!(r.starts_with("table ip orc-nat {}\nflush table ip orc-nat\n"));
    }
}
