//! From Ingress objects (with their IngressClass, Services and
//! EndpointSlices) to a routing table, and the lookup of a request in it:
//! pure functions, no I/O.
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Annotation marking the IngressClass used by Ingresses that name none.
pub const DEFAULT_CLASS_ANNOTATION: &str = "ingressclass.kubernetes.io/is-default-class";
/// The older way to pick a class, still common in manifests.
pub const CLASS_ANNOTATION: &str = "kubernetes.io/ingress.class";

/// The objects a table is built from, looked up by `namespace/name`.
pub trait Objects {
    fn service(&self, key: &str) -> Option<Arc<Value>>;
    /// The EndpointSlices of a Service (label `kubernetes.io/service-name`).
    fn slices(&self, key: &str) -> Vec<Arc<Value>>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    Exact,
    /// Prefix and ImplementationSpecific: matched element by element.
    Prefix,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    LeastConn,
}

/// What an Ingress's annotations ask of its routes. Each annotation is read
/// as `orc.dev/NAME`, else as ingress-nginx's `nginx.ingress.kubernetes.io/NAME`,
/// so manifests written for ingress-nginx keep their meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// `load-balance`: `round_robin` (default) or `least_conn`.
    pub balance: Balance,
    /// `proxy-connect-timeout`, seconds (default 5).
    pub connect_timeout: Duration,
    /// `proxy-read-timeout`, seconds (default 60).
    pub read_timeout: Duration,
    /// `proxy-send-timeout`, seconds (default 60).
    pub send_timeout: Duration,
    /// `ssl-redirect` or `force-ssl-redirect`: plain HTTP gets a 308 to https.
    pub ssl_redirect: bool,
    /// `upstream-eject-seconds`: how long an endpoint that refused a
    /// connection gets no requests (default 10).
    pub eject: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            balance: Balance::RoundRobin,
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
            ssl_redirect: false,
            eject: Duration::from_secs(10),
        }
    }
}

/// One port of one Service, with its endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `namespace/name`.
    pub service: String,
    /// The Ingress's port: a number or a name.
    pub port: String,
    /// Ready endpoints (serving terminating ones when none is ready).
    pub endpoints: Vec<SocketAddr>,
}

impl Target {
    /// Identity of the pool of connections and balancing state.
    pub fn key(&self) -> String {
        format!("{}:{}", self.service, self.port)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `namespace/ingress`: the metrics label.
    pub ingress: String,
    /// The rule's host: empty for every host, `*.example.test` for a wildcard.
    pub host: String,
    /// Empty for a default backend.
    pub path: String,
    pub kind: PathKind,
    pub target: Target,
    pub policy: Policy,
}

impl Route {
    fn matches(&self, path: &str) -> bool {
        match self.kind {
            PathKind::Exact => self.path == path,
            PathKind::Prefix => prefix_matches(&self.path, path),
        }
    }
}

/// Prefix matching by path elements: `/foo` matches `/foo`, `/foo/` and
/// `/foo/bar`, not `/foobar`; a trailing `/` in the rule is ignored.
pub fn prefix_matches(rule: &str, path: &str) -> bool {
    let r = rule.trim_end_matches('/');
    if r.is_empty() {
        return true;
    }
    path == r || (path.starts_with(r) && path.as_bytes().get(r.len()) == Some(&b'/'))
}

/// A certificate a host is served with: the Secret `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsHost {
    /// Empty: the certificate for clients that send no known name.
    pub host: String,
    pub secret: String,
}

/// The routes of every Ingress of one class.
#[derive(Debug, Default)]
pub struct Table {
    pub routes: Vec<Route>,
    exact: HashMap<String, Vec<usize>>,
    /// By the part after `*.`.
    wildcard: HashMap<String, Vec<usize>>,
    any: Vec<usize>,
    default: Option<usize>,
    pub tls: Vec<TlsHost>,
    /// Keys (`namespace/name`) of the Ingresses this table serves.
    pub ingresses: Vec<String>,
    /// What was wrong in the objects, each naming the object and field.
    pub warnings: Vec<String>,
}

