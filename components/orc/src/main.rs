//! `orc`: one binary for masters (`orc master`), a local cluster (`orc up`/`down`)
//! and the kubectl-style client verbs. Thin: flags and printing here, the work in
//! the library crates.
mod local;
mod output;
mod podio;
mod rollout;
mod sim;

// The master allocates and frees many small JSON values per write; mimalloc is
// markedly cheaper than glibc's malloc for that (see bench/README.md). Built
// with `no_thp`: left to itself mimalloc asks for transparent huge pages, and
// every short-lived `orc` process (each container's shim, the CLI) then zeroes
// whole 2 MiB pages on its first allocations.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use orc_api::request::{Request, WatchRequest};
use orc_api::resources;
use orc_client::{Client, ClientError};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "orc",
    version,
    about = "orc: a Kubernetes-model container orchestrator"
)]
struct Cli {
    /// Masters to talk to (HOST:PORT, comma-separated); else $ORC_SERVER, else ~/.orc/config.
    #[arg(long, global = true, env = "ORC_SERVER")]
    server: Option<String>,
    /// Namespace for the request.
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a master: a Raft member serving the API.
    Master(MasterArgs),
    /// Start a local cluster of three masters on this machine.
    Up(local::UpArgs),
    /// Stop the local cluster started by `orc up`.
    Down(local::DownArgs),
    /// Create or update objects from files (kubectl apply).
    Apply(FileArgs),
    /// Create objects from files; existing ones are an error.
    Create(FileArgs),
    /// Replace objects from files (a resourceVersion in the file is a precondition).
    Replace(FileArgs),
    /// List or get objects.
    Get(GetArgs),
    /// Show an object in detail.
    Describe { resource: String, name: String },
    /// Delete objects by type and name, or those in files.
    Delete(DeleteArgs),
    /// Patch an object with a JSON merge patch.
    Patch {
        resource: String,
        name: String,
        #[arg(short = 'p', long)]
        patch: String,
        /// Patch the status subresource.
        #[arg(long)]
        subresource: Option<String>,
    },
    /// Offline checks of a stopped master's data directory.
    #[command(hide = true)]
    Debug {
        #[command(subcommand)]
        cmd: DebugCmd,
    },
    /// Run a node agent (or, with --simulate, hollow nodes).
    Node(sim::SimArgs),
    /// The images a node holds.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// Manage the rollout of a Deployment.
    Rollout {
        #[command(subcommand)]
        cmd: rollout::RolloutCmd,
    },
    /// Print (or follow) a container's output.
    Logs(podio::LogsArgs),
    /// Run a command in a container: orc exec POD [-c C] [-it] -- CMD...
    Exec(podio::ExecArgs),
    /// Set the replicas of a Deployment, ReplicaSet, ReplicationController or StatefulSet.
    Scale {
        /// TYPE/NAME or TYPE
        target: String,
        name: Option<String>,
        #[arg(long)]
        replicas: i64,
    },
    /// Fork a shim per container the node agent starts (started by the
    /// agent; its socket is standard input).
    #[command(hide = true)]
    ShimZygote,
    /// The L7 ingress: a Pingora proxy routing HTTP(S) by Ingress rules
    /// straight to the pods behind Services.
    Ingress(IngressArgs),
    /// A node's cluster DNS server (started by the node agent).
    #[command(hide = true)]
    NodeDns {
        #[arg(long)]
        master: String,
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long, default_value = "cluster.local")]
        cluster_domain: String,
        /// Resolvers for other names, HOST:PORT comma-separated, or `none`
        /// (default: the nameservers of /etc/resolv.conf).
        #[arg(long, value_delimiter = ',')]
        upstream: Vec<String>,
    },
    /// Run a command inside a running container (used by the node agent).
    #[command(hide = true)]
    ShimExec {
        #[arg(long)]
        state_root: PathBuf,
        #[arg(long)]
        id: String,
        #[arg(long)]
        tty: bool,
        #[arg(last = true, required = true)]
        args: Vec<String>,
    },
    /// Inspect and change the set of masters.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Load an OCI layout or `docker save` tarball into this node's store.
    Import {
        file: PathBuf,
        /// The node agent's data directory.
        #[arg(long, default_value = "/var/lib/orc/node")]
        data_dir: PathBuf,
    },
    /// Pull an image from a registry into this node's store.
    Pull {
        reference: String,
        #[arg(long, default_value = "/var/lib/orc/node")]
        data_dir: PathBuf,
        /// Registries (HOST[:PORT]) spoken to over plain HTTP, comma-separated.
        #[arg(long, value_delimiter = ',')]
        insecure_registry: Vec<String>,
    },
    /// Push an image of this node's store to a registry: orc image push LOCAL TARGET.
    Push {
        local: String,
        target: String,
        #[arg(long, default_value = "/var/lib/orc/node")]
        data_dir: PathBuf,
        #[arg(long, value_delimiter = ',')]
        insecure_registry: Vec<String>,
    },
    /// Write a busybox image made from busybox-static (/bin/busybox) as a
    /// `docker save` tarball, for `orc image import` or a registry.
    Busybox {
        file: PathBuf,
        #[arg(long, default_value = "busybox:latest")]
        tag: String,
    },
    /// List the images this node holds.
    Ls {
        #[arg(long, default_value = "/var/lib/orc/node")]
        data_dir: PathBuf,
    },
}

