//! The manifests under `deploy/`, read with the k8s-openapi types.

use std::collections::BTreeSet;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::rbac::v1::{ClusterRole, Role};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::Value;

/// The YAML documents of `deploy/<file>`.
pub fn documents(file: &str) -> Result<Vec<Value>> {
    let path = format!("{}/../deploy/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).with_context(|| path.clone())?;
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v = serde_yaml_ng::Value::deserialize(doc)?;
        if !v.is_null() {
            out.push(serde_json::to_value(v)?);
        }
    }
    Ok(out)
}

/// `doc` read as `T` and written back: a field the type does not know (a typo) is lost on the
/// way and makes this fail.
pub fn typed<T: DeserializeOwned + serde::Serialize>(doc: &Value) -> Result<T> {
    let typed: T = serde_json::from_value(doc.clone())
        .with_context(|| format!("{} {}", doc["kind"], doc["metadata"]["name"]))?;
    let back = serde_json::to_value(&typed)?;
    if !contained(doc, &back) {
        bail!(
            "{} {}: fields not in the type (typos?):\nwritten: {doc}\nread back: {back}",
            doc["kind"],
            doc["metadata"]["name"]
        );
    }
    Ok(typed)
}

/// Is everything written in `doc` also in `back` (which may add defaults)?
fn contained(doc: &Value, back: &Value) -> bool {
    match (doc, back) {
        (Value::Object(d), Value::Object(b)) => d
            .iter()
            .all(|(k, v)| v.is_null() || b.get(k).is_some_and(|bv| contained(v, bv))),
        (Value::Array(d), Value::Array(b)) => {
            d.len() == b.len() && d.iter().zip(b).all(|(x, y)| contained(x, y))
        }
        (Value::Object(d), Value::Null) => d.is_empty(),
        _ => doc == back,
    }
}

/// Every (apiGroup, resource, verb) the ClusterRole and Role of `deploy/rbac.yaml` grant.
pub fn granted() -> Result<BTreeSet<(String, String, String)>> {
    let mut out = BTreeSet::new();
    for doc in documents("rbac.yaml")? {
        let rules = match doc["kind"].as_str() {
            Some("ClusterRole") => typed::<ClusterRole>(&doc)?.rules.unwrap_or_default(),
            Some("Role") => typed::<Role>(&doc)?.rules.unwrap_or_default(),
            _ => continue,
        };
        for rule in rules {
            for group in rule.api_groups.iter().flatten() {
                for resource in rule.resources.iter().flatten() {
                    for verb in &rule.verbs {
                        out.insert((group.clone(), resource.clone(), verb.clone()));
                    }
                }
            }
        }
    }
    Ok(out)
}