/// The host of a request: the Host header (or HTTP/2 authority) without its
/// port, lower case.
pub fn request_host(host: &str) -> String {
    let h = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
    };
    h.trim_end_matches('.').to_ascii_lowercase()
}

impl Table {
    /// The route for a request: rules of the exact host, then of a matching
    /// wildcard, then of rules without host, each group longest path first;
    /// then the default backend.
    pub fn lookup(&self, host: &str, path: &str) -> Option<(usize, &Route)> {
        let wild = host
            .split_once('.')
            .and_then(|(_, rest)| self.wildcard.get(rest));
        let groups = [self.exact.get(host), wild, Some(&self.any)];
        for g in groups.into_iter().flatten() {
            if let Some(&i) = g.iter().find(|&&i| self.routes[i].matches(path)) {
                return Some((i, &self.routes[i]));
            }
        }
        self.default.map(|i| (i, &self.routes[i]))
    }
}

/// The objects besides Ingresses and IngressClasses a table was built from:
/// a change to any other cannot change it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct References {
    /// Services, `namespace/name`.
    pub services: HashSet<String>,
    /// TLS Secrets, `namespace/name`.
    pub secrets: HashSet<String>,
}

impl References {
    /// Whether a change to `resource`'s object `key` can change the table.
    /// `slice_service` is the Service (`namespace/name`) of a changed
    /// EndpointSlice, None when it is gone (then it may have been ours).
    pub fn affected_by(&self, resource: &str, key: &str, slice_service: Option<&str>) -> bool {
        match resource {
            "services" => self.services.contains(key),
            "secrets" => self.secrets.contains(key),
            "endpointslices" => slice_service.is_none_or(|s| self.services.contains(s)),
            _ => true,
        }
    }
}

impl Table {
    pub fn references(&self) -> References {
        References {
            services: self
                .routes
                .iter()
                .map(|r| r.target.service.clone())
                .collect(),
            secrets: self.tls.iter().map(|t| t.secret.clone()).collect(),
        }
    }
}

/// Whether an Ingress belongs to `class`: by `spec.ingressClassName`, by the
/// old annotation, or by naming none when `class` is the default class.
pub fn ours(ing: &Value, class: &str, default_class: bool) -> bool {
    if let Some(c) = ing["spec"]["ingressClassName"].as_str() {
        return c == class;
    }
    if let Some(c) = ing["metadata"]["annotations"][CLASS_ANNOTATION].as_str() {
        return c == class;
    }
    default_class
}

/// Whether the IngressClass object is marked as the cluster's default.
pub fn is_default_class(ic: &Value) -> bool {
    ic["metadata"]["annotations"][DEFAULT_CLASS_ANNOTATION] == "true"
}

fn annotation<'a>(ing: &'a Value, name: &str) -> Option<(String, &'a str)> {
    let a = &ing["metadata"]["annotations"];
    ["orc.dev/", "nginx.ingress.kubernetes.io/"]
        .iter()
        .find_map(|p| {
            let k = format!("{p}{name}");
            a[&k].as_str().map(|v| (k, v))
        })
}

fn policy(ing: &Value, key: &str, warnings: &mut Vec<String>) -> Policy {
    let mut p = Policy::default();
    let mut secs = |name: &str, into: &mut Duration| {
        if let Some((k, v)) = annotation(ing, name) {
            match v.trim().trim_end_matches('s').parse::<u64>() {
                Ok(s) if s > 0 => *into = Duration::from_secs(s),
                _ => warnings.push(format!(
                    "ingress {key}: annotation {k}: {v:?} is not a positive number of seconds"
                )),
            }
        }
    };
    secs("proxy-connect-timeout", &mut p.connect_timeout);
    secs("proxy-read-timeout", &mut p.read_timeout);
    secs("proxy-send-timeout", &mut p.send_timeout);
    secs("upstream-eject-seconds", &mut p.eject);
    if let Some((k, v)) = annotation(ing, "load-balance") {
        match v {
            "round_robin" => p.balance = Balance::RoundRobin,
            "least_conn" => p.balance = Balance::LeastConn,
            _ => warnings.push(format!(
                "ingress {key}: annotation {k}: {v:?} is not round_robin or least_conn"
            )),
        }
    }
    p.ssl_redirect = ["ssl-redirect", "force-ssl-redirect"]
        .iter()
        .any(|n| annotation(ing, n).is_some_and(|(_, v)| v == "true"));
    p
}

