//! Masquerade for pod traffic that leaves the cluster: an nftables table of
//! the agent's (`ip orc-nat`), written whole with `nft -f`. Pod-to-pod traffic
//! (inside the cluster CIDR) keeps its addresses, as the Kubernetes network
//! model asks.
use std::io::Write;
use std::process::{Command, Stdio};

pub const TABLE: &str = "orc-nat";

/// The ruleset (pure): replace the table with one postrouting rule.
pub fn ruleset(pod_cidr: &str, cluster_cidr: &str, bridge: &str) -> String {
    format!(
        "table ip {TABLE} {{}}\nflush table ip {TABLE}\ntable ip {TABLE} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    ip saddr {pod_cidr} ip daddr != {cluster_cidr} oifname != \"{bridge}\" masquerade\n  }}\n}}\n"
    )
}

fn nft(input: &str) -> Result<(), String> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft (apt-get install nftables): {e}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())
        .map_err(|e| format!("nft: {e}"))?;
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "nft: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

pub fn apply(pod_cidr: &str, cluster_cidr: &str, bridge: &str) -> Result<(), String> {
    nft(&ruleset(pod_cidr, cluster_cidr, bridge))
}

/// Remove the table (a node reset).
pub fn remove() {
    let _ = nft(&format!("table ip {TABLE} {{}}\ndelete table ip {TABLE}\n"));
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