fn image_cmd(cmd: ImageCmd) -> Result<i32> {
    match cmd {
        ImageCmd::Import { file, data_dir } => {
            let store = orc_image::Store::new(data_dir.join("images"));
            let imgs = store
                .import(&file)
                .with_context(|| format!("importing {}", file.display()))?;
            for i in imgs {
                println!("imported {} {}", i.id, i.names.join(" "));
            }
            Ok(0)
        }
        ImageCmd::Pull {
            reference,
            data_dir,
            insecure_registry,
        } => {
            let store = orc_image::Store::new(data_dir.join("images"));
            let o = orc_image::registry::Options {
                insecure: insecure_registry,
                ..Default::default()
            };
            let i = store
                .pull(&reference, &o)
                .with_context(|| format!("pulling {reference}"))?;
            println!("pulled {} {}", i.id, i.names.join(" "));
            Ok(0)
        }
        ImageCmd::Push {
            local,
            target,
            data_dir,
            insecure_registry,
        } => {
            let store = orc_image::Store::new(data_dir.join("images"));
            let o = orc_image::registry::Options {
                insecure: insecure_registry,
                ..Default::default()
            };
            let d = store
                .push(&local, &target, &o)
                .with_context(|| format!("pushing {local} to {target}"))?;
            println!("pushed {target}@{d}");
            Ok(0)
        }
        ImageCmd::Busybox { file, tag } => {
            let archive = orc_image::busybox_archive(Path::new("/bin/busybox"), &tag)?;
            std::fs::write(&file, archive)
                .with_context(|| format!("writing {}", file.display()))?;
            println!("{}: {tag}", file.display());
            Ok(0)
        }
        ImageCmd::Ls { data_dir } => {
            let store = orc_image::Store::new(data_dir.join("images"));
            let mut t = comfy_table::Table::new();
            t.load_preset(comfy_table::presets::NOTHING);
            t.set_header(["IMAGE", "ID", "SIZE"]);
            for i in store.list() {
                let id =
                    i.id.trim_start_matches("sha256:")
                        .chars()
                        .take(12)
                        .collect::<String>();
                let size = format!("{:.1}MB", i.size as f64 / 1e6);
                if i.names.is_empty() {
                    t.add_row(["<none>".to_string(), id, size]);
                } else {
                    for n in &i.names {
                        t.add_row([n.clone(), id.clone(), size.clone()]);
                    }
                }
            }
            println!("{t}");
            Ok(0)
        }
    }
}

#[derive(Args)]
struct MasterArgs {
    /// This master's Raft id (a positive integer, unique in the cluster).
    #[arg(long)]
    id: u64,
    /// Address to serve gRPC (Raft and API) on.
    #[arg(long)]
    listen: SocketAddr,
    /// Where the RocksDB log and object store live.
    #[arg(long)]
    data_dir: PathBuf,
    /// The founding members: 1=HOST:PORT,2=HOST:PORT,3=HOST:PORT.
    #[arg(long)]
    initial_cluster: String,
    /// The address others reach this master at (default: --listen).
    #[arg(long)]
    advertise: Option<String>,
    #[arg(long, default_value_t = 100)]
    heartbeat_ms: u64,
    #[arg(long, default_value_t = 150)]
    election_timeout_min_ms: u64,
    #[arg(long, default_value_t = 300)]
    election_timeout_max_ms: u64,
    /// Take a snapshot and purge the log after this many entries.
    #[arg(long, default_value_t = 10_000)]
    snapshot_every: u64,
    /// Log entries kept behind a snapshot.
    #[arg(long, default_value_t = 1_000)]
    keep_logs: u64,
    /// A write not committed by then fails with Unavailable (no quorum).
    #[arg(long, default_value_t = 5_000)]
    write_timeout_ms: u64,
    /// Pod network range; each node gets a --node-cidr-mask-size subnet of it.
    #[arg(long, default_value = "198.18.0.0/16")]
    cluster_cidr: String,
    #[arg(long, default_value_t = 24)]
    node_cidr_mask_size: u8,
    /// A node without a Lease renewal for this long turns Unknown (seconds).
    #[arg(long, default_value_t = 40.0)]
    node_monitor_grace_period: f64,
    /// Pods tolerate not-ready/unreachable nodes this long by default (seconds).
    #[arg(long, default_value_t = 300)]
    default_toleration_seconds: i64,
    /// ClusterIPs of Services come from this range.
    #[arg(long, default_value = "198.19.0.0/16")]
    service_cidr: String,
    /// NodePorts come from this range (FIRST-LAST).
    #[arg(long, default_value = "30000-32767")]
    service_node_port_range: String,
    /// Addresses for LoadBalancer Services: CIDRs or FIRST-LAST ranges,
    /// comma-separated (as MetalLB's address pools). Empty: none are given.
    #[arg(long, default_value = "")]
    load_balancer_pool: String,
    /// First retry delay of a failed Job's pod (seconds; doubles up to 6 minutes).
    #[arg(long, default_value_t = 10.0)]
    job_backoff_seconds: f64,
    /// Controllers look at every object again this often (seconds).
    #[arg(long, default_value_t = 60.0)]
    controller_resync: f64,
}