/// The endpoints of a Service port named by an Ingress backend
/// (`service.port.number` or `service.port.name`).
fn target(ns: &str, backend: &Value, objs: &dyn Objects) -> Result<Target, String> {
    let svc = &backend["service"];
    let name = svc["name"]
        .as_str()
        .ok_or("backend.service.name is missing (resource backends are not supported)")?;
    let port = &svc["port"];
    let port_ref = match (port["number"].as_u64(), port["name"].as_str()) {
        (Some(n), _) => n.to_string(),
        (None, Some(n)) => n.to_string(),
        (None, None) => {
            return Err(format!(
                "backend {name}: service.port needs a number or a name"
            ))
        }
    };
    let key = format!("{ns}/{name}");
    let mut t = Target {
        service: key.clone(),
        port: port_ref.clone(),
        endpoints: Vec::new(),
    };
    let Some(s) = objs.service(&key) else {
        return Ok(t); // answers 503 until the Service exists
    };
    let sp = s["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| {
            p["protocol"].as_str().unwrap_or("TCP") == "TCP"
                && (p["port"].as_u64().map(|n| n.to_string()).as_deref() == Some(&port_ref)
                    || p["name"].as_str() == Some(&port_ref))
        });
    let Some(sp) = sp else {
        return Err(format!(
            "backend {name}: Service {key} has no TCP port {port_ref}"
        ));
    };
    let pname = sp["name"].as_str().unwrap_or("");
    let slices = objs.slices(&key);
    let refs: Vec<&Value> = slices.iter().map(|s| s.as_ref()).collect();
    t.endpoints = orc_proxy::model::ready_backends(&refs, pname, "tcp")
        .into_iter()
        .map(|b| SocketAddr::from((b.ip, b.port)))
        .collect();
    Ok(t)
}

