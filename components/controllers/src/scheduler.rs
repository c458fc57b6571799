//! The scheduler: unbound pods are filtered against the nodes (resources,
//! nodeSelector, required node affinity, taints and tolerations, anti-affinity
//! on the hostname, unschedulable nodes, host ports, readiness), the survivors
//! scored (least allocated, preferred node affinity, spreading an owner's pods),
//! and the pod bound with a resourceVersion precondition. A batch of pods is
//! decided in order against one view, then bound together. As in
//! kube-scheduler, in a large cluster the search stops once enough nodes fit
//! (see [`nodes_to_find`]) and the next one starts where it stopped.
use crate::runner::{Ctx, Outcome, Reconciler};
use crate::store::Change;
use crate::util::PathExt;
use crate::util::{self, quantity};
use futures::future::BoxFuture;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const HOSTNAME: &str = "kubernetes.io/hostname";

/// What the scheduler reads of a node object, built once per version of it.
#[derive(Debug)]
pub struct NodeInfo {
    pub node: Arc<Value>,
    pub name: Arc<str>,
    pub labels: BTreeMap<String, String>,
    pub cpu: i64,
    pub mem: i64,
    pub max_pods: i64,
    pub ready: bool,
    pub unschedulable: bool,
    /// Its NoSchedule and NoExecute taints.
    pub taints: Vec<Value>,
}

/// A node and what is already bound to it.
#[derive(Debug, Clone)]
pub struct NodeState {
    pub info: Arc<NodeInfo>,
    pub used_cpu: i64,
    pub used_mem: i64,
    pub pods: Vec<Arc<Value>>,
    /// Host ports taken, with how many pods take each.
    pub ports: HashMap<(String, i64), u32>,
    /// Pods on it per controller uid (for spreading).
    pub owners: HashMap<Arc<str>, i64>,
}

impl std::ops::Deref for NodeState {
    type Target = NodeInfo;
    fn deref(&self) -> &NodeInfo {
        &self.info
    }
}