#[derive(Args)]
struct FileArgs {
    /// A file, a directory of .yaml/.yml/.json files, or - for standard input.
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<String>,
}

#[derive(Args)]
struct GetArgs {
    resource: String,
    name: Option<String>,
    /// Output: wide, yaml, json, name.
    #[arg(short = 'o', long)]
    output: Option<String>,
    /// Watch for changes after listing.
    #[arg(short = 'w', long)]
    watch: bool,
    /// With -w: only changes, no initial listing.
    #[arg(long)]
    watch_only: bool,
    /// With -w: start from this resourceVersion (resume a watch).
    #[arg(long)]
    resource_version: Option<String>,
    /// With -w -o json: print {"type": ..., "object": ...} for each event.
    #[arg(long)]
    output_watch_events: bool,
    /// Label selector (a=b, a!=b, a in (x,y), a notin (x), a, !a).
    #[arg(short = 'l', long)]
    selector: Option<String>,
    /// Field selector on metadata.name, metadata.namespace, spec.nodeName, status.phase.
    #[arg(long)]
    field_selector: Option<String>,
    /// All namespaces.
    #[arg(short = 'A', long)]
    all_namespaces: bool,
}

#[derive(Args)]
struct DeleteArgs {
    resource: Option<String>,
    names: Vec<String>,
    #[arg(short = 'f', long = "filename")]
    files: Vec<String>,
    /// Background, Foreground or Orphan.
    #[arg(long)]
    cascade: Option<String>,
    /// Ignore objects that do not exist.
    #[arg(long)]
    ignore_not_found: bool,
    /// Seconds a pod's node gets to stop it (default: its
    /// terminationGracePeriodSeconds; 0 with --force removes it at once).
    #[arg(long)]
    grace_period: Option<i64>,
    /// Remove pods from the API at once, without waiting for their node.
    #[arg(long)]
    force: bool,
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Leader, term and every member's state.
    Status {
        #[arg(short = 'o', long)]
        output: Option<String>,
    },
    /// Add a master (started with an empty data dir) as a voter.
    AddMaster { id: u64, address: String },
    /// Remove a master from the cluster.
    RemoveMaster { id: u64 },
    /// Save or restore snapshots of the object store.
    Snapshot {
        #[command(subcommand)]
        cmd: SnapshotCmd,
    },
}

#[derive(Subcommand)]
enum DebugCmd {
    /// Open a stopped master's store, check its invariants, print a digest as JSON.
    CheckStore { data_dir: PathBuf },
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Write every object, as of one resourceVersion, to FILE (a JSON List).
    Save { file: PathBuf },
    /// Recreate the objects of a saved snapshot in a (new) cluster.
    Restore { file: PathBuf },
}

#[derive(clap::Args, Debug)]
struct IngressArgs {
    /// Masters, HOST:PORT comma-separated.
    #[arg(long)]
    master: String,
    /// Plain HTTP listen address (`none` for no plain HTTP).
    #[arg(long, default_value = "0.0.0.0:80")]
    http: String,
    /// HTTPS listen address (`none` for no HTTPS); certificates come from the
    /// Ingresses' spec.tls Secrets, chosen by SNI.
    #[arg(long, default_value = "0.0.0.0:443")]
    https: String,
    /// Prometheus metrics listen address (`none` to turn off).
    #[arg(long, default_value = "127.0.0.1:10254")]
    metrics: String,
    /// The IngressClass served: Ingresses naming it, and those naming none
    /// when it carries ingressclass.kubernetes.io/is-default-class=true.
    #[arg(long = "class", default_value = "orc")]
    class: String,
    /// Addresses written to the Ingresses' status.loadBalancer (IPs or host
    /// names, comma-separated; default: the listen address when it names one).
    #[arg(long, value_delimiter = ',')]
    publish_address: Vec<String>,
    /// Worker threads (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
    /// Take the listening sockets over from the running ingress (graceful
    /// binary upgrade); then send that one SIGQUIT.
    #[arg(long)]
    upgrade: bool,
    /// The socket the listening sockets are handed over on.
    #[arg(long, default_value = "/run/orc-ingress/upgrade.sock")]
    upgrade_sock: String,
    #[arg(long, default_value = "/run/orc-ingress/ingress.pid")]
    pid_file: String,
    /// On SIGQUIT (upgrade) or SIGTERM: how long open connections
    /// (websockets, slow responses) may finish before the process exits.
    #[arg(long, default_value = "60")]
    drain_seconds: u64,
    /// Run in this network namespace (a node's, where the pods are reachable).
    #[arg(long)]
    netns: Option<PathBuf>,
}