fn creation_order(a: &Value, b: &Value) -> std::cmp::Ordering {
    let k = |o: &Value| {
        (
            o["metadata"]["creationTimestamp"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            o["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            o["metadata"]["name"].as_str().unwrap_or("").to_string(),
        )
    };
    k(a).cmp(&k(b))
}

/// Build the table of the Ingresses of `class`. Where two Ingresses claim
/// the same host and path, the older one keeps it.
pub fn build(
    class: &str,
    default_class: bool,
    ingresses: &[Arc<Value>],
    objs: &dyn Objects,
) -> Table {
    let mut ings: Vec<&Value> = ingresses
        .iter()
        .map(|i| i.as_ref())
        .filter(|i| ours(i, class, default_class))
        .filter(|i| i["metadata"]["deletionTimestamp"].is_null())
        .collect();
    ings.sort_by(|a, b| creation_order(a, b));
    let mut t = Table::default();
    let mut seen = std::collections::HashSet::new();
    for ing in ings {
        let ns = ing["metadata"]["namespace"].as_str().unwrap_or("default");
        let key = format!("{ns}/{}", ing["metadata"]["name"].as_str().unwrap_or(""));
        t.ingresses.push(key.clone());
        let pol = policy(ing, &key, &mut t.warnings);
        let spec = &ing["spec"];
        if !spec["defaultBackend"].is_null() && t.default.is_none() {
            match target(ns, &spec["defaultBackend"], objs) {
                Ok(target) => {
                    t.default = Some(t.routes.len());
                    t.routes.push(Route {
                        ingress: key.clone(),
                        host: String::new(),
                        path: String::new(),
                        kind: PathKind::Prefix,
                        target,
                        policy: pol.clone(),
                    });
                }
                Err(e) => t
                    .warnings
                    .push(format!("ingress {key}: spec.defaultBackend: {e}")),
            }
        }
        for (ri, rule) in spec["rules"].as_array().into_iter().flatten().enumerate() {
            let host = rule["host"].as_str().unwrap_or("").to_ascii_lowercase();
            for (pi, p) in rule["http"]["paths"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                let field = format!("spec.rules[{ri}].http.paths[{pi}]");
                let path = p["path"].as_str().unwrap_or("/").to_string();
                let kind = match p["pathType"].as_str().unwrap_or("ImplementationSpecific") {
                    "Exact" => PathKind::Exact,
                    "Prefix" | "ImplementationSpecific" => PathKind::Prefix,
                    other => {
                        t.warnings.push(format!(
                            "ingress {key}: {field}.pathType: {other:?} is not Exact, Prefix or ImplementationSpecific"
                        ));
                        continue;
                    }
                };
                if !path.starts_with('/') {
                    t.warnings.push(format!(
                        "ingress {key}: {field}.path: {path:?} must start with /"
                    ));
                    continue;
                }
                if !seen.insert((host.clone(), path.clone(), kind == PathKind::Exact)) {
                    t.warnings.push(format!(
                        "ingress {key}: {field}: host {host:?} path {path:?} is already routed by an older Ingress"
                    ));
                    continue;
                }
                match target(ns, &p["backend"], objs) {
                    Ok(target) => t.routes.push(Route {
                        ingress: key.clone(),
                        host: host.clone(),
                        path,
                        kind,
                        target,
                        policy: pol.clone(),
                    }),
                    Err(e) => t
                        .warnings
                        .push(format!("ingress {key}: {field}.backend: {e}")),
                }
            }
        }
        for (i, tls) in spec["tls"].as_array().into_iter().flatten().enumerate() {
            let Some(secret) = tls["secretName"].as_str() else {
                t.warnings.push(format!(
                    "ingress {key}: spec.tls[{i}].secretName is missing"
                ));
                continue;
            };
            let hosts: Vec<String> = tls["hosts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|h| h.as_str().map(|h| h.to_ascii_lowercase()))
                .collect();
            let hosts = if hosts.is_empty() {
                vec![String::new()]
            } else {
                hosts
            };
            for host in hosts {
                if !t.tls.iter().any(|x| x.host == host) {
                    t.tls.push(TlsHost {
                        host,
                        secret: format!("{ns}/{secret}"),
                    });
                }
            }
        }
    }
    // Index by host, longest path first, Exact before Prefix at one length.
    let mut order: Vec<usize> = (0..t.routes.len())
        .filter(|i| Some(*i) != t.default)
        .collect();
    order.sort_by_key(|&i| {
        let r = &t.routes[i];
        (
            std::cmp::Reverse(r.path.trim_end_matches('/').len()),
            r.kind != PathKind::Exact,
        )
    });
    for i in order {
        let host = t.routes[i].host.clone();
        if host.is_empty() {
            t.any.push(i);
        } else if let Some(rest) = host.strip_prefix("*.") {
            t.wildcard.entry(rest.to_string()).or_default().push(i);
        } else {
            t.exact.entry(host).or_default().push(i);
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::BTreeMap;

    #[derive(Default)]
    struct Objs {
        services: BTreeMap<String, Arc<Value>>,
        slices: BTreeMap<String, Vec<Arc<Value>>>,
    }

    impl Objects for Objs {
        fn service(&self, key: &str) -> Option<Arc<Value>> {
            self.services.get(key).cloned()
        }
        fn slices(&self, key: &str) -> Vec<Arc<Value>> {
            self.slices.get(key).cloned().unwrap_or_default()
        }
    }

    fn objs() -> Objs {
        let mut o = Objs::default();
        for (name, ip) in [
            ("foo", "198.18.0.2"),
            ("bar", "198.18.0.3"),
            ("dflt", "198.18.0.4"),
        ] {
            o.services.insert(
                format!("default/{name}"),
                Arc::new(json!({"metadata": {"name": name, "namespace": "default"},
                    "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})),
            );
            o.slices.insert(
                format!("default/{name}"),
                vec![Arc::new(json!({"addressType": "IPv4",
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                    "endpoints": [{"addresses": [ip], "conditions": {"ready": true}},
                                  {"addresses": ["198.18.9.9"], "conditions": {"ready": false}}]}))],
            );
        }
        o
    }

    fn backend(name: &str) -> Value {
        json!({"service": {"name": name, "port": {"number": 80}}})
    }

    fn ingress(name: &str, created: &str, spec: Value) -> Arc<Value> {
        Arc::new(json!({"metadata": {"name": name, "namespace": "default",
            "creationTimestamp": created}, "spec": spec}))
    }

    fn acceptance() -> Table {
        let ing = ingress(
            "web",
            "2026-01-01T00:00:00Z",
            json!({"ingressClassName": "orc", "rules": [
                {"host": "foo.example.test", "http": {"paths": [
                    {"path": "/", "pathType": "Prefix", "backend": backend("foo")}]}},
                {"host": "example.test", "http": {"paths": [
                    {"path": "/bar", "pathType": "Prefix", "backend": backend("bar")},
                    {"path": "/exact", "pathType": "Exact", "backend": backend("foo")}]}}]}),
        );
        build("orc", false, &[ing], &objs())
    }

    fn service_of(t: &Table, host: &str, path: &str) -> Option<String> {
        t.lookup(host, path).map(|(_, r)| r.target.service.clone())
    }

    #[test]
    fn hosts_and_paths_route_to_their_services() {
        let t = acceptance();
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
        let svc = |h, p| service_of(&t, h, p);
        assert_eq!(svc("foo.example.test", "/").as_deref(), Some("default/foo"));
        assert_eq!(
            svc("foo.example.test", "/any/thing").as_deref(),
            Some("default/foo")
        );
        assert_eq!(svc("example.test", "/bar").as_deref(), Some("default/bar"));
        assert_eq!(svc("example.test", "/bar/").as_deref(), Some("default/bar"));
        assert_eq!(
            svc("example.test", "/bar/x").as_deref(),
            Some("default/bar")
        );
        assert_eq!(svc("example.test", "/barx"), None);
        assert_eq!(
            svc("example.test", "/exact").as_deref(),
            Some("default/foo")
        );
        assert_eq!(svc("example.test", "/exact/"), None);
        assert_eq!(svc("example.test", "/"), None);
        assert_eq!(svc("other.test", "/bar"), None);
        let (_, r) = t.lookup("example.test", "/bar").unwrap();
        assert_eq!(r.target.endpoints, vec!["198.18.0.3:8080".parse().unwrap()]);
    }

    #[test]
    fn longest_path_wins_and_exact_beats_prefix() {
        let ing = ingress(
            "a",
            "2026-01-01T00:00:00Z",
            json!({"ingressClassName": "orc", "rules": [{"host": "h.test", "http": {"paths": [
                {"path": "/", "pathType": "Prefix", "backend": backend("dflt")},
                {"path": "/api", "pathType": "Prefix", "backend": backend("foo")},
                {"path": "/api/v2", "pathType": "ImplementationSpecific", "backend": backend("bar")},
                {"path": "/api", "pathType": "Exact", "backend": backend("bar")}]}}]}),
        );
        let t = build("orc", false, &[ing], &objs());
        let svc = |p| service_of(&t, "h.test", p);
        assert_eq!(svc("/api/v2/x").as_deref(), Some("default/bar"));
        assert_eq!(svc("/api").as_deref(), Some("default/bar"));
        assert_eq!(svc("/api/v1").as_deref(), Some("default/foo"));
        assert_eq!(svc("/apix").as_deref(), Some("default/dflt"));
    }

    #[test]
    fn wildcards_match_one_label_and_default_backend_catches_the_rest() {
        let ing = ingress(
            "a",
            "2026-01-01T00:00:00Z",
            json!({"ingressClassName": "orc", "defaultBackend": backend("dflt"), "rules": [
                {"host": "*.example.test", "http": {"paths": [
                    {"path": "/", "pathType": "Prefix", "backend": backend("foo")}]}},
                {"host": "www.example.test", "http": {"paths": [
                    {"path": "/www", "pathType": "Prefix", "backend": backend("bar")}]}}]}),
        );
        let t = build("orc", false, &[ing], &objs());
        let svc = |h, p| service_of(&t, h, p);
        assert_eq!(svc("a.example.test", "/").as_deref(), Some("default/foo"));
        assert_eq!(
            svc("a.b.example.test", "/").as_deref(),
            Some("default/dflt")
        );
        assert_eq!(svc("example.test", "/").as_deref(), Some("default/dflt"));
        assert_eq!(
            svc("www.example.test", "/www").as_deref(),
            Some("default/bar")
        );
        // An exact host without the path falls through to the wildcard.
        assert_eq!(
            svc("www.example.test", "/other").as_deref(),
            Some("default/foo")
        );
    }

    #[test]
    fn class_selection() {
        let named = |c: &str| json!({"spec": {"ingressClassName": c}});
        assert!(ours(&named("orc"), "orc", false));
        assert!(!ours(&named("nginx"), "orc", true));
        let annotated = json!({"metadata": {"annotations": {CLASS_ANNOTATION: "orc"}}, "spec": {}});
        assert!(ours(&annotated, "orc", false));
        let none = json!({"spec": {}});
        assert!(ours(&none, "orc", true));
        assert!(!ours(&none, "orc", false));
        let ic = json!({"metadata": {"annotations": {DEFAULT_CLASS_ANNOTATION: "true"}}});
        assert!(is_default_class(&ic));
        assert!(!is_default_class(&json!({"metadata": {}})));
        // Another class's Ingress routes nothing here.
        let other = ingress(
            "o",
            "x",
            json!({"ingressClassName": "nginx", "rules": [
            {"http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": backend("foo")}]}}]}),
        );
        assert!(build("orc", true, &[other], &objs())
            .lookup("x", "/")
            .is_none());
    }

    #[test]
    fn port_by_name_and_older_ingress_keeps_a_path() {
        let by_name = json!({"service": {"name": "foo", "port": {"name": "http"}}});
        let old = ingress(
            "old",
            "2026-01-01T00:00:00Z",
            json!({"ingressClassName": "orc", "rules": [
            {"host": "h.test", "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": by_name}]}}]}),
        );
        let new = ingress(
            "new",
            "2026-02-01T00:00:00Z",
            json!({"ingressClassName": "orc", "rules": [
            {"host": "h.test", "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": backend("bar")}]}}]}),
        );
        let t = build("orc", false, &[new, old], &objs());
        let (_, r) = t.lookup("h.test", "/").unwrap();
        assert_eq!(r.ingress, "default/old");
        assert_eq!(r.target.endpoints, vec!["198.18.0.2:8080".parse().unwrap()]);
        assert_eq!(t.warnings.len(), 1, "{:?}", t.warnings);
        assert!(t.warnings[0].contains("default/new") && t.warnings[0].contains("spec.rules[0]"));
    }

    #[test]
    fn bad_input_is_named_and_skipped() {
        let ing = ingress(
            "bad",
            "t",
            json!({"ingressClassName": "orc",
            "rules": [{"host": "h.test", "http": {"paths": [
                {"path": "/a", "pathType": "Regex", "backend": backend("foo")},
                {"path": "b", "pathType": "Prefix", "backend": backend("foo")},
                {"path": "/c", "pathType": "Prefix", "backend": {"service": {"name": "foo", "port": {"number": 81}}}},
                {"path": "/d", "pathType": "Prefix", "backend": backend("missing")}]}}]}),
        );
        let mut ing = (*ing).clone();
        ing["metadata"]["annotations"] = json!({"orc.dev/proxy-read-timeout": "soon",
            "nginx.ingress.kubernetes.io/load-balance": "ewma"});
        let t = build("orc", false, &[Arc::new(ing)], &objs());
        let w = t.warnings.join("\n");
        for needle in [
            "pathType: \"Regex\"",
            "paths[1].path",
            "no TCP port 81",
            "orc.dev/proxy-read-timeout",
            "load-balance",
        ] {
            assert!(w.contains(needle), "{needle} not in {w}");
        }
        // A Service that does not exist yet: routed, with no endpoints.
        let (_, r) = t.lookup("h.test", "/d").unwrap();
        assert!(r.target.endpoints.is_empty());
        assert!(t.lookup("h.test", "/a").is_none());
    }

    #[test]
    fn annotations_and_tls_hosts() {
        let mut ing = (*ingress("a", "t", json!({"ingressClassName": "orc",
            "tls": [{"hosts": ["A.test", "b.test"], "secretName": "ab"}, {"secretName": "fallback"}],
            "rules": [{"http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": backend("foo")}]}}]})))
        .clone();
        ing["metadata"]["annotations"] = json!({"orc.dev/load-balance": "least_conn",
            "nginx.ingress.kubernetes.io/proxy-connect-timeout": "2",
            "nginx.ingress.kubernetes.io/ssl-redirect": "true"});
        let t = build("orc", false, &[Arc::new(ing)], &objs());
        let (_, r) = t.lookup("whatever", "/x").unwrap();
        assert_eq!(r.policy.balance, Balance::LeastConn);
        assert_eq!(r.policy.connect_timeout, Duration::from_secs(2));
        assert!(r.policy.ssl_redirect);
        let hosts: Vec<(&str, &str)> = t
            .tls
            .iter()
            .map(|h| (h.host.as_str(), h.secret.as_str()))
            .collect();
        assert_eq!(
            hosts,
            vec![
                ("a.test", "default/ab"),
                ("b.test", "default/ab"),
                ("", "default/fallback")
            ]
        );
    }

    #[test]
    fn only_referenced_objects_call_for_a_rebuild() {
        let mut ing = (*ingress("a", "t", json!({"ingressClassName": "orc",
            "tls": [{"hosts": ["a.test"], "secretName": "ab"}],
            "defaultBackend": backend("dflt"),
            "rules": [{"http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": backend("foo")}]}}]})))
        .clone();
        ing["metadata"]["namespace"] = json!("default");
        let r = build("orc", false, &[Arc::new(ing)], &objs()).references();
        assert!(r.affected_by("services", "default/foo", None));
        assert!(r.affected_by("services", "default/dflt", None));
        assert!(!r.affected_by("services", "default/bar", None));
        assert!(r.affected_by("secrets", "default/ab", None));
        assert!(!r.affected_by("secrets", "default/other", None));
        assert!(r.affected_by("endpointslices", "default/foo-x", Some("default/foo")));
        assert!(!r.affected_by("endpointslices", "default/bar-x", Some("default/bar")));
        assert!(r.affected_by("endpointslices", "default/gone", None));
        assert!(r.affected_by("ingresses", "other/any", None));
        assert!(r.affected_by("ingressclasses", "/orc", None));
    }

    #[test]
    fn request_hosts() {
        assert_eq!(request_host("Example.TEST:8443"), "example.test");
        assert_eq!(request_host("example.test."), "example.test");
        assert_eq!(request_host("[::1]:80"), "::1");
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/foo/", "/foo"));
        assert!(!prefix_matches("/foo", "/foobar"));
    }
}