impl NodeInfo {
    pub fn new(node: Arc<Value>) -> Self {
        let a = if node["status"]["allocatable"].is_object() {
            &node["status"]["allocatable"]
        } else {
            &node["status"]["capacity"]
        };
        let taints = node["spec"]["taints"]
            .as_array()
            .map(|t| {
                t.iter()
                    .filter(|t| t["effect"] == "NoSchedule" || t["effect"] == "NoExecute")
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        NodeInfo {
            name: util::name(&node).into(),
            labels: util::labels(&node),
            cpu: quantity(&a["cpu"], true),
            mem: quantity(&a["memory"], false),
            max_pods: quantity(&a["pods"], false),
            ready: node_ready(&node),
            unschedulable: node["spec"]["unschedulable"] == true,
            taints,
            node,
        }
    }
}

impl NodeState {
    pub fn new(node: Arc<Value>) -> Self {
        Self::with_info(Arc::new(NodeInfo::new(node)))
    }
    fn with_info(info: Arc<NodeInfo>) -> Self {
        NodeState {
            info,
            used_cpu: 0,
            used_mem: 0,
            pods: Vec::new(),
            ports: HashMap::new(),
            owners: HashMap::new(),
        }
    }
    pub fn add(&mut self, pod: Arc<Value>) {
        let u = Usage::of(&pod);
        self.add_usage(pod, &u);
    }
    fn add_usage(&mut self, pod: Arc<Value>, u: &Usage) {
        self.used_cpu += u.cpu;
        self.used_mem += u.mem;
        for hp in &u.ports {
            *self.ports.entry(hp.clone()).or_default() += 1;
        }
        if let Some(o) = &u.owner {
            *self.owners.entry(o.clone()).or_default() += 1;
        }
        self.pods.push(pod);
    }
    /// Undo `add_usage(pod, u)`.
    fn remove_usage(&mut self, pod: &Arc<Value>, u: &Usage) {
        self.used_cpu -= u.cpu;
        self.used_mem -= u.mem;
        for hp in &u.ports {
            if let Some(c) = self.ports.get_mut(hp) {
                *c -= 1;
                if *c == 0 {
                    self.ports.remove(hp);
                }
            }
        }
        if let Some(o) = &u.owner {
            if let Some(c) = self.owners.get_mut(o) {
                *c -= 1;
                if *c <= 0 {
                    self.owners.remove(o);
                }
            }
        }
        if let Some(i) = self.pods.iter().position(|p| Arc::ptr_eq(p, pod)) {
            self.pods.swap_remove(i);
        }
    }
}

/// What the scheduler needs of a pod, read once per decision.
pub struct PodInfo<'a> {
    pub pod: &'a Value,
    pub cpu: i64,
    pub mem: i64,
    pub ports: Vec<(String, i64)>,
    pub owner: Option<&'a str>,
    pub tolerates_down: bool,
    pub tolerates_unschedulable: bool,
    pub tolerations: &'a [Value],
    pub node_selector: Option<&'a serde_json::Map<String, Value>>,
    pub required_terms: Option<&'a Vec<Value>>,
    pub preferred: Option<&'a Vec<Value>>,
    pub anti: Vec<&'a Value>,
}

impl<'a> PodInfo<'a> {
    pub fn new(p: &'a Value) -> Self {
        let (cpu, mem) = util::pod_requests(p);
        let aff = &p["spec"]["affinity"];
        PodInfo {
            pod: p,
            cpu,
            mem,
            ports: host_ports(p),
            owner: util::controller_uid(p),
            tolerates_down: tolerates_key(p, "node.kubernetes.io/not-ready")
                && tolerates_key(p, "node.kubernetes.io/unreachable"),
            tolerates_unschedulable: tolerates_key(p, "node.kubernetes.io/unschedulable"),
            tolerations: tolerations(p),
            node_selector: p["spec"]["nodeSelector"]
                .as_object()
                .filter(|m| !m.is_empty()),
            required_terms: aff["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                ["nodeSelectorTerms"]
                .as_array(),
            preferred: aff["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
                .as_array()
                .filter(|a| !a.is_empty()),
            anti: aff["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                .as_array()
                .map(|a| a.iter().filter(|t| t["topologyKey"] == HOSTNAME).collect())
                .unwrap_or_default(),
        }
    }
}

fn host_ports(p: &Value) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for c in p["spec"]["containers"].as_array().into_iter().flatten() {
        for port in c["ports"].as_array().into_iter().flatten() {
            if let Some(h) = port["hostPort"].as_i64().filter(|h| *h > 0) {
                out.push((port["protocol"].as_str().unwrap_or("TCP").to_string(), h));
            }
        }
    }
    out
}

/// Whether one toleration tolerates one taint.
pub fn tolerates(t: &Value, taint: &Value) -> bool {
    let effect_ok = t["effect"]
        .as_str()
        .is_none_or(|e| e.is_empty() || Some(e) == taint["effect"].as_str());
    if !effect_ok {
        return false;
    }
    let key = t["key"].as_str().unwrap_or("");
    match t["operator"].as_str().unwrap_or("Equal") {
        "Exists" => key.is_empty() || Some(key) == taint["key"].as_str(),
        _ => {
            Some(key) == taint["key"].as_str()
                && t["value"].as_str().unwrap_or("") == taint["value"].as_str().unwrap_or("")
        }
    }
}

pub fn tolerations(p: &Value) -> &[Value] {
    p["spec"]["tolerations"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// The taint of `effect` on a node that the pod does not tolerate, if any.
pub fn untolerated<'a>(p: &Value, node: &'a Value, effects: &[&str]) -> Option<&'a Value> {
    node["spec"]["taints"].as_array()?.iter().find(|taint| {
        effects.iter().any(|e| taint["effect"] == *e)
            && !tolerations(p).iter().any(|t| tolerates(t, taint))
    })
}

fn expr_matches(e: &Value, value: Option<&str>) -> bool {
    let values: Vec<&str> = e["values"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    match e["operator"].as_str().unwrap_or("") {
        "In" => value.is_some_and(|v| values.contains(&v)),
        "NotIn" => value.is_none_or(|v| !values.contains(&v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(w)) = (
                value.and_then(|v| v.parse::<i64>().ok()),
                values.first().and_then(|w| w.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if e["operator"] == "Gt" {
                v > w
            } else {
                v < w
            }
        }
        _ => false,
    }
}

/// One nodeSelectorTerm: every expression on labels and fields holds.
pub fn term_matches(term: &Value, node: &NodeState) -> bool {
    let exprs = term["matchExpressions"].as_array().into_iter().flatten();
    let fields = term["matchFields"].as_array().into_iter().flatten();
    let any = term["matchExpressions"]
        .as_array()
        .is_some_and(|a| !a.is_empty())
        || term["matchFields"]
            .as_array()
            .is_some_and(|a| !a.is_empty());
    any && exprs.into_iter().all(|e| {
        expr_matches(
            e,
            e["key"]
                .as_str()
                .and_then(|k| node.labels.get(k))
                .map(String::as_str),
        )
    }) && fields
        .into_iter()
        .all(|e| expr_matches(e, (e["key"] == "metadata.name").then_some(&*node.name)))
}

/// nodeSelector and required node affinity.
pub fn node_selected(p: &Value, node: &NodeState) -> bool {
    if let Some(sel) = p["spec"]["nodeSelector"].as_object() {
        if !sel
            .iter()
            .all(|(k, v)| node.labels.get(k).map(String::as_str) == v.as_str())
        {
            return false;
        }
    }
    match p
        .get_path(&[
            "spec",
            "affinity",
            "nodeAffinity",
            "requiredDuringSchedulingIgnoredDuringExecution",
            "nodeSelectorTerms",
        ])
        .and_then(Value::as_array)
    {
        Some(terms) => terms.iter().any(|t| term_matches(t, node)),
        None => true,
    }
}

fn node_ready(node: &Value) -> bool {
    util::condition_true(node, "Ready")
}

fn tolerates_key(p: &Value, key: &str) -> bool {
    let taint = json!({"key": key, "effect": "NoSchedule"});
    tolerations(p).iter().any(|t| tolerates(t, &taint))
}

/// Why `node` cannot take `p`, or None if it can. `volumes` are the node
/// affinities of the persistent volumes the pod's claims are bound to.
pub fn unfit(p: &Value, node: &NodeState, volumes: &[Value]) -> Option<String> {
    unfit_info(&PodInfo::new(p), node, volumes)
}

fn unfit_info(p: &PodInfo, node: &NodeState, volumes: &[Value]) -> Option<String> {
    if !node.ready && !p.tolerates_down {
        return Some("node(s) were not ready".into());
    }
    if node.unschedulable && !p.tolerates_unschedulable {
        return Some("node(s) were unschedulable".into());
    }
    if let Some(t) = node
        .taints
        .iter()
        .find(|taint| !p.tolerations.iter().any(|t| tolerates(t, taint)))
    {
        return Some(format!(
            "node(s) had untolerated taint {{{}: {}}}",
            t["key"].as_str().unwrap_or(""),
            t["value"].as_str().unwrap_or("")
        ));
    }
    let selected = p.node_selector.is_none_or(|sel| {
        sel.iter()
            .all(|(k, v)| node.labels.get(k).map(String::as_str) == v.as_str())
    }) && p
        .required_terms
        .is_none_or(|terms| terms.iter().any(|t| term_matches(t, node)));
    if !selected {
        return Some("node(s) didn't match Pod's node affinity/selector".into());
    }
    if volumes.iter().any(|terms| {
        !terms
            .as_array()
            .is_some_and(|t| t.iter().any(|t| term_matches(t, node)))
    }) {
        return Some("node(s) had volume node affinity conflict".into());
    }
    if node.pods.len() as i64 + 1 > node.max_pods {
        return Some("Too many pods".into());
    }
    if p.cpu > 0 && node.used_cpu + p.cpu > node.cpu {
        return Some("Insufficient cpu".into());
    }
    if p.mem > 0 && node.used_mem + p.mem > node.mem {
        return Some("Insufficient memory".into());
    }
    if p.ports.iter().any(|hp| node.ports.contains_key(hp)) {
        return Some("node(s) didn't have free ports for the requested pod ports".into());
    }
    if !p.anti.is_empty() {
        let ns = util::namespace(p.pod);
        for term in &p.anti {
            if node.pods.iter().any(|o| {
                util::namespace(o) == ns
                    && util::selector_matches(&term["labelSelector"], &util::labels(o))
            }) {
                return Some("node(s) didn't match pod anti-affinity rules".into());
            }
        }
    }
    None
}

/// Higher is better.
pub fn score(p: &Value, node: &NodeState) -> i64 {
    score_info(&PodInfo::new(p), node)
}

fn score_info(p: &PodInfo, node: &NodeState) -> i64 {
    let free = |cap: i64, used: i64, req: i64| -> f64 {
        if cap <= 0 {
            0.0
        } else {
            ((cap - used - req) as f64 / cap as f64).max(0.0)
        }
    };
    let least = ((free(node.cpu, node.used_cpu, p.cpu) + free(node.mem, node.used_mem, p.mem))
        * 50.0) as i64;
    let mut affinity = 0;
    for t in p.preferred.into_iter().flatten() {
        if term_matches(&t["preference"], node) {
            affinity += t["weight"].as_i64().unwrap_or(0);
        }
    }
    // Spread the pods of one owner: each sibling already there costs a lot.
    let siblings = p
        .owner
        .and_then(|u| node.owners.get(u).copied())
        .unwrap_or(0);
    least + affinity - 200 * siblings
}

/// How many feasible nodes to find before scoring stops, as kube-scheduler's
/// adaptive percentageOfNodesToScore: all of up to 100 nodes; of more,
/// 50 % less 1 % per 125 nodes (at least 5 %), and never fewer than 100.
pub fn nodes_to_find(total: usize) -> usize {
    if total <= 100 {
        return total;
    }
    let pct = (50 - (total / 125) as i64).max(5) as usize;
    (total * pct / 100).max(100)
}

/// Choose a node for `p`: the index into `nodes`, or the reason none fits.
pub fn choose(p: &Value, nodes: &[NodeState], volumes: &[Value]) -> Result<usize, String> {
    choose_from(p, nodes, volumes, 0).map(|(i, _)| i)
}

/// [`choose`], searching from node `start` round the list and scoring only
/// the first [`nodes_to_find`] nodes that fit. Also returns how many nodes
/// were looked at (the next search starts after them).
pub fn choose_from(
    p: &Value,
    nodes: &[NodeState],
    volumes: &[Value],
    start: usize,
) -> Result<(usize, usize), String> {
    let info = PodInfo::new(p);
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut best: Option<(i64, usize)> = None;
    let want = nodes_to_find(nodes.len());
    let (mut found, mut looked) = (0, 0);
    for k in 0..nodes.len() {
        let i = (start + k) % nodes.len();
        let n = &nodes[i];
        looked += 1;
        match unfit_info(&info, n, volumes) {
            Some(r) => *reasons.entry(r).or_default() += 1,
            None => {
                let s = score_info(&info, n);
                if best.is_none_or(|(b, _)| s > b) {
                    best = Some((s, i));
                }
                found += 1;
                if found >= want {
                    break;
                }
            }
        }
    }
    if let Some((_, i)) = best {
        return Ok((i, looked));
    }
    let why: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
    Err(format!(
        "0/{} nodes are available: {}.",
        nodes.len(),
        why.join(", ")
    ))
}

/// The node affinities of the volumes bound to the pod's claims; an error when
/// a claim does not exist.
fn volume_affinity(ctx: &Ctx, p: &Value) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for v in p["spec"]["volumes"].as_array().into_iter().flatten() {
        let Some(claim) = v["persistentVolumeClaim"]["claimName"].as_str() else {
            continue;
        };
        let Some(pvc) = ctx
            .store
            .get_ns("persistentvolumeclaims", util::namespace(p), claim)
        else {
            return Err(format!("persistentvolumeclaim \"{claim}\" not found"));
        };
        if let Some(pv) = pvc["spec"]["volumeName"]
            .as_str()
            .and_then(|n| ctx.store.get("persistentvolumes", &format!("/{n}")))
        {
            if let Some(terms) =
                pv.get_path(&["spec", "nodeAffinity", "required", "nodeSelectorTerms"])
            {
                out.push(terms.clone());
            }
        }
    }
    Ok(out)
}

pub fn wants_scheduling(p: &Value) -> bool {
    p["spec"]["nodeName"].as_str().is_none_or(str::is_empty)
        && util::pod_active(p)
        && p["spec"]["schedulerName"]
            .as_str()
            .is_none_or(|s| s == "default-scheduler" || s.is_empty())
}

/// What a bound pod takes from its node (read once per pod uid: a pod's spec
/// does not change).
struct Usage {
    cpu: i64,
    mem: i64,
    ports: Vec<(String, i64)>,
    owner: Option<Arc<str>>,
}

impl Usage {
    fn of(p: &Value) -> Self {
        let (cpu, mem) = util::pod_requests(p);
        Usage {
            cpu,
            mem,
            ports: host_ports(p),
            owner: util::controller_uid(p).map(Arc::from),
        }
    }
}

/// What is kept between batches: the nodes' states (each with its
/// [`NodeInfo`], rebuilt when the node object changes, and the pods counted
/// on it), each bound pod's [`Usage`] by uid, and what each version of a pod
/// object was counted as (by the address of the shared object, which the
/// entry keeps alive, so the address names that version). A batch brings the states up to date by
/// counting only the pod versions it has not seen and taking out those that
/// are gone, so its cost follows what changed, not the size of the cluster.
#[derive(Default)]
struct Cache {
    usage: HashMap<String, Arc<Usage>>,
    counted: HashMap<usize, Counted>,
    states: Vec<NodeState>,
    idx: HashMap<Arc<str>, usize>,
    /// Bumped by every refresh; a counted pod version not stamped with the
    /// current one is gone from the store.
    stamp: u64,
}

/// A pod object version as the scheduler counts it: the node (index into
/// `Cache::states`) it takes room on, none when unbound or finished, and how
/// much.
struct Counted {
    pod: Arc<Value>,
    on: Option<(usize, Arc<Usage>)>,
    stamp: u64,
}

impl Cache {
    /// Bring the node states up to date with the store.
    fn refresh(&mut self, store: &crate::store::Store) {
        let live: Vec<Arc<Value>> = store
            .list("nodes")
            .into_iter()
            .filter(|n| !util::deleting(n))
            .collect();
        let same_nodes = live.len() == self.states.len()
            && live.iter().all(|n| self.idx.contains_key(util::name(n)));
        if !same_nodes {
            self.states.clear();
            self.idx.clear();
            self.counted.clear();
        }
        for n in live {
            match self.idx.get(util::name(&n)) {
                Some(&i) if Arc::ptr_eq(&self.states[i].node, &n) => {}
                Some(&i) => self.states[i].info = Arc::new(NodeInfo::new(n)),
                None => {
                    let info = Arc::new(NodeInfo::new(n));
                    self.idx.insert(info.name.clone(), self.states.len());
                    self.states.push(NodeState::with_info(info));
                }
            }
        }
        self.stamp += 1;
        let stamp = self.stamp;
        let pods = store.list("pods");
        for p in &pods {
            let at = Arc::as_ptr(p) as usize;
            if let Some(c) = self.counted.get_mut(&at) {
                c.stamp = stamp;
                continue;
            }
            let node = p["spec"]["nodeName"].as_str().filter(|n| !n.is_empty());
            let on = match node.and_then(|n| self.idx.get(n)) {
                Some(&i) if !matches!(util::pod_phase(p), "Succeeded" | "Failed") => {
                    let uid = util::uid(p);
                    let u = match self.usage.get(uid) {
                        Some(u) => u.clone(),
                        None => {
                            let u = Arc::new(Usage::of(p));
                            self.usage.insert(uid.to_string(), u.clone());
                            u
                        }
                    };
                    self.states[i].add_usage(p.clone(), &u);
                    Some((i, u))
                }
                _ => None,
            };
            self.counted.insert(
                at,
                Counted {
                    pod: p.clone(),
                    on,
                    stamp,
                },
            );
        }
        if self.counted.len() > pods.len() {
            let states = &mut self.states;
            self.counted.retain(|_, c| {
                if c.stamp == stamp {
                    return true;
                }
                if let Some((i, u)) = &c.on {
                    states[*i].remove_usage(&c.pod, u);
                }
                false
            });
        }
        // Forget pods that are gone, now and then rather than every batch.
        if self.usage.len() > 2 * pods.len() + 1024 {
            let live: HashSet<&str> = pods.iter().map(|p| util::uid(p)).collect();
            self.usage.retain(|uid, _| live.contains(uid.as_str()));
        }
    }
}

#[derive(Default)]
pub struct Scheduler {
    attempts: Mutex<HashMap<String, u32>>,
    cache: Mutex<Cache>,
    /// Where the next search over the nodes starts (kube-scheduler's
    /// nextStartNodeIndex), so a partial search moves round the cluster.
    next_start: std::sync::atomic::AtomicUsize,
}

impl Scheduler {
    async fn batch(&self, ctx: &Ctx, keys: &[String]) -> Vec<Outcome> {
        let mut binds = Vec::new();
        let mut unschedulable = Vec::new();
        let mut out: Vec<Option<Outcome>> = vec![None; keys.len()];
        {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache.refresh(&ctx.store);
            let nodes = &mut cache.states;
            // What this batch places is counted while it decides, and taken out
            // again after: the binds come back as new pod versions.
            let mut placed = Vec::new();
            for (i, k) in keys.iter().enumerate() {
                let Some(p) = ctx.store.get("pods", k) else {
                    out[i] = Some(Ok(None));
                    continue;
                };
                if !wants_scheduling(&p) {
                    out[i] = Some(Ok(None));
                    continue;
                }
                let start = self.next_start.load(std::sync::atomic::Ordering::Relaxed);
                let chosen =
                    volume_affinity(ctx, &p).and_then(|v| choose_from(&p, nodes, &v, start));
                match chosen {
                    Ok((n, looked)) => {
                        self.next_start.store(
                            (start + looked) % nodes.len().max(1),
                            std::sync::atomic::Ordering::Relaxed,
                        );
                        let u = Usage::of(&p);
                        nodes[n].add_usage(p.clone(), &u);
                        placed.push((n, p.clone(), u));
                        binds.push((i, p, nodes[n].name.clone()));
                    }
                    Err(why) => {
                        let n = {
                            let mut a = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
                            let n = a.entry(k.clone()).or_insert(0);
                            *n += 1;
                            *n
                        };
                        if n == 1 || n % 10 == 0 {
                            ctx.event(&p, "Warning", "FailedScheduling", why.clone());
                        }
                        let backoff =
                            Duration::from_millis((1000u64 << (n - 1).min(3)).min(10_000));
                        out[i] = Some(Ok(Some(backoff)));
                        unschedulable.push((p, why));
                    }
                }
            }
            for (n, p, u) in placed {
                nodes[n].remove_usage(&p, &u);
            }
        }
        for (p, why) in unschedulable {
            let mut st = (*p).clone();
            if util::set_condition(
                &mut st,
                "PodScheduled",
                "False",
                "Unschedulable",
                &why,
                &orc_api::now_rfc3339(),
            ) {
                let _ = ctx.update_status(st).await;
            }
        }
        let results = futures::future::join_all(binds.iter().map(|(_, p, node)| {
            let mut bound = (**p).clone();
            bound["spec"]["nodeName"] = json!(&**node);
            ctx.update(bound)
        }))
        .await;
        for ((i, p, node), r) in binds.into_iter().zip(results) {
            out[i] = Some(match r {
                Ok(_) => {
                    self.attempts
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&keys[i]);
                    ctx.event(
                        &p,
                        "Normal",
                        "Scheduled",
                        format!(
                            "Successfully assigned {}/{} to {node}",
                            util::namespace(&p),
                            util::name(&p)
                        ),
                    );
                    Ok(None)
                }
                Err(e) => Err(e),
            });
        }
        out.into_iter().map(|o| o.unwrap_or(Ok(None))).collect()
    }
}

impl Reconciler for Scheduler {
    fn name(&self) -> &'static str {
        "default-scheduler"
    }

    fn keys_for(&self, ctx: &Ctx, ch: &Change) -> Vec<String> {
        match ch.resource {
            "pods" if wants_scheduling(&ch.object) && ch.event != orc_api::EventType::Deleted => {
                vec![ch.key.clone()]
            }
            // Room appeared: a node came or changed, or a bound pod went.
            "nodes" => self.pending(ctx),
            "pods" if ch.event == orc_api::EventType::Deleted => self.pending(ctx),
            _ => Vec::new(),
        }
    }

    fn all_keys(&self, ctx: &Ctx) -> Vec<String> {
        ctx.store
            .list("pods")
            .iter()
            .filter(|p| wants_scheduling(p))
            .map(|p| crate::store::key_of(p))
            .collect()
    }

    fn reconcile<'a>(&'a self, ctx: &'a Ctx, key: &'a str) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let keys = [key.to_string()];
            self.batch(ctx, &keys).await.pop().unwrap_or(Ok(None))
        })
    }

    fn reconcile_batch<'a>(
        &'a self,
        ctx: &'a Ctx,
        keys: &'a [String],
    ) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(self.batch(ctx, keys))
    }

    fn batch_size(&self) -> usize {
        512
    }
}

