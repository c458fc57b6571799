//! Reading manifests: multi-document YAML or JSON, `kind: List` expanded.
use serde_json::Value;

/// Every object in `text`, in order. Errors name the document that failed.
pub fn parse(text: &str) -> Result<Vec<Value>, String> {
    let trimmed = text.trim_start();
    let docs: Vec<Value> = if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let mut out = Vec::new();
        for (i, v) in serde_json::Deserializer::from_str(text).into_iter::<Value>().enumerate() {
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
                objects.extend(m.get("items").and_then(Value::as_array).cloned().unwrap_or_default())
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
