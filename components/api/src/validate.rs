//! Admission: the checks Kubernetes makes on every body (kind, names, labels,
//! annotations, unknown fields), turning a user's JSON into the stored form.
use crate::error::ApiError;
use crate::resources::{self, ResourceInfo};
use serde_json::Value;

fn is_alnum_lower(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// DNS-1123 label: at most 63 lower-case alphanumerics or '-', starting and ending alphanumeric.
pub fn dns1123_label(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 63 {
        return Err(format!("\"{s}\": must be 1-63 characters"));
    }
    let ok = s.chars().all(|c| is_alnum_lower(c) || c == '-')
        && s.starts_with(is_alnum_lower)
        && s.ends_with(is_alnum_lower);
    if ok {
        Ok(())
    } else {
        Err(format!("\"{s}\": a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"))
    }
}

/// DNS-1123 subdomain: at most 253 characters, dot-separated labels.
pub fn dns1123_subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 253 {
        return Err(format!("\"{s}\": must be 1-253 characters"));
    }
    let ok = s.chars().all(|c| is_alnum_lower(c) || c == '-' || c == '.')
        && s.starts_with(is_alnum_lower)
        && s.ends_with(is_alnum_lower)
        && !s.contains("..");
    if ok {
        Ok(())
    } else {
        Err(format!("\"{s}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"))
    }
}

fn qualified_name_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// A label or annotation key: `[prefix/]name`.
pub fn qualified_name(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        dns1123_subdomain(p).map_err(|e| format!("key \"{key}\": prefix {e}"))?;
    }
    if qualified_name_part(name) {
        Ok(())
    } else {
        Err(format!("key \"{key}\": name part must be 1-63 alphanumeric characters, '-', '_' or '.', starting and ending with an alphanumeric character"))
    }
}

/// A label value: empty, or at most 63 characters of the qualified-name alphabet.
pub fn label_value(v: &str) -> Result<(), String> {
    if v.is_empty() || qualified_name_part(v) {
        Ok(())
    } else {
        Err(format!("value \"{v}\": must be empty or 1-63 alphanumeric characters, '-', '_' or '.', starting and ending with an alphanumeric character"))
    }
}

/// Validate metadata fields the typed parse cannot judge.
fn check_metadata(info: &ResourceInfo, meta: &Value, errs: &mut Vec<String>) {
    if let Some(name) = meta.get("name").and_then(Value::as_str) {
        let r = if matches!(info.kind, "Namespace" | "Service") {
            dns1123_label(name)
        } else {
            dns1123_subdomain(name)
        };
        if let Err(e) = r {
            errs.push(format!("metadata.name: Invalid value: {e}"));
        }
    }
    if let Some(labels) = meta.get("labels").and_then(Value::as_object) {
        for (k, v) in labels {
            if let Err(e) = qualified_name(k) {
                errs.push(format!("metadata.labels: Invalid value: {e}"));
            }
            if let Err(e) = label_value(v.as_str().unwrap_or("")) {
                errs.push(format!("metadata.labels: Invalid value: {e}"));
            }
        }
    }
    if let Some(ann) = meta.get("annotations").and_then(Value::as_object) {
        let mut total = 0;
        for (k, v) in ann {
            if let Err(e) = qualified_name(k) {
                errs.push(format!("metadata.annotations: Invalid value: {e}"));
            }
            total += k.len() + v.as_str().map(str::len).unwrap_or(0);
        }
        if total > 256 * 1024 {
            errs.push(format!(
                "metadata.annotations: Too long: must have at most 262144 bytes, has {total}"
            ));
        }
    }
}

/// The resource a body names by apiVersion and kind, or a clear error.
pub fn resource_of(obj: &Value) -> Result<&'static ResourceInfo, ApiError> {
    let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
    if api_version.is_empty() {
        return Err(ApiError::bad_request("apiVersion not set in the object"));
    }
    if kind.is_empty() {
        return Err(ApiError::bad_request("kind not set in the object"));
    }
    resources::by_kind(api_version, kind).ok_or_else(|| {
        ApiError::bad_request(format!(
            "no matches for kind \"{kind}\" in version \"{api_version}\""
        ))
    })
}

/// Validate and normalise a user's body for `info`. Returns the stored form.
pub fn admit(info: &ResourceInfo, obj: Value) -> Result<Value, ApiError> {
    if !obj.is_object() {
        return Err(ApiError::bad_request(
            "the body must be a JSON or YAML object",
        ));
    }
    let mut errs = Vec::new();
    check_metadata(info, obj.get("metadata").unwrap_or(&Value::Null), &mut errs);
    let typed = match (info.validator)(obj) {
        Ok(v) => Some(v),
        Err(mut e) => {
            errs.append(&mut e);
            None
        }
    };
    match typed {
        Some(v) if errs.is_empty() => Ok(v),
        _ => Err(ApiError::invalid(format!(
            "{} is invalid: {}",
            info.kind,
            errs.join("; ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names() {
        assert!(dns1123_label("web-1").is_ok());
        assert!(dns1123_label("Web").is_err());
        assert!(dns1123_label("-a").is_err());
        assert!(dns1123_label(&"a".repeat(64)).is_err());
        assert!(dns1123_subdomain("a.b-c").is_ok());
        assert!(dns1123_subdomain("a..b").is_err());
        assert!(dns1123_subdomain("a_b").is_err());
    }

    #[test]
    fn labels() {
        assert!(qualified_name("app.kubernetes.io/name").is_ok());
        assert!(qualified_name("app").is_ok());
        assert!(qualified_name("-app").is_err());
        assert!(qualified_name("Bad_Prefix/app").is_err());
        assert!(label_value("").is_ok());
        assert!(label_value("v1.2_3").is_ok());
        assert!(label_value("has space").is_err());
    }

    #[test]
    fn admit_names_the_fault() {
        let info = resources::lookup("cm").unwrap();
        let bad = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "Bad_Name", "labels": {"a": "b c"}}});
        let e = admit(info, bad).unwrap_err();
        assert_eq!(e.reason, crate::Reason::Invalid);
        assert!(e.message.contains("metadata.name"), "{}", e.message);
        assert!(e.message.contains("metadata.labels"), "{}", e.message);
        let unknown =
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ok"}, "dta": {}});
        assert!(admit(info, unknown)
            .unwrap_err()
            .message
            .contains("unknown field \"dta\""));
    }

    #[test]
    fn resource_of_unknown_kind() {
        let e = resource_of(&json!({"apiVersion": "v9", "kind": "Widget"})).unwrap_err();
        assert!(e.message.contains("Widget"));
        assert!(resource_of(&json!({"kind": "Pod"}))
            .unwrap_err()
            .message
            .contains("apiVersion"));
    }
}
