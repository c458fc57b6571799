//! Reading manifests: multi-document YAML or JSON, `kind: List` expanded.
use serde_json::Value;

/// Every object in `text`, in order. Errors name the document that failed.
pub fn parse(text: &str) -> Result<Vec<Value>, String> {
    let trimmed = text.trim_start();
    let docs: Vec<Value> = if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let mut out = Vec::new();
        for (i, v) in serde_json::Deserializer::from_str(text)
            .into_iter::<Value>()
            .enumerate()
        {
            out.push(v.map_err(|e| format!("JSON document {}: {e}", i + 1))?);
        }
        out
    } else {
        serde_saphyr::from_multiple::<Value>(text).map_err(|e| format!("YAML: {e}"))?
    };
    let mut objects = Vec::new();
    for d in docs {
        match d {
            Value::Null => {}
            Value::Array(items) => objects.extend(items),
            Value::Object(ref m) if m.get("kind").and_then(Value::as_str) == Some("List") => {
                objects.extend(
                    m.get("items")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default(),
                )
            }
            Value::Object(_) => objects.push(d),
            other => return Err(format!("a manifest must hold objects, found {other}")),
        }
    }
    Ok(objects)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_yaml() {
        let y = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n---\n# comment\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata:\n  k: \"1\"\n";
        let objs = parse(y).unwrap();
        assert_eq!(objs.len(), 2);
        assert_eq!(objs[1]["data"]["k"], "1");
    }

    #[test]
    fn json_and_lists() {
        let j = r#"{"kind":"List","items":[{"kind":"A"},{"kind":"B"}]} {"kind":"C"}"#;
        assert_eq!(parse(j).unwrap().len(), 3);
    }

    #[test]
    fn malformed() {
        assert!(parse("a: [1, 2\nb: {").is_err());
        assert!(parse("{\"a\": ").is_err());
        assert!(parse("just a string").is_err());
    }
}

/// The merge patch `apply` sends: the new configuration, plus `null` for every
/// field the previous configuration set and the new one no longer does.
pub fn apply_patch(previous: &Value, desired: &Value) -> Value {
    match (previous.as_object(), desired.as_object()) {
        (Some(p), Some(d)) => {
            let mut out = serde_json::Map::new();
            for (k, v) in d {
                out.insert(
                    k.clone(),
                    match p.get(k) {
                        Some(pv) if pv.is_object() && v.is_object() => apply_patch(pv, v),
                        _ => v.clone(),
                    },
                );
            }
            for k in p.keys() {
                if !d.contains_key(k) {
                    out.insert(k.clone(), Value::Null);
                }
            }
            Value::Object(out)
        }
        _ => desired.clone(),
    }
}

#[cfg(test)]
mod apply_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn removed_fields_become_null() {
        let prev = json!({"data": {"a": "1", "b": "2"}, "metadata": {"labels": {"x": "y"}}});
        let new = json!({"data": {"a": "3"}, "metadata": {}});
        assert_eq!(
            apply_patch(&prev, &new),
            json!({"data": {"a": "3", "b": null}, "metadata": {"labels": null}})
        );
    }
}
