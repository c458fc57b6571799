//! `orc rollout status|history|undo|restart|pause|resume` and `orc scale`.
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use orc_api::request::Request;
use orc_client::{Client, ClientError};
use orc_controllers::deployment::{revision, template_without_hash};
use orc_controllers::util;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[derive(Subcommand)]
pub enum RolloutCmd {
    /// Wait until the rollout finishes (exit 0), fails its deadline or times out (exit 1).
    Status {
        target: String,
        #[arg(long, default_value_t = 0)]
        timeout_seconds: u64,
    },
    /// The revisions of a Deployment.
    History {
        target: String,
    },
    /// Go back to the previous revision, or to --to-revision N.
    Undo {
        target: String,
        #[arg(long)]
        to_revision: Option<i64>,
    },
    /// Replace every pod (a new template annotation).
    Restart {
        target: String,
    },
    Pause {
        target: String,
    },
    Resume {
        target: String,
    },
}

/// `deploy/NAME`, `deployment/NAME` or `deployment NAME`-style targets.
pub fn target(t: &str, name: Option<&str>) -> Result<(&'static orc_api::ResourceInfo, String)> {
    let (r, n) = match (t.split_once('/'), name) {
        (Some((r, n)), None) => (r, n.to_string()),
        (None, Some(n)) => (t, n.to_string()),
        _ => bail!("give TYPE/NAME (for example deploy/web)"),
    };
    let info = orc_api::resources::lookup(r)
        .with_context(|| format!("the server doesn't have a resource type \"{r}\""))?;
    Ok((info, n))
}

fn api_err(e: ClientError) -> anyhow::Error {
    match e {
        ClientError::Api(a) => anyhow::anyhow!("Error from server ({:?}): {}", a.reason, a.message),
        o => anyhow::anyhow!("{o}"),
    }
}

async fn get(c: &Client, info: &orc_api::ResourceInfo, ns: &str, name: &str) -> Result<Value> {
    c.call(&Request::Get {
        resource: info.plural.into(),
        namespace: ns.into(),
        name: name.into(),
    })
    .await
    .map_err(api_err)
}

async fn patch(
    c: &Client,
    info: &orc_api::ResourceInfo,
    ns: &str,
    name: &str,
    p: Value,
) -> Result<Value> {
    c.call(&Request::Patch {
        resource: info.plural.into(),
        namespace: ns.into(),
        name: name.into(),
        patch: p,
        status: false,
    })
    .await
    .map_err(api_err)
}

fn label(info: &orc_api::ResourceInfo, name: &str) -> String {
    let group = info
        .api_version
        .split_once('/')
        .map(|(g, _)| format!(".{g}"))
        .unwrap_or_default();
    format!("{}{group}/{name}", info.singular)
}

/// kubectl's rollout status for a Deployment: Ok(Some(msg)) when done, Ok(None)
/// with a progress line while waiting, Err when it failed.
pub fn deployment_progress(d: &Value) -> Result<std::result::Result<String, String>> {
    let name = util::name(d);
    if util::generation(d) > d["status"]["observedGeneration"].as_i64().unwrap_or(0) {
        return Ok(Err(
            "Waiting for deployment spec update to be observed...".into()
        ));
    }
    if util::condition(d, "Progressing").is_some_and(|c| c["reason"] == "ProgressDeadlineExceeded")
    {
        bail!("deployment \"{name}\" exceeded its progress deadline");
    }
    let want = d["spec"]["replicas"].as_i64().unwrap_or(1);
    let st = &d["status"];
    let n = |k: &str| st[k].as_i64().unwrap_or(0);
    Ok(if n("updatedReplicas") < want {
        Err(format!("Waiting for deployment \"{name}\" rollout to finish: {} out of {want} new replicas have been updated...", n("updatedReplicas")))
    } else if n("replicas") > n("updatedReplicas") {
        Err(format!("Waiting for deployment \"{name}\" rollout to finish: {} old replicas are pending termination...", n("replicas") - n("updatedReplicas")))
    } else if n("availableReplicas") < n("updatedReplicas") {
        Err(format!("Waiting for deployment \"{name}\" rollout to finish: {} of {} updated replicas are available...", n("availableReplicas"), n("updatedReplicas")))
    } else {
        Ok(format!("deployment \"{name}\" successfully rolled out"))
    })
}