impl Scheduler {
    /// Pods waiting because nothing fitted.
    fn pending(&self, _ctx: &Ctx) -> Vec<String> {
        self.attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cpu: &str, ready: bool) -> NodeState {
        NodeState::new(Arc::new(
            json!({"metadata": {"name": name, "labels": {HOSTNAME: name, "zone": "a"}},
            "spec": {}, "status": {"allocatable": {"cpu": cpu, "memory": "1Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}}),
        ))
    }

    fn pod(cpu: &str) -> Value {
        json!({"metadata": {"name": "p", "namespace": "d", "labels": {"app": "w"},
                "ownerReferences": [{"uid": "rs1", "controller": true}]},
               "spec": {"containers": [{"resources": {"requests": {"cpu": cpu}}}]}})
    }

    /// Each node's counts after a run of changes, kept up to date batch by
    /// batch, are what counting the store afresh gives.
    #[test]
    fn kept_node_states_match_a_fresh_count() {
        use orc_api::EventType::{Added, Deleted, Modified};
        let store = crate::store::Store::new();
        let node_obj = |name: &str, zone: &str| {
            let mut v = (*node(name, "4", true).node).clone();
            v["apiVersion"] = json!("v1");
            v["kind"] = json!("Node");
            v["metadata"]["labels"]["zone"] = json!(zone);
            Arc::new(v)
        };
        let pod_obj = |name: &str, on: Option<&str>, port: Option<i64>, phase: &str| {
            let mut v = pod("250m");
            v["apiVersion"] = json!("v1");
            v["kind"] = json!("Pod");
            v["metadata"]["name"] = json!(name);
            v["metadata"]["uid"] = json!(format!("uid-{name}"));
            v["spec"]["containers"][0]["ports"] =
                json!(port.map(|p| vec![json!({"containerPort": 80, "hostPort": p})]));
            if let Some(n) = on {
                v["spec"]["nodeName"] = json!(n);
            }
            v["status"] = json!({"phase": phase});
            Arc::new(v)
        };
        let summary = |c: &Cache| {
            let mut v: Vec<_> = c
                .states
                .iter()
                .map(|n| {
                    let mut pods: Vec<String> =
                        n.pods.iter().map(|p| util::name(p).to_string()).collect();
                    pods.sort();
                    let mut ports: Vec<_> = n.ports.iter().map(|(k, c)| (k.clone(), *c)).collect();
                    ports.sort();
                    let mut owners: Vec<_> =
                        n.owners.iter().map(|(k, c)| (k.to_string(), *c)).collect();
                    owners.sort();
                    let zone = n.node["metadata"]["labels"]["zone"].to_string();
                    (
                        n.name.to_string(),
                        zone,
                        n.used_cpu,
                        n.used_mem,
                        pods,
                        ports,
                        owners,
                    )
                })
                .collect();
            v.sort();
            v
        };
        let mut kept = Cache::default();
        let check = |kept: &mut Cache, step: &str| {
            kept.refresh(&store);
            let mut fresh = Cache::default();
            fresh.refresh(&store);
            assert_eq!(summary(kept), summary(&fresh), "{step}");
        };
        for n in ["a", "b", "c"] {
            store.apply(Added, node_obj(n, "z1"));
        }
        store.apply(Added, pod_obj("p1", None, None, "Pending"));
        store.apply(Added, pod_obj("p2", Some("a"), Some(8080), "Running"));
        store.apply(Added, pod_obj("p3", Some("b"), Some(8080), "Running"));
        store.apply(Added, pod_obj("p4", Some("b"), None, "Running"));
        check(&mut kept, "first count");
        assert_eq!(kept.states[kept.idx["b"]].used_cpu, 500);
        // A bind, a finished pod, a deleted pod, a pod moved to a missing node.
        store.apply(Modified, pod_obj("p1", Some("c"), Some(9090), "Pending"));
        store.apply(Modified, pod_obj("p2", Some("a"), Some(8080), "Succeeded"));
        store.apply(Deleted, pod_obj("p3", Some("b"), Some(8080), "Running"));
        store.apply(Modified, pod_obj("p4", Some("x"), None, "Running"));
        check(&mut kept, "changes");
        assert!(kept.states[kept.idx["a"]].pods.is_empty());
        assert_eq!(kept.states[kept.idx["b"]].used_cpu, 0);
        // A node object changes (same nodes), then a node joins: its pods count.
        store.apply(Modified, node_obj("a", "z2"));
        check(&mut kept, "node changed");
        store.apply(Added, node_obj("x", "z1"));
        check(&mut kept, "node joined");
        assert_eq!(kept.states[kept.idx["x"]].used_cpu, 250);
        store.apply(Deleted, node_obj("c", "z1"));
        check(&mut kept, "node left");
        // Unchanged: nothing moves.
        let before = summary(&kept);
        check(&mut kept, "no change");
        assert_eq!(summary(&kept), before);
    }

    #[test]
    fn resources_and_reasons() {
        let nodes = vec![
            node("a", "1", true),
            node("b", "2", true),
            node("c", "8", false),
        ];
        assert_eq!(choose(&pod("1500m"), &nodes, &[]), Ok(1));
        let e = choose(&pod("4"), &nodes, &[]).unwrap_err();
        assert_eq!(
            e,
            "0/3 nodes are available: 2 Insufficient cpu, 1 node(s) were not ready."
        );
    }

    #[test]
    fn spreads_an_owners_pods() {
        let mut nodes = vec![
            node("a", "4", true),
            node("b", "4", true),
            node("c", "4", true),
        ];
        for _ in 0..6 {
            let p = pod("100m");
            let i = choose(&p, &nodes, &[]).unwrap();
            nodes[i].add(Arc::new(p));
        }
        assert!(nodes.iter().all(|n| n.pods.len() == 2));
    }

    #[test]
    fn taints_tolerations_selectors_affinity() {
        let mut v = (*node("a", "4", true).node).clone();
        v["spec"]["taints"] = json!([{"key": "k", "value": "v", "effect": "NoSchedule"}]);
        let mut n = NodeState::new(Arc::new(v));
        let mut p = pod("1");
        assert!(unfit(&p, &n, &[]).unwrap().contains("untolerated taint"));
        p["spec"]["tolerations"] = json!([{"key": "k", "operator": "Exists"}]);
        assert_eq!(unfit(&p, &n, &[]), None);
        p["spec"]["nodeSelector"] = json!({"zone": "b"});
        assert!(unfit(&p, &n, &[]).is_some());
        p["spec"]["nodeSelector"] = json!({"zone": "a"});
        p["spec"]["affinity"] = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["b"]}]}]}}});
        assert!(unfit(&p, &n, &[]).is_some());
        p["spec"]["affinity"] = json!({"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"topologyKey": HOSTNAME, "labelSelector": {"matchLabels": {"app": "w"}}}]}});
        assert_eq!(unfit(&p, &n, &[]), None);
        n.add(Arc::new(pod("0")));
        assert!(unfit(&p, &n, &[]).unwrap().contains("anti-affinity"));
    }

    #[test]
    fn large_clusters_score_a_share_of_the_nodes() {
        assert_eq!(nodes_to_find(3), 3);
        assert_eq!(nodes_to_find(100), 100);
        assert_eq!(nodes_to_find(150), 100);
        assert_eq!(nodes_to_find(1000), 420);
        assert_eq!(nodes_to_find(5000), 500);
        assert_eq!(nodes_to_find(100_000), 5000);
        // 300 equal nodes, every other one ready: the search stops after the
        // 144th that fits, and the next one starts where it stopped.
        let nodes: Vec<NodeState> = (0..300)
            .map(|i| node(&format!("n{i}"), "4", i % 2 == 0))
            .collect();
        assert_eq!(nodes_to_find(300), 144);
        let (a, looked) = choose_from(&pod("100m"), &nodes, &[], 0).unwrap();
        assert_eq!((a, looked), (0, 287), "144 ready nodes among the first 287");
        let (b, looked) = choose_from(&pod("100m"), &nodes, &[], looked).unwrap();
        assert_eq!(b, 288);
        assert_eq!(looked, 288, "round the end of the list");
        // Nothing fits: every node is looked at and the reasons counted.
        let e = choose_from(&pod("8"), &nodes, &[], 7).unwrap_err();
        assert_eq!(
            e,
            "0/300 nodes are available: 150 Insufficient cpu, 150 node(s) were not ready."
        );
    }

    #[test]
    fn host_ports_conflict() {
        let mut n = node("a", "4", true);
        let mut p = pod("0");
        p["spec"]["containers"][0]["ports"] = json!([{"containerPort": 80, "hostPort": 8080}]);
        n.add(Arc::new(p.clone()));
        assert!(unfit(&p, &n, &[]).unwrap().contains("free ports"));
    }
}