fn run_ingress(a: &IngressArgs) -> Result<()> {
    let opt = |s: &str| (s != "none" && !s.is_empty()).then(|| s.to_string());
    let masters = sim::master_list(&a.master)?;
    for f in [&a.upgrade_sock, &a.pid_file] {
        if let Some(dir) = std::path::Path::new(f).parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
        }
    }
    let cfg = orc_ingress::Config {
        http: opt(&a.http),
        https: opt(&a.https),
        metrics: opt(&a.metrics),
        class: a.class.clone(),
        publish: a.publish_address.clone(),
        threads: a.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }),
        upgrade: a.upgrade,
        upgrade_sock: a.upgrade_sock.clone(),
        pid_file: a.pid_file.clone(),
        drain: std::time::Duration::from_secs(a.drain_seconds),
    };
    if cfg.http.is_none() && cfg.https.is_none() {
        anyhow::bail!("--http and --https are both none: nothing to serve");
    }
    orc_ingress::run(cfg, move || {
        std::sync::Arc::new(orc_controllers::ClientApi(std::sync::Arc::new(
            orc_client::Client::new(masters),
        )))
    })?;
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    // Silent: its standard streams are the command's (no tracing output).
    if let Cmd::ShimExec {
        state_root,
        id,
        tty,
        args,
    } = &cli.cmd
    {
        std::process::exit(orc_container::shim::exec(
            state_root,
            id,
            args.clone(),
            *tty,
        ));
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("ORC_LOG").unwrap_or_else(|_| {
        "warn,libcgroups=error,libcontainer=error,orc=info,orc_apiserver=info".into()
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    // Its children are shims, which clone themselves for the container: it
    // must stay single-threaded.
    if let Cmd::ShimZygote = &cli.cmd {
        std::process::exit(orc_container::zygote::run());
    }
    // Pingora makes its own runtimes: it must not start inside ours.
    if let Cmd::Ingress(a) = &cli.cmd {
        let entered = match &a.netns {
            Some(ns) => sim::enter_netns(ns),
            None => Ok(()),
        };
        if let Err(e) = entered.and_then(|_| run_ingress(a)) {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
        std::process::exit(0);
    }
    // setns applies to the calling thread: enter before tokio's threads exist.
    if let Cmd::Node(a) = &cli.cmd {
        if let Some(ns) = &a.netns {
            if let Err(e) = sim::enter_netns(ns) {
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
        }
    }
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn parse_initial_cluster(s: &str) -> Result<BTreeMap<u64, String>> {
    let mut m = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .with_context(|| format!("--initial-cluster: \"{part}\" is not ID=HOST:PORT"))?;
        let id: u64 = id
            .parse()
            .with_context(|| format!("--initial-cluster: \"{id}\" is not a numeric id"))?;
        if addr.parse::<SocketAddr>().is_err() && !addr.contains(':') {
            bail!("--initial-cluster: \"{addr}\" is not HOST:PORT");
        }
        m.insert(id, addr.to_string());
    }
    if m.is_empty() {
        bail!("--initial-cluster is empty");
    }
    Ok(m)
}

fn servers(cli_server: Option<&str>) -> Result<Vec<String>> {
    if let Some(s) = cli_server {
        return Ok(s
            .split(',')
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect());
    }
    let path = local::config_path();
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no master given: use --server, ORC_SERVER, or run `orc up` (which writes {})",
            path.display()
        )
    })?;
    let cfg: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let list: Vec<String> = cfg["servers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if list.is_empty() {
        bail!("{} lists no servers", path.display());
    }
    Ok(list)
}

/// Read manifests from files, directories or stdin.
fn read_manifests(files: &[String]) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for f in files {
        if f == "-" {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s)?;
            out.extend(orc_api::manifest::parse(&s).map_err(|e| anyhow::anyhow!("-: {e}"))?);
            continue;
        }
        let p = Path::new(f);
        let mut paths = Vec::new();
        if p.is_dir() {
            for e in std::fs::read_dir(p).with_context(|| format!("reading {f}"))? {
                let path = e?.path();
                if matches!(
                    path.extension().and_then(|x| x.to_str()),
                    Some("yaml" | "yml" | "json")
                ) {
                    paths.push(path);
                }
            }
            paths.sort();
        } else {
            paths.push(p.to_path_buf());
        }
        for path in paths {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            out.extend(
                orc_api::manifest::parse(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
            );
        }
    }
    Ok(out)
}