async fn owned_replicasets(c: &Client, d: &Value) -> Result<Vec<Value>> {
    let list = c
        .call(&Request::List {
            resource: "replicasets".into(),
            namespace: Some(util::namespace(d).into()),
            label_selector: String::new(),
            field_selector: String::new(),
        })
        .await
        .map_err(api_err)?;
    let mut rss: Vec<Value> = list["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|rs| util::controller_uid(rs) == Some(util::uid(d)))
        .collect();
    rss.sort_by_key(revision);
    Ok(rss)
}

pub async fn rollout(c: &Client, ns: &str, cmd: RolloutCmd) -> Result<i32> {
    let t = match &cmd {
        RolloutCmd::Status { target, .. }
        | RolloutCmd::History { target }
        | RolloutCmd::Undo { target, .. }
        | RolloutCmd::Restart { target }
        | RolloutCmd::Pause { target }
        | RolloutCmd::Resume { target } => target.clone(),
    };
    let (info, name) = target(&t, None)?;
    if info.kind != "Deployment" {
        bail!(
            "rollout: {} is not supported yet; use a deployment",
            info.plural
        );
    }
    match cmd {
        RolloutCmd::Status {
            timeout_seconds, ..
        } => {
            let start = Instant::now();
            let mut last = String::new();
            loop {
                let d = get(c, info, ns, &name).await?;
                match deployment_progress(&d)? {
                    Ok(done) => {
                        println!("{done}");
                        return Ok(0);
                    }
                    Err(wait) => {
                        if wait != last {
                            println!("{wait}");
                            last = wait;
                        }
                    }
                }
                if timeout_seconds > 0 && start.elapsed() > Duration::from_secs(timeout_seconds) {
                    eprintln!("error: timed out waiting for the condition");
                    return Ok(1);
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        RolloutCmd::History { .. } => {
            let d = get(c, info, ns, &name).await?;
            println!("{}", label(info, &name));
            println!("REVISION  CHANGE-CAUSE");
            for rs in owned_replicasets(c, &d).await? {
                println!(
                    "{:<9} {}",
                    revision(&rs),
                    util::annotation(&rs, "kubernetes.io/change-cause").unwrap_or("<none>")
                );
            }
            Ok(0)
        }
        RolloutCmd::Undo { to_revision, .. } => {
            let d = get(c, info, ns, &name).await?;
            let rss = owned_replicasets(c, &d).await?;
            let current = revision(&d);
            let pick = match to_revision {
                Some(r) => rss
                    .iter()
                    .find(|rs| revision(rs) == r)
                    .with_context(|| format!("unable to find specified revision {r} in history"))?,
                None => rss
                    .iter()
                    .rev()
                    .find(|rs| revision(rs) < current)
                    .context("no rollout history found for deployment")?,
            };
            let template = template_without_hash(pick);
            if template == d["spec"]["template"] {
                println!(
                    "{} skipped rollback (current template already matches revision {})",
                    label(info, &name),
                    revision(pick)
                );
                return Ok(0);
            }
            patch(c, info, ns, &name, json!({"spec": {"template": template}})).await?;
            println!("{} rolled back", label(info, &name));
            Ok(0)
        }
        RolloutCmd::Restart { .. } => {
            let now = orc_api::now_rfc3339();
            patch(c, info, ns, &name, json!({"spec": {"template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": now}}}}})).await?;
            println!("{} restarted", label(info, &name));
            Ok(0)
        }
        RolloutCmd::Pause { .. } => {
            patch(c, info, ns, &name, json!({"spec": {"paused": true}})).await?;
            println!("{} paused", label(info, &name));
            Ok(0)
        }
        RolloutCmd::Resume { .. } => {
            patch(c, info, ns, &name, json!({"spec": {"paused": null}})).await?;
            println!("{} resumed", label(info, &name));
            Ok(0)
        }
    }
}

pub async fn scale(
    c: &Client,
    ns: &str,
    t: &str,
    name: Option<&str>,
    replicas: i64,
) -> Result<i32> {
    let (info, name) = target(t, name)?;
    if !matches!(
        info.kind,
        "Deployment" | "ReplicaSet" | "ReplicationController" | "StatefulSet"
    ) {
        bail!("cannot scale {}: only deployments, replicasets, replicationcontrollers and statefulsets scale", info.plural);
    }
    if replicas < 0 {
        bail!("--replicas={replicas}: must be 0 or more");
    }
    patch(c, info, ns, &name, json!({"spec": {"replicas": replicas}})).await?;
    println!("{} scaled", label(info, &name));
    Ok(0)
}
