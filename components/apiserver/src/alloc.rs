//! ClusterIP and NodePort choices for a new Service (the accepting master's
//! decision, carried in the command; uniqueness is enforced when it is applied).
use orc_api::ApiError;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::net::Ipv4Addr;

fn cidr(s: &str) -> Option<(u32, u32)> {
    let (ip, bits) = s.split_once('/')?;
    let ip: Ipv4Addr = ip.parse().ok()?;
    let bits: u32 = bits.parse().ok().filter(|b| *b <= 30)?;
    let size = 1u32 << (32 - bits);
    Some((u32::from(ip) & !(size - 1), size))
}

/// Fill in `spec.clusterIP(s)` and missing `nodePort`s. `used(prefix)` lists the
/// allocation index keys under a prefix.
pub fn assign(
    svc: &mut Value,
    service_cidr: &str,
    ports: (u16, u16),
    used: &dyn Fn(&str) -> Vec<String>,
) -> Result<(), ApiError> {
    let spec = &mut svc["spec"];
    let kind = spec["type"].as_str().unwrap_or("ClusterIP").to_string();
    let (base, size) = cidr(service_cidr)
        .ok_or_else(|| ApiError::internal(format!("bad --service-cidr {service_cidr}")))?;
    if kind == "ExternalName" {
        if spec["clusterIP"].as_str().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid(
                "spec.clusterIP: Invalid value: may not be set for ExternalName services",
            ));
        }
    } else {
        match spec["clusterIP"].as_str().unwrap_or("") {
            "None" => {
                spec["clusterIPs"] = json!(["None"]);
            }
            "" => {
                let taken: HashSet<String> = used("~clusterip/")
                    .into_iter()
                    .map(|k| k["~clusterip/".len()..].to_string())
                    .collect();
                // .0 is the network, .1 is kept for the cluster's own API service.
                let free: Vec<u32> = (2..size - 1)
                    .map(|o| base + o)
                    .filter(|ip| !taken.contains(&Ipv4Addr::from(*ip).to_string()))
                    .collect();
                if free.is_empty() {
                    return Err(ApiError::internal(format!(
                        "no ClusterIP is left in {service_cidr}"
                    )));
                }
                let ip = Ipv4Addr::from(free[rand::random::<usize>() % free.len()]).to_string();
                spec["clusterIP"] = json!(ip);
                spec["clusterIPs"] = json!([ip]);
            }
            ip => {
                let a: Ipv4Addr = ip.parse().map_err(|_| ApiError::invalid(format!("spec.clusterIP: Invalid value: \"{ip}\": must be a valid IP address or None")))?;
                let a = u32::from(a);
                if a < base || a >= base + size {
                    return Err(ApiError::invalid(format!("spec.clusterIP: Invalid value: \"{ip}\": provided IP is not in the valid range ({service_cidr})")));
                }
                spec["clusterIPs"] = json!([ip]);
            }
        }
        spec["ipFamilies"] = json!(["IPv4"]);
        spec["ipFamilyPolicy"] = json!("SingleStack");
    }
    let wants_ports = kind == "NodePort"
        || (kind == "LoadBalancer" && spec["allocateLoadBalancerNodePorts"] != false);
    if let Some(list) = spec["ports"].as_array_mut() {
        for p in list.iter_mut() {
            match p["nodePort"].as_i64() {
                Some(n) if n != 0 => {
                    if !wants_ports && kind != "LoadBalancer" {
                        return Err(ApiError::invalid(format!("spec.ports.nodePort: Forbidden: may not be used when `type` is '{kind}'")));
                    }
                    if n < ports.0 as i64 || n > ports.1 as i64 {
                        return Err(ApiError::invalid(format!("spec.ports.nodePort: Invalid value: {n}: provided port is not in the valid range. The range of valid ports is {}-{}", ports.0, ports.1)));
                    }
                }
                _ if wants_ports => {
                    let proto = p["protocol"].as_str().unwrap_or("TCP").to_string();
                    let prefix = format!("~nodeport/{proto}/");
                    let taken: HashSet<String> = used(&prefix)
                        .into_iter()
                        .map(|k| k[prefix.len()..].to_string())
                        .collect();
                    let free: Vec<u16> = (ports.0..=ports.1)
                        .filter(|n| !taken.contains(&n.to_string()))
                        .collect();
                    if free.is_empty() {
                        return Err(ApiError::internal("no NodePort is left"));
                    }
                    p["nodePort"] = json!(free[rand::random::<usize>() % free.len()]);
                }
                _ => {}
            }
        }
        // Two ports of one Service may not share a NodePort either.
        let mut seen = HashSet::new();
        for p in list.iter() {
            if let Some(n) = p["nodePort"].as_i64() {
                if !seen.insert((p["protocol"].as_str().unwrap_or("TCP").to_string(), n)) {
                    return Err(ApiError::invalid(format!(
                        "spec.ports.nodePort: Duplicate value: {n}"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Was the allocation that failed one this master chose (then choose again), or
/// one the user asked for (then the error stands)?
pub fn was_chosen(requested: &Value, e: &ApiError) -> bool {
    let asked_ip = requested["spec"]["clusterIP"]
        .as_str()
        .is_some_and(|s| !s.is_empty());
    let asked_port = requested["spec"]["ports"].as_array().is_some_and(|ps| {
        ps.iter()
            .any(|p| p["nodePort"].as_i64().is_some_and(|n| n != 0))
    });
    if e.message.contains("provided IP") {
        !asked_ip
    } else {
        !asked_port
    }
}

/// On update: keep allocated fields the request left out; refuse to change the ClusterIP.
pub fn keep(new: &mut Value, cur: &Value) -> Result<(), ApiError> {
    let spec = &mut new["spec"];
    let was = cur["spec"]["clusterIP"].as_str().unwrap_or("");
    match spec["clusterIP"].as_str().unwrap_or("") {
        "" => {
            spec["clusterIP"] = cur["spec"]["clusterIP"].clone();
            spec["clusterIPs"] = cur["spec"]["clusterIPs"].clone();
        }
        ip if ip != was && !was.is_empty() => {
            return Err(ApiError::invalid(format!(
                "spec.clusterIP: Invalid value: \"{ip}\": field is immutable"
            )));
        }
        _ => {}
    }
    if let (Some(list), Some(old)) = (
        spec["ports"].as_array_mut(),
        cur["spec"]["ports"].as_array(),
    ) {
        for p in list.iter_mut() {
            if p["nodePort"].is_null() {
                if let Some(o) = old
                    .iter()
                    .find(|o| o["port"] == p["port"] && o["protocol"] == p["protocol"])
                {
                    p["nodePort"] = o["nodePort"].clone();
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assigns_free_ips_and_ports() {
        let used = |p: &str| -> Vec<String> {
            if p == "~clusterip/" {
                (2..14)
                    .map(|i| format!("~clusterip/198.19.0.{i}"))
                    .collect()
            } else {
                (30000..30003).map(|n| format!("{p}{n}")).collect()
            }
        };
        let mut s =
            json!({"spec": {"type": "NodePort", "ports": [{"port": 80, "protocol": "TCP"}]}});
        assign(&mut s, "198.19.0.0/28", (30000, 30003), &used).unwrap();
        assert_eq!(s["spec"]["clusterIP"], "198.19.0.14", "the only free one");
        assert_eq!(s["spec"]["ports"][0]["nodePort"], 30003);
        let mut h = json!({"spec": {"clusterIP": "None", "ports": []}});
        assign(&mut h, "198.19.0.0/28", (30000, 30003), &used).unwrap();
        assert_eq!(h["spec"]["clusterIPs"], json!(["None"]));
        let mut bad = json!({"spec": {"clusterIP": "198.18.5.1"}});
        assert!(assign(&mut bad, "198.19.0.0/28", (30000, 30003), &used)
            .unwrap_err()
            .message
            .contains("valid range"));
    }
}