fn kind_name(obj: &Value) -> String {
    let kind = obj["kind"]
        .as_str()
        .unwrap_or("object")
        .to_ascii_lowercase();
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let group = obj["apiVersion"]
        .as_str()
        .and_then(|a| a.split_once('/'))
        .map(|(g, _)| format!(".{g}"))
        .unwrap_or_default();
    format!("{kind}{group}/{name}")
}

fn resource_arg(r: &str) -> Result<&'static resources::ResourceInfo> {
    resources::lookup(r).with_context(|| format!("the server doesn't have a resource type \"{r}\""))
}

async fn run(cli: Cli) -> Result<i32> {
    let ns = cli.namespace.clone();
    match cli.cmd {
        Cmd::Master(a) => {
            // No transparent huge pages for the master: its allocators
            // return memory and fault it back in all the time, and each
            // fault of a huge page zeroes 2 MiB. This cut the CPU per write
            // by 15-20 % (bench/README.md, writes). Children inherit it: a
            // master starts none.
            // SAFETY: prctl with integer arguments only.
            unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
            let mut cfg = orc_apiserver::MasterConfig::new(
                a.id,
                a.listen,
                a.data_dir,
                parse_initial_cluster(&a.initial_cluster)?,
            );
            if let Some(adv) = a.advertise {
                cfg.advertise = adv;
            }
            cfg.heartbeat = Duration::from_millis(a.heartbeat_ms);
            cfg.election_min = Duration::from_millis(a.election_timeout_min_ms);
            cfg.election_max = Duration::from_millis(a.election_timeout_max_ms);
            cfg.snapshot_every = a.snapshot_every;
            cfg.keep_logs = a.keep_logs;
            cfg.write_timeout = Duration::from_millis(a.write_timeout_ms);
            if orc_controllers::nodes::parse_cidr(&a.cluster_cidr).is_none() {
                bail!(
                    "--cluster-cidr \"{}\": not an IPv4 CIDR (a.b.c.d/n)",
                    a.cluster_cidr
                );
            }
            if orc_controllers::nodes::parse_cidr(&a.service_cidr).is_none_or(|(_, b)| b > 30) {
                bail!(
                    "--service-cidr \"{}\": not an IPv4 CIDR of /30 or more addresses",
                    a.service_cidr
                );
            }
            cfg.service_cidr = a.service_cidr;
            cfg.node_ports = a
                .service_node_port_range
                .split_once('-')
                .and_then(|(x, y)| Some((x.trim().parse().ok()?, y.trim().parse().ok()?)))
                .filter(|(x, y): &(u16, u16)| x <= y)
                .with_context(|| {
                    format!(
                        "--service-node-port-range \"{}\": expected FIRST-LAST, like 30000-32767",
                        a.service_node_port_range
                    )
                })?;
            cfg.controllers.cluster_cidr = a.cluster_cidr;
            cfg.controllers.node_cidr_mask = a.node_cidr_mask_size;
            cfg.controllers.node_grace =
                Duration::from_secs_f64(a.node_monitor_grace_period.max(0.1));
            cfg.controllers.resync = Duration::from_secs_f64(a.controller_resync.max(1.0));
            cfg.defaults.toleration_seconds = a.default_toleration_seconds;
            cfg.controllers.job_backoff = Duration::from_secs_f64(a.job_backoff_seconds.max(0.0));
            cfg.controllers.lb_pool =
                orc_controllers::loadbalancer::parse_pool(&a.load_balancer_pool)
                    .map_err(anyhow::Error::msg)?;
            let stop = async {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate() => {}
                }
            };
            orc_apiserver::run(cfg, stop).await?;
            Ok(0)
        }
        Cmd::Up(a) => local::up(a).await,
        Cmd::Down(a) => local::down(a).await,
        Cmd::Node(a) => sim::run(a).await,
        Cmd::NodeDns {
            master,
            listen,
            cluster_domain,
            upstream,
        } => {
            let masters = sim::master_list(&master)?;
            let api: std::sync::Arc<dyn orc_controllers::Api> = std::sync::Arc::new(
                orc_controllers::ClientApi(std::sync::Arc::new(orc_client::Client::new(masters))),
            );
            let upstream: Vec<std::net::SocketAddr> = if upstream.is_empty() {
                orc_dns::upstreams_from(
                    &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
                    &[listen.ip()],
                )
            } else {
                upstream
                    .iter()
                    .filter(|u| u.as_str() != "none")
                    .map(|u| {
                        u.parse()
                            .with_context(|| format!("--upstream: \"{u}\" is not HOST:PORT"))
                    })
                    .collect::<Result<_>>()?
            };
            orc_agent::dns::serve(api, listen, cluster_domain, upstream)
                .await
                .with_context(|| format!("cluster DNS on {listen}"))?;
            Ok(0)
        }
        Cmd::Image { cmd } => image_cmd(cmd),
        Cmd::Debug {
            cmd: DebugCmd::CheckStore { data_dir },
        } => check_store(&data_dir),
        other => {
            let client = Client::new(servers(cli.server.as_deref())?);
            client_cmd(&client, ns.as_deref(), other).await
        }
    }
}

