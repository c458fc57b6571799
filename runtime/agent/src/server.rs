//! The agent's `orc.Node` service, which the masters relay `orc logs` and
//! `orc exec` to: container output read from the CRI log files, and commands
//! run inside a container through `orc shim-exec` (with a pseudo-terminal
//! for `-t`).
use crate::worker::{self, Shared};
use futures::Stream;
use orc_api::request::{ExecRequest, LogsRequest, EXEC_EXIT, EXEC_STDERR, EXEC_STDOUT};
use orc_proto::node_server::{Node, NodeServer};
use orc_proto::Blob;
use serde_json::Value;
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::{Response, Status, Streaming};

type Out = Pin<Box<dyn Stream<Item = Result<Blob, Status>> + Send>>;

pub struct Service {
    s: Arc<Shared>,
}

pub async fn serve(s: Arc<Shared>, addr: SocketAddr) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(NodeServer::new(Service { s }))
        .serve(addr)
        .await
}

/// The pod `ns/name` this node runs, and its uid.
fn find_pod(s: &Shared, ns: &str, name: &str) -> Result<(String, Value), Status> {
    worker::recorded_pods(&s.pods_dir())
        .into_iter()
        .find(|(_, p)| p["metadata"]["namespace"] == ns && p["metadata"]["name"] == name)
        .ok_or_else(|| Status::not_found(format!("pod {ns}/{name} is not on node {}", s.cfg.name)))
}

/// The container a request names: given, or the only one.
fn container_name(p: &Value, asked: &str) -> Result<String, Status> {
    let names: Vec<&str> = ["initContainers", "containers"]
        .iter()
        .flat_map(|k| p["spec"][k].as_array().into_iter().flatten())
        .filter_map(|c| c["name"].as_str())
        .collect();
    let apps: Vec<&str> = p["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    if !asked.is_empty() {
        return names
            .contains(&asked)
            .then(|| asked.to_string())
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "container {asked} is not valid for pod {}; choose one of: {apps:?}",
                    p["metadata"]["name"].as_str().unwrap_or("")
                ))
            });
    }
    match apps.as_slice() {
        [one] => Ok(one.to_string()),
        _ => Err(Status::invalid_argument(format!(
            "a container name must be specified for pod {}, choose one of: {apps:?}",
            p["metadata"]["name"].as_str().unwrap_or("")
        ))),
    }
}

/// One CRI log line as output: the message, a newline unless partial.
pub fn render(line: &str, timestamps: bool) -> String {
    let mut parts = line.splitn(4, ' ');
    let (time, _stream, tag, msg) = (
        parts.next().unwrap_or(""),
        parts.next(),
        parts.next().unwrap_or("F"),
        parts.next().unwrap_or(""),
    );
    let mut out = String::new();
    if timestamps {
        out.push_str(time);
        out.push(' ');
    }
    out.push_str(msg);
    if tag != "P" {
        out.push('\n');
    }
    out
}

#[tonic::async_trait]
impl Node for Service {
    type LogsStream = Out;

