//! Label selectors (equality- and set-based, as in `-l`) and field selectors on the
//! fields orc indexes: `metadata.name`, `metadata.namespace`, `spec.nodeName`, `status.phase`.
use crate::error::ApiError;
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl Requirement {
    /// Against labels given by a lookup (a map, or an object's JSON labels:
    /// no copy is made of them).
    fn matches<'a>(&self, get: impl Fn(&str) -> Option<&'a str>) -> bool {
        match self {
            Requirement::Eq(k, v) => get(k) == Some(v.as_str()),
            Requirement::NotEq(k, v) => get(k) != Some(v.as_str()),
            Requirement::In(k, vs) => get(k).is_some_and(|v| vs.iter().any(|w| w == v)),
            Requirement::NotIn(k, vs) => get(k).is_none_or(|v| !vs.iter().any(|w| w == v)),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
        }
    }
}

/// A conjunction of requirements; empty matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(pub Vec<Requirement>);

/// Split at commas that are not inside parentheses.
fn split_top(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur);
    out.into_iter()
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

fn check_key(k: &str, all: &str) -> Result<String, ApiError> {
    crate::validate::qualified_name(k)
        .map_err(|e| ApiError::bad_request(format!("invalid label selector \"{all}\": {e}")))?;
    Ok(k.to_string())
}

fn parse_set(rest: &str, all: &str) -> Result<Vec<String>, ApiError> {
    let rest = rest.trim();
    if !(rest.starts_with('(') && rest.ends_with(')')) {
        return Err(ApiError::bad_request(format!(
            "invalid label selector \"{all}\": expected a parenthesised set of values"
        )));
    }
    Ok(rest[1..rest.len() - 1]
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        for part in split_top(s) {
            let r = if let Some(k) = part.strip_prefix('!') {
                Requirement::NotExists(check_key(k.trim(), s)?)
            } else if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEq(check_key(k.trim(), s)?, v.trim().to_string())
            } else if let Some((k, v)) = part.split_once("==") {
                Requirement::Eq(check_key(k.trim(), s)?, v.trim().to_string())
            } else if let Some((k, v)) = part.split_once('=') {
                Requirement::Eq(check_key(k.trim(), s)?, v.trim().to_string())
            } else if let Some((k, rest)) = part.split_once(" notin ") {
                Requirement::NotIn(check_key(k.trim(), s)?, parse_set(rest, s)?)
            } else if let Some((k, rest)) = part.split_once(" in ") {
                Requirement::In(check_key(k.trim(), s)?, parse_set(rest, s)?)
            } else if part.contains(' ') || part.contains('(') {
                return Err(ApiError::bad_request(format!(
                    "invalid label selector \"{s}\": cannot parse \"{part}\""
                )));
            } else {
                Requirement::Exists(check_key(&part, s)?)
            };
            reqs.push(r);
        }
        Ok(LabelSelector(reqs))
    }

    /// From a Kubernetes `LabelSelector` object (`matchLabels`, `matchExpressions`).
    pub fn from_object(sel: &Value) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        if let Some(ml) = sel.get("matchLabels").and_then(Value::as_object) {
            for (k, v) in ml {
                reqs.push(Requirement::Eq(
                    k.clone(),
                    v.as_str().unwrap_or("").to_string(),
                ));
            }
        }
        for e in sel
            .get("matchExpressions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let key = e
                .get("key")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let values: Vec<String> = e
                .get("values")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            reqs.push(match e.get("operator").and_then(Value::as_str) {
                Some("In") => Requirement::In(key, values),
                Some("NotIn") => Requirement::NotIn(key, values),
                Some("Exists") => Requirement::Exists(key),
                Some("DoesNotExist") => Requirement::NotExists(key),
                other => {
                    return Err(ApiError::invalid(format!(
                        "matchExpressions: invalid operator {other:?}"
                    )))
                }
            });
        }
        Ok(LabelSelector(reqs))
    }

    /// Whether a set of labels satisfies every requirement.
    pub fn matches_labels(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0
            .iter()
            .all(|r| r.matches(|k| labels.get(k).map(String::as_str)))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether an object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj
            .get("metadata")
            .and_then(|m| m.get("labels"))
            .and_then(Value::as_object);
        self.0.iter().all(|r| {
            r.matches(|k| {
                labels
                    .and_then(|m| m.get(k))
                    .map(|v| v.as_str().unwrap_or(""))
            })
        })
    }
}