async fn terminate() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

fn report(e: &ClientError) {
    match e {
        ClientError::Api(a) => eprintln!("Error from server ({:?}): {}", a.reason, a.message),
        other => eprintln!("error: {other}"),
    }
}

async fn client_cmd(client: &Client, ns: Option<&str>, cmd: Cmd) -> Result<i32> {
    match cmd {
        Cmd::Apply(f) => {
            let objs = read_manifests(&f.files)?;
            let mut code = 0;
            for o in objs {
                match client.apply(&o, ns).await {
                    Ok((obj, outcome)) => println!("{} {outcome}", kind_name(&obj)),
                    Err(e) => {
                        report(&e);
                        code = 1;
                    }
                }
            }
            Ok(code)
        }
        Cmd::Create(f) => {
            let mut code = 0;
            for o in read_manifests(&f.files)? {
                match client
                    .call(&Request::Create {
                        object: o,
                        namespace: ns.map(String::from),
                    })
                    .await
                {
                    Ok(obj) => println!("{} created", kind_name(&obj)),
                    Err(e) => {
                        report(&e);
                        code = 1;
                    }
                }
            }
            Ok(code)
        }
        Cmd::Replace(f) => {
            let mut code = 0;
            for o in read_manifests(&f.files)? {
                match client
                    .call(&Request::Update {
                        object: o,
                        namespace: ns.map(String::from),
                        status: false,
                    })
                    .await
                {
                    Ok(obj) => println!("{} replaced", kind_name(&obj)),
                    Err(e) => {
                        report(&e);
                        code = 1;
                    }
                }
            }
            Ok(code)
        }
        Cmd::Get(g) => get(client, ns, g).await,
        Cmd::Describe { resource, name } => {
            let info = resource_arg(&resource)?;
            let req = Request::Get {
                resource: info.plural.into(),
                namespace: ns.unwrap_or("default").into(),
                name,
            };
            match client.call(&req).await {
                Ok(obj) => {
                    print!("{}", output::describe(&obj));
                    // Events about it, as kubectl describe shows them.
                    let evs = client
                        .call(&Request::List {
                            resource: "events".into(),
                            namespace: Some(
                                match obj["metadata"]["namespace"].as_str() {
                                    Some(n) if !n.is_empty() => n,
                                    _ => "default",
                                }
                                .into(),
                            ),
                            label_selector: String::new(),
                            field_selector: String::new(),
                        })
                        .await
                        .map(|l| l["items"].as_array().cloned().unwrap_or_default())
                        .unwrap_or_default();
                    let uid = &obj["metadata"]["uid"];
                    let mine: Vec<Value> = evs
                        .into_iter()
                        .filter(|e| &e["involvedObject"]["uid"] == uid)
                        .collect();
                    print!("{}", output::describe_events(&mine));
                    Ok(0)
                }
                Err(e) => {
                    report(&e);
                    Ok(1)
                }
            }
        }
        Cmd::Delete(d) => {
            let mut targets = Vec::new();
            if !d.files.is_empty() {
                for o in read_manifests(&d.files)? {
                    let info = orc_api::validate::resource_of(&o)
                        .map_err(|e| anyhow::anyhow!(e.message))?;
                    let name = o
                        .pointer("/metadata/name")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string();
                    let ons = o
                        .pointer("/metadata/namespace")
                        .and_then(Value::as_str)
                        .map(String::from);
                    targets.push((
                        info,
                        ons.or(ns.map(String::from)).unwrap_or("default".into()),
                        name,
                    ));
                }
            } else {
                let r = d
                    .resource
                    .as_deref()
                    .context("delete needs TYPE NAME... or -f FILE")?;
                let info = resource_arg(r)?;
                if d.names.is_empty() {
                    bail!("delete {r}: give at least one name");
                }
                for n in d.names {
                    targets.push((info, ns.unwrap_or("default").to_string(), n));
                }
            }
            let mut code = 0;
            for (info, tns, name) in targets {
                let req = Request::Delete {
                    resource: info.plural.into(),
                    namespace: tns,
                    name: name.clone(),
                    preconditions: Default::default(),
                    propagation_policy: d.cascade.clone(),
                    grace_period_seconds: if d.force { Some(0) } else { d.grace_period },
                };
                match client.call(&req).await {
                    Ok(_) => println!("{}/{} deleted", info.singular, name),
                    Err(ClientError::Api(e))
                        if e.reason == orc_api::Reason::NotFound && d.ignore_not_found => {}
                    Err(e) => {
                        report(&e);
                        code = 1;
                    }
                }
            }
            Ok(code)
        }
        Cmd::Patch {
            resource,
            name,
            patch,
            subresource,
        } => {
            let info = resource_arg(&resource)?;
            let p: Value = serde_json::from_str(&patch).context("--patch must be a JSON object")?;
            let status = match subresource.as_deref() {
                None => false,
                Some("status") => true,
                Some(o) => bail!("--subresource \"{o}\": only \"status\" exists"),
            };
            let req = Request::Patch {
                resource: info.plural.into(),
                namespace: ns.unwrap_or("default").into(),
                name,
                patch: p,
                status,
            };
            match client.call(&req).await {
                Ok(obj) => {
                    println!("{} patched", kind_name(&obj));
                    Ok(0)
                }
                Err(e) => {
                    report(&e);
                    Ok(1)
                }
            }
        }
        Cmd::Cluster { cmd } => cluster(client, cmd).await,
        Cmd::Logs(a) => podio::logs(client, ns.unwrap_or("default"), a).await,
        Cmd::Exec(a) => podio::exec(client, ns.unwrap_or("default"), a).await,
        Cmd::Rollout { cmd } => rollout::rollout(client, ns.unwrap_or("default"), cmd).await,
        Cmd::Scale {
            target,
            name,
            replicas,
        } => {
            rollout::scale(
                client,
                ns.unwrap_or("default"),
                &target,
                name.as_deref(),
                replicas,
            )
            .await
        }
        Cmd::Master(_)
        | Cmd::Up(_)
        | Cmd::Down(_)
        | Cmd::Node(_)
        | Cmd::NodeDns { .. }
        | Cmd::Ingress(_)
        | Cmd::ShimZygote
        | Cmd::ShimExec { .. }
        | Cmd::Image { .. }
        | Cmd::Debug { .. } => {
            unreachable!()
        }
    }
}