    async fn logs(&self, r: tonic::Request<Blob>) -> Result<Response<Out>, Status> {
        let req: LogsRequest = serde_json::from_slice(&r.get_ref().json)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (uid, p) = find_pod(&self.s, &req.namespace, &req.pod)?;
        let container = container_name(&p, &req.container)?;
        let dir = worker::log_path(&self.s.cfg.data_dir, &p, &container, 0)
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default();
        let mut files: Vec<(u32, PathBuf)> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                Some((
                    e.file_name().to_str()?.strip_suffix(".log")?.parse().ok()?,
                    e.path(),
                ))
            })
            .collect();
        files.sort();
        let pick = if req.previous {
            files.len().checked_sub(2)
        } else {
            files.len().checked_sub(1)
        };
        let Some((attempt, file)) = pick.map(|i| files[i].clone()) else {
            return Err(Status::failed_precondition(if req.previous {
                format!(
                    "previous terminated container \"{container}\" in pod \"{}\" not found",
                    req.pod
                )
            } else {
                format!(
                    "container \"{container}\" in pod \"{}\" is waiting to start",
                    req.pod
                )
            }));
        };
        let id = format!("{uid}-{container}-{attempt}");
        let (tx, rx) = mpsc::channel::<Result<Blob, Status>>(64);
        let s = self.s.clone();
        tokio::spawn(async move {
            let mut f = match std::fs::File::open(&file) {
                Ok(f) => f,
                Err(e) => {
                    let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                    return;
                }
            };
            let mut text = String::new();
            let _ = f.read_to_string(&mut text);
            let mut pos = text.len() as u64;
            // Only complete lines; a partial one waits for its end.
            let cut = text.rfind('\n').map(|i| i + 1).unwrap_or(0);
            let mut pending = text[cut..].to_string();
            let lines: Vec<&str> = text[..cut].lines().collect();
            let skip = req
                .tail_lines
                .map(|n| lines.len().saturating_sub(n as usize))
                .unwrap_or(0);
            let first: String = lines[skip..]
                .iter()
                .map(|l| render(l, req.timestamps))
                .collect();
            if !first.is_empty()
                && tx
                    .send(Ok(Blob {
                        json: first.into_bytes(),
                    }))
                    .await
                    .is_err()
            {
                return;
            }
            if !req.follow {
                return;
            }
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let mut more = String::new();
                if f.seek(SeekFrom::Start(pos)).is_ok() {
                    let _ = f.read_to_string(&mut more);
                }
                pos += more.len() as u64;
                pending.push_str(&more);
                if let Some(i) = pending.rfind('\n') {
                    let chunk: String = pending[..=i]
                        .lines()
                        .map(|l| render(l, req.timestamps))
                        .collect();
                    pending.drain(..=i);
                    if tx
                        .send(Ok(Blob {
                            json: chunk.into_bytes(),
                        }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                } else if tx.is_closed() {
                    return;
                }
                if more.is_empty()
                    && !matches!(s.runtime.state(&id), orc_container::State::Running { .. })
                {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type ExecStream = Out;

    async fn exec(&self, r: tonic::Request<Streaming<Blob>>) -> Result<Response<Out>, Status> {
        let mut input = r.into_inner();
        let first = input
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("exec: no request"))?;
        let req: ExecRequest = serde_json::from_slice(&first.json)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if req.command.is_empty() {
            return Err(Status::invalid_argument("exec: a command is required"));
        }
        let (_, p) = find_pod(&self.s, &req.namespace, &req.pod)?;
        let container = container_name(&p, &req.container)?;
        let id = worker::running_container(&self.s, &p, &container).ok_or_else(|| {
            Status::failed_precondition(format!("container {container} is not running"))
        })?;
        // With a terminal, `orc shim-exec --tty` relays it over its pipes.
        let mut cmd = self.s.runtime.exec_command(&id, &req.command, req.tty);
        let (tx, rx) = mpsc::channel::<Result<Blob, Status>>(64);
        let frame = |kind: u8, data: &[u8]| {
            let mut v = Vec::with_capacity(data.len() + 1);
            v.push(kind);
            v.extend_from_slice(data);
            Blob { json: v }
        };
        {
            cmd.stdin(if req.stdin || req.tty {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            })
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
            let mut child = tokio::process::Command::from(cmd)
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| Status::internal(format!("exec: {e}")))?;
            let pumps: Vec<_> = [
                (
                    child
                        .stdout
                        .take()
                        .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
                    EXEC_STDOUT,
                ),
                (child.stderr.take().map(|o| Box::new(o) as _), EXEC_STDERR),
            ]
            .into_iter()
            .filter_map(|(r, k)| Some((r?, k)))
            .map(|(mut r, k)| {
                let tx = tx.clone();
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut buf = vec![0u8; 8192];
                    while let Ok(n) = r.read(&mut buf).await {
                        if n == 0 || tx.send(Ok(frame(k, &buf[..n]))).await.is_err() {
                            break;
                        }
                    }
                })
            })
            .collect();
            if let Some(mut stdin) = child.stdin.take() {
                tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt;
                    while let Ok(Some(b)) = input.message().await {
                        if b.json.is_empty() || stdin.write_all(&b.json).await.is_err() {
                            break;
                        }
                    }
                });
            }
            tokio::spawn(async move {
                let code = child
                    .wait()
                    .await
                    .map(|s| s.code().unwrap_or(255))
                    .unwrap_or(255);
                for p in pumps {
                    let _ = p.await;
                }
                let _ = tx
                    .send(Ok(frame(
                        EXEC_EXIT,
                        format!("{{\"exitCode\":{code}}}").as_bytes(),
                    )))
                    .await;
            });
        }
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_lines_render() {
        assert_eq!(
            render("2026-01-01T00:00:00Z stdout F hello world", false),
            "hello world\n"
        );
        assert_eq!(render("T stderr P part", false), "part");
        assert_eq!(render("T stdout F x", true), "T x\n");
    }
}
