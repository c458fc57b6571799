//! Probe bookkeeping with Kubernetes semantics (pure): when a probe is due,
//! and how results turn into a verdict through the success and failure
//! thresholds. Running a probe is the worker's.
use serde_json::Value;

/// The knobs of one probe, with Kubernetes' defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub initial_delay: f64,
    pub period: f64,
    pub timeout: f64,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl Spec {
    pub fn from(p: &Value) -> Option<Spec> {
        if !p.is_object() {
            return None;
        }
        let f = |k: &str, d: f64| p[k].as_f64().filter(|v| *v > 0.0).unwrap_or(d);
        Some(Spec {
            initial_delay: p["initialDelaySeconds"].as_f64().unwrap_or(0.0).max(0.0),
            period: f("periodSeconds", 10.0),
            timeout: f("timeoutSeconds", 1.0),
            success_threshold: f("successThreshold", 1.0) as u32,
            failure_threshold: f("failureThreshold", 3.0) as u32,
        })
    }
}

/// What one probe of one container instance has seen.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Prober {
    successes: u32,
    failures: u32,
    /// The verdict once a threshold was crossed.
    pub verdict: Option<bool>,
    last: Option<f64>,
}

impl Prober {
    /// Is a probe due at `now` for a container started at `started`?
    pub fn due(&self, s: &Spec, started: f64, now: f64) -> bool {
        if now < started + s.initial_delay {
            return false;
        }
        match self.last {
            None => true,
            Some(t) => now >= t + s.period,
        }
    }

    /// Record one result taken at `now`; returns the verdict when it changes.
    pub fn record(&mut self, s: &Spec, ok: bool, now: f64) -> Option<bool> {
        self.last = Some(now);
        if ok {
            self.successes += 1;
            self.failures = 0;
        } else {
            self.failures += 1;
            self.successes = 0;
        }
        let verdict = if ok && self.successes >= s.success_threshold {
            Some(true)
        } else if !ok && self.failures >= s.failure_threshold {
            Some(false)
        } else {
            None
        };
        match verdict {
            Some(v) if self.verdict != Some(v) => {
                self.verdict = Some(v);
                Some(v)
            }
            _ => None,
        }
    }
}

/// How to run a probe.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Http {
        port: u16,
        path: String,
        https: bool,
        headers: Vec<(String, String)>,
    },
    Tcp {
        port: u16,
    },
    Exec {
        command: Vec<String>,
    },
}

/// The action of probe `p` of container `c` (named ports resolved).
pub fn action(p: &Value, c: &Value) -> Result<Action, String> {
    let port = |v: &Value| -> Result<u16, String> {
        if let Some(n) = v.as_u64() {
            return u16::try_from(n).map_err(|_| format!("probe port {n} is out of range"));
        }
        let name = v.as_str().unwrap_or("");
        if let Ok(n) = name.parse::<u16>() {
            return Ok(n);
        }
        c["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|cp| cp["name"] == name)
            .and_then(|cp| cp["containerPort"].as_u64())
            .and_then(|n| u16::try_from(n).ok())
            .ok_or_else(|| format!("probe port \"{name}\" is not a named port of the container"))
    };
    if p["httpGet"].is_object() {
        let h = &p["httpGet"];
        Ok(Action::Http {
            port: port(&h["port"])?,
            path: h["path"]
                .as_str()
                .filter(|s| !s.is_empty())
                .unwrap_or("/")
                .to_string(),
            https: h["scheme"] == "HTTPS",
            headers: h["httpHeaders"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| {
                    Some((
                        x["name"].as_str()?.to_string(),
                        x["value"].as_str()?.to_string(),
                    ))
                })
                .collect(),
        })
    } else if p["tcpSocket"].is_object() {
        Ok(Action::Tcp {
            port: port(&p["tcpSocket"]["port"])?,
        })
    } else if p["exec"].is_object() {
        let command: Vec<String> = p["exec"]["command"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(String::from))
            .collect();
        if command.is_empty() {
            return Err("exec probe without a command".into());
        }
        Ok(Action::Exec { command })
    } else {
        Err("probe has no httpGet, tcpSocket or exec handler".into())
    }
}

/// Does an HTTP response's status line count as success (200-399)?
pub fn http_ok(response_head: &str) -> bool {
    response_head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .is_some_and(|c| (200..400).contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_follow_kubernetes() {
        let s = Spec::from(&json!({"httpGet": {"port": 80}})).unwrap();
        assert_eq!(
            s,
            Spec {
                initial_delay: 0.0,
                period: 10.0,
                timeout: 1.0,
                success_threshold: 1,
                failure_threshold: 3
            }
        );
        assert!(Spec::from(&Value::Null).is_none());
    }

    #[test]
    fn thresholds_decide() {
        let s =
            Spec::from(&json!({"failureThreshold": 2, "successThreshold": 2, "periodSeconds": 1}))
                .unwrap();
        let mut p = Prober::default();
        assert!(p.due(&s, 0.0, 0.0));
        assert_eq!(p.record(&s, true, 0.0), None);
        assert!(!p.due(&s, 0.0, 0.5));
        assert_eq!(p.record(&s, true, 1.0), Some(true));
        assert_eq!(p.record(&s, false, 2.0), None);
        assert_eq!(p.record(&s, false, 3.0), Some(false));
        assert_eq!(
            p.record(&s, false, 4.0),
            None,
            "the verdict is reported once"
        );
        let delayed = Spec::from(&json!({"initialDelaySeconds": 5})).unwrap();
        assert!(!Prober::default().due(&delayed, 100.0, 104.0));
        assert!(Prober::default().due(&delayed, 100.0, 105.0));
    }

    #[test]
    fn actions_resolve_named_ports() {
        let c = json!({"ports": [{"name": "http", "containerPort": 8080}]});
        assert_eq!(
            action(
                &json!({"httpGet": {"port": "http", "path": "/healthz"}}),
                &c
            )
            .unwrap(),
            Action::Http {
                port: 8080,
                path: "/healthz".into(),
                https: false,
                headers: vec![]
            }
        );
        assert_eq!(
            action(&json!({"tcpSocket": {"port": 53}}), &c).unwrap(),
            Action::Tcp { port: 53 }
        );
        assert!(action(&json!({"tcpSocket": {"port": "nope"}}), &c)
            .unwrap_err()
            .contains("nope"));
        assert!(http_ok("HTTP/1.1 204 No Content"));
        assert!(!http_ok("HTTP/1.0 500 Internal"));
    }
}