async fn get(client: &Client, ns: Option<&str>, g: GetArgs) -> Result<i32> {
    let info = resource_arg(&g.resource)?;
    if g.name.is_some() && g.all_namespaces && info.namespaced && !g.watch {
        bail!("a resource cannot be retrieved by name across all namespaces");
    }
    let list_ns = if g.all_namespaces || !info.namespaced {
        None
    } else {
        Some(ns.unwrap_or("default").to_string())
    };
    let fmt = output::Format::parse(g.output.as_deref())?;
    let labels = g.selector.clone().unwrap_or_default();
    let mut fields = g.field_selector.clone().unwrap_or_default();
    if let Some(name) = &g.name {
        if g.watch {
            fields = if fields.is_empty() {
                format!("metadata.name={name}")
            } else {
                format!("{fields},metadata.name={name}")
            };
        }
    }
    let mut start_rv = g.resource_version.clone();
    if !g.watch_only && start_rv.is_none() {
        let (items, rv) = match &g.name {
            Some(name) if !g.watch => {
                let req = Request::Get {
                    resource: info.plural.into(),
                    namespace: list_ns.clone().unwrap_or_default(),
                    name: name.clone(),
                };
                match client.call(&req).await {
                    Ok(o) => {
                        output::print_one(&o, info, fmt, g.all_namespaces);
                        return Ok(0);
                    }
                    Err(e) => {
                        report(&e);
                        return Ok(1);
                    }
                }
            }
            _ => {
                let req = Request::List {
                    resource: info.plural.into(),
                    namespace: list_ns.clone(),
                    label_selector: labels.clone(),
                    field_selector: fields.clone(),
                };
                match client.call(&req).await {
                    Ok(list) => {
                        let rv = list
                            .pointer("/metadata/resourceVersion")
                            .and_then(Value::as_str)
                            .map(String::from);
                        (list, rv)
                    }
                    Err(e) => {
                        report(&e);
                        return Ok(1);
                    }
                }
            }
        };
        if g.watch && matches!(fmt, output::Format::Json) {
            for it in items["items"].as_array().into_iter().flatten() {
                output::print_watch_json(it, "ADDED", g.output_watch_events);
            }
        } else {
            output::print_list(&items, info, fmt, g.all_namespaces);
        }
        start_rv = rv;
    }
    if !g.watch {
        return Ok(0);
    }
    let req = WatchRequest {
        resource: info.plural.into(),
        namespace: list_ns,
        label_selector: labels,
        field_selector: fields,
        resource_version: start_rv,
        bookmarks: true,
    };
    let mut rx = client.watch(req).await;
    while let Some(ev) = rx.recv().await {
        match ev {
            Ok(ev) if ev.event_type == orc_api::EventType::Bookmark => {}
            Ok(ev) => {
                let t = serde_json::to_value(ev.event_type)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default();
                match fmt {
                    output::Format::Json => {
                        output::print_watch_json(&ev.object, &t, g.output_watch_events)
                    }
                    _ => output::print_one(&ev.object, info, fmt, g.all_namespaces),
                }
            }
            Err(e) => {
                report(&e);
                return Ok(1);
            }
        }
    }
    Ok(0)
}

