//! `orc logs` and `orc exec`: streams to and from a pod's container, through
//! any master, which relays them to the pod's node.
use anyhow::{Context, Result};
use clap::Args;
use futures::StreamExt;
use orc_api::request::{ExecRequest, LogsRequest, EXEC_EXIT, EXEC_STDERR, EXEC_STDOUT};
use orc_client::Client;
use std::io::{IsTerminal, Read, Write};

#[derive(Args)]
pub struct LogsArgs {
    pub pod: String,
    /// The container (needed when the pod has several).
    #[arg(short = 'c', long)]
    pub container: Option<String>,
    /// Keep streaming new output until the container ends.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// The previous instance of a restarted container.
    #[arg(short = 'p', long)]
    pub previous: bool,
    /// Only the last N lines.
    #[arg(long)]
    pub tail: Option<u64>,
    #[arg(long)]
    pub timestamps: bool,
}

#[derive(Args)]
pub struct ExecArgs {
    pub pod: String,
    #[arg(short = 'c', long)]
    pub container: Option<String>,
    /// Pass standard input to the command.
    #[arg(short = 'i', long)]
    pub stdin: bool,
    /// Allocate a terminal for the command.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

fn pod_name(p: &str) -> &str {
    p.strip_prefix("pod/")
        .or(p.strip_prefix("pods/"))
        .unwrap_or(p)
}

pub async fn logs(client: &Client, ns: &str, a: LogsArgs) -> Result<i32> {
    let req = LogsRequest {
        namespace: ns.into(),
        pod: pod_name(&a.pod).into(),
        container: a.container.unwrap_or_default(),
        follow: a.follow,
        previous: a.previous,
        tail_lines: a.tail,
        timestamps: a.timestamps,
    };
    let mut s = client.logs(&req).await?;
    let mut out = std::io::stdout();
    while let Some(chunk) = s.next().await {
        let chunk = chunk.map_err(|e| anyhow::anyhow!("{}", e.message()))?;
        out.write_all(&chunk.json)?;
        out.flush()?;
    }
    Ok(0)
}

/// The terminal in raw mode for the life of the value.
struct Raw(Option<nix::sys::termios::Termios>);

impl Raw {
    fn enter() -> Raw {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Raw(None);
        }
        let Ok(saved) = nix::sys::termios::tcgetattr(&stdin) else {
            return Raw(None);
        };
        let mut raw = saved.clone();
        nix::sys::termios::cfmakeraw(&mut raw);
        let _ = nix::sys::termios::tcsetattr(&stdin, nix::sys::termios::SetArg::TCSANOW, &raw);
        Raw(Some(saved))
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                t,
            );
        }
    }
}

pub async fn exec(client: &Client, ns: &str, a: ExecArgs) -> Result<i32> {
    let req = ExecRequest {
        namespace: ns.into(),
        pod: pod_name(&a.pod).into(),
        container: a.container.unwrap_or_default(),
        command: a.command,
        stdin: a.stdin,
        tty: a.tty,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    let mut s = client.exec(&req, rx).await?;
    let _raw = if a.tty && a.stdin {
        Raw::enter()
    } else {
        Raw(None)
    };
    if a.stdin {
        // A blocking reader: standard input may be a terminal.
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut input = std::io::stdin();
            loop {
                match input.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = tx.blocking_send(Vec::new());
                        break;
                    }
                    Ok(n) => {
                        if tx.blocking_send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    } else {
        drop(tx);
    }
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    let mut code = 1;
    while let Some(frame) = s.next().await {
        let frame = frame.map_err(|e| anyhow::anyhow!("{}", e.message()))?.json;
        let Some((&kind, data)) = frame.split_first() else {
            continue;
        };
        match kind {
            EXEC_STDOUT => {
                out.write_all(data)?;
                out.flush()?;
            }
            EXEC_STDERR => {
                err.write_all(data)?;
                err.flush()?;
            }
            EXEC_EXIT => {
                let v: serde_json::Value = serde_json::from_slice(data).context("exit frame")?;
                code = v["exitCode"].as_i64().unwrap_or(1) as i32;
            }
            _ => {}
        }
    }
    Ok(code)
}