/// The fields a field selector may name, and where they live in an object.
const FIELDS: &[(&str, &str)] = &[
    ("metadata.name", "/metadata/name"),
    ("metadata.namespace", "/metadata/namespace"),
    ("spec.nodeName", "/spec/nodeName"),
    ("status.phase", "/status/phase"),
];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(&'static str, bool, String)>);

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, eq, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector \"{part}\": expected FIELD=VALUE or FIELD!=VALUE"
                )));
            };
            let field = field.trim();
            let Some((_, pointer)) = FIELDS.iter().find(|(f, _)| *f == field) else {
                let known: Vec<&str> = FIELDS.iter().map(|(f, _)| *f).collect();
                return Err(ApiError::bad_request(format!(
                    "field selector \"{field}\" is not supported; supported: {}",
                    known.join(", ")
                )));
            };
            out.push((*pointer, eq, value.trim().to_string()));
        }
        Ok(FieldSelector(out))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(ptr, eq, want)| {
            let have = obj.pointer(ptr).and_then(Value::as_str).unwrap_or("");
            (have == want) == *eq
        })
    }
}

/// The parts of an object that label and field selectors read: enough to judge
/// whether an earlier version of an object matched a selector.
pub fn selector_view(obj: &Value) -> Value {
    let mut view = serde_json::json!({});
    for (_, ptr) in FIELDS {
        if let Some(v) = obj.pointer(ptr) {
            set_pointer(&mut view, ptr, v.clone());
        }
    }
    if let Some(l) = obj.pointer("/metadata/labels") {
        set_pointer(&mut view, "/metadata/labels", l.clone());
    }
    view
}

fn set_pointer(root: &mut Value, ptr: &str, v: Value) {
    let mut cur = root;
    let parts: Vec<&str> = ptr.trim_start_matches('/').split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        let map = cur.as_object_mut().expect("objects along the path");
        if i == parts.len() - 1 {
            map.insert(part.to_string(), v);
            return;
        }
        cur = map
            .entry(part.to_string())
            .or_insert_with(|| serde_json::json!({}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns", "labels": labels}, "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}})
    }

    #[test]
    fn equality_and_sets() {
        let o = obj(json!({"app": "web", "tier": "front"}));
        for (sel, want) in [
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app=web,tier=back", false),
            ("tier in (front, back)", true),
            ("tier notin (front)", false),
            ("env notin (prod)", true),
            ("app", true),
            ("!app", false),
            ("!env", true),
            ("app in (web),tier", true),
            ("", true),
        ] {
            assert_eq!(
                LabelSelector::parse(sel).unwrap().matches(&o),
                want,
                "{sel}"
            );
        }
        assert!(LabelSelector::parse("app in web").is_err());
        assert!(LabelSelector::parse("bad key=1").is_err());
    }

    #[test]
    fn from_object() {
        let s = LabelSelector::from_object(&json!({"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "tier", "operator": "In", "values": ["front"]}]})).unwrap();
        assert!(s.matches(&obj(json!({"app": "web", "tier": "front"}))));
        assert!(!s.matches(&obj(json!({"app": "web"}))));
    }

    #[test]
    fn selector_view_keeps_what_selectors_read() {
        let mut o = obj(json!({"app": "web"}));
        o["spec"]["containers"] = json!([{"name": "c"}]);
        let v = selector_view(&o);
        assert!(v.pointer("/spec/containers").is_none());
        for sel in ["app=web", "app!=web", "!app"] {
            let ls = LabelSelector::parse(sel).unwrap();
            assert_eq!(ls.matches(&v), ls.matches(&o), "{sel}");
        }
        for sel in [
            "metadata.name=a",
            "spec.nodeName=n1",
            "status.phase!=Running",
            "metadata.namespace=ns",
        ] {
            let fs = FieldSelector::parse(sel).unwrap();
            assert_eq!(fs.matches(&v), fs.matches(&o), "{sel}");
        }
    }

    #[test]
    fn fields() {
        let o = obj(json!({}));
        assert!(FieldSelector::parse("metadata.name=a,spec.nodeName=n1")
            .unwrap()
            .matches(&o));
        assert!(!FieldSelector::parse("status.phase!=Running")
            .unwrap()
            .matches(&o));
        assert!(FieldSelector::parse("metadata.namespace==ns")
            .unwrap()
            .matches(&o));
        let e = FieldSelector::parse("spec.foo=1").unwrap_err();
        assert!(e.message.contains("spec.foo"));
    }
}