async fn cluster(client: &Client, cmd: ClusterCmd) -> Result<i32> {
    let res = match cmd {
        ClusterCmd::Status { output } => {
            let st = match client.call(&Request::ClusterStatus).await {
                Ok(s) => s,
                Err(e) => {
                    report(&e);
                    return Ok(1);
                }
            };
            if output.as_deref() == Some("json") {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                output::print_cluster_status(&st);
            }
            return Ok(0);
        }
        ClusterCmd::AddMaster { id, address } => client
            .call(&Request::AddMaster {
                id,
                address: address.clone(),
            })
            .await
            .map(|_| format!("master {id} at {address} added")),
        ClusterCmd::RemoveMaster { id } => client
            .call(&Request::RemoveMaster { id })
            .await
            .map(|_| format!("master {id} removed")),
        ClusterCmd::Snapshot {
            cmd: SnapshotCmd::Save { file },
        } => match client.call(&Request::Snapshot).await {
            Ok(v) => {
                std::fs::write(&file, serde_json::to_vec(&v)?)
                    .with_context(|| format!("writing {}", file.display()))?;
                Ok(format!(
                    "saved {} objects at resourceVersion {} to {}",
                    v["items"].as_array().map(Vec::len).unwrap_or(0),
                    v["metadata"]["resourceVersion"].as_str().unwrap_or("?"),
                    file.display()
                ))
            }
            Err(e) => Err(e),
        },
        ClusterCmd::Snapshot {
            cmd: SnapshotCmd::Restore { file },
        } => return restore(client, &file).await,
    };
    match res {
        Ok(msg) => {
            println!("{msg}");
            Ok(0)
        }
        Err(e) => {
            report(&e);
            Ok(1)
        }
    }
}

/// Recreate a snapshot's objects: namespaces first, then everything else. Objects
/// get new uids and resourceVersions; names, labels, specs and status are kept.
async fn restore(client: &Client, file: &Path) -> Result<i32> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let list: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a snapshot", file.display()))?;
    let mut items: Vec<Value> = list["items"]
        .as_array()
        .cloned()
        .context("snapshot has no items")?;
    items.sort_by_key(|o| if o["kind"] == "Namespace" { 0 } else { 1 });
    let (mut created, mut existed, mut failed, mut skipped) = (0, 0, 0, 0);
    for mut o in items {
        // Objects a controller owns come back from their owners (with new uids),
        // and events are history: restoring them would only make orphans.
        let owned = o
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty());
        if owned || o["kind"] == "Event" {
            skipped += 1;
            continue;
        }
        if let Some(m) = o["metadata"].as_object_mut() {
            for f in ["resourceVersion", "uid", "creationTimestamp", "generation"] {
                m.remove(f);
            }
        }
        match client
            .call(&Request::Create {
                object: o.clone(),
                namespace: None,
            })
            .await
        {
            Ok(_) => created += 1,
            Err(ClientError::Api(e)) if e.reason == orc_api::Reason::AlreadyExists => existed += 1,
            Err(e) => {
                eprint!("{}: ", kind_name(&o));
                report(&e);
                failed += 1;
            }
        }
    }
    println!("restored {created} objects ({existed} already existed, {failed} failed, {skipped} skipped: events and objects their controllers recreate)");
    Ok(if failed > 0 { 1 } else { 0 })
}

fn check_store(data_dir: &Path) -> Result<i32> {
    use std::hash::{Hash, Hasher};
    let (_, sm) = orc_raft::open(&data_dir.join("raft"), orc_raft::Hub::new(1, 0))
        .with_context(|| format!("opening {}", data_dir.display()))?;
    let (applied, objs) = sm.list("").context("listing objects")?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for (k, o) in &objs {
        k.hash(&mut h);
        o.to_string().hash(&mut h);
    }
    let report = serde_json::json!({
        "applied": applied, "objects": objs.len(), "digest": format!("{:016x}", h.finish()),
        "consistent": sm.check_consistency().err().unwrap_or_else(|| "ok".into()),
    });
    println!("{report}");
    Ok(if report["consistent"] == "ok" { 0 } else { 1 })
}
