//! Field and label selectors, as the apiserver parses them from `fieldSelector` and
//! `labelSelector`, and the filter a LIST or WATCH applies.

use serde_json::Value;

use super::store::{ApiError, Kind};

/// `fieldSelector`: comma-separated `path=value`, `path==value` or `path!=value`.
#[derive(Clone, Debug, Default)]
pub(crate) struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub(crate) fn parse(kind: Kind, s: &str) -> Result<Self, ApiError> {
        let mut terms = Vec::new();
        for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (key, equal, value) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{s}'; can't understand '{term}'"
                )));
            };
            let key = key.trim();
            if let Some(allowed) = kind.field_labels()
                && !allowed.contains(&key)
            {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {key}"
                )));
            }
            terms.push((key.to_owned(), equal, value.trim().to_owned()));
        }
        Ok(Self(terms))
    }

    pub(crate) fn matches(&self, obj: &Value) -> bool {
        self.0
            .iter()
            .all(|(path, equal, value)| (field_value(obj, path) == *value) == *equal)
    }
}

/// The value at a dotted path as a field selector sees it: missing or null is "".
fn field_value(obj: &Value, path: &str) -> String {
    let v = path.split('.').fold(obj, |v, key| &v[key]);
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[derive(Clone, Debug)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// `labelSelector`: `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`, `!k`.
#[derive(Clone, Debug, Default)]
pub(crate) struct LabelSelector(Vec<Requirement>);

impl LabelSelector {
    pub(crate) fn parse(s: &str) -> Result<Self, ApiError> {
        let bad = |term: &str| {
            ApiError::bad_request(format!(
                "unable to parse requirement: invalid label selector: '{s}' ('{term}')"
            ))
        };
        let mut reqs = Vec::new();
        for term in split_top_level(s) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            let req = if let Some(open) = term.find('(') {
                let Some(inner) = term[open + 1..].strip_suffix(')') else {
                    return Err(bad(term));
                };
                let values = inner
                    .split(',')
                    .map(|v| v.trim().to_owned())
                    .filter(|v| !v.is_empty())
                    .collect();
                let head = term[..open].trim_end();
                if let Some(key) = head.strip_suffix("notin")
                    && key.ends_with(char::is_whitespace)
                {
                    Requirement::NotIn(key.trim().to_owned(), values)
                } else if let Some(key) = head.strip_suffix("in")
                    && key.ends_with(char::is_whitespace)
                {
                    Requirement::In(key.trim().to_owned(), values)
                } else {
                    return Err(bad(term));
                }
            } else if let Some(key) = term.strip_prefix('!') {
                Requirement::NotExists(key.trim().to_owned())
            } else if let Some((k, v)) = term.split_once("!=") {
                Requirement::NotEquals(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some((k, v)) = term.split_once("==") {
                Requirement::Equals(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some((k, v)) = term.split_once('=') {
                Requirement::Equals(k.trim().to_owned(), v.trim().to_owned())
            } else if term.contains(char::is_whitespace) {
                return Err(bad(term));
            } else {
                Requirement::Exists(term.to_owned())
            };
            reqs.push(req);
        }
        Ok(Self(reqs))
    }

    pub(crate) fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        let label = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|req| match req {
            Requirement::Equals(k, v) => label(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            Requirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => label(k).is_none_or(|l| vs.iter().all(|v| v != l)),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::NotExists(k) => label(k).is_none(),
        })
    }
}

/// Splits on the commas that are not inside `( )`.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0_i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// Which objects a LIST or WATCH request selects.
#[derive(Clone, Debug)]
pub(crate) struct Filter {
    pub(crate) kind: Kind,
    pub(crate) namespace: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) fields: FieldSelector,
    pub(crate) labels: LabelSelector,
}

impl Filter {
    pub(crate) fn matches(&self, obj: &Value) -> bool {
        let meta = &obj["metadata"];
        self.namespace
            .as_deref()
            .is_none_or(|ns| meta["namespace"].as_str() == Some(ns))
            && self
                .name
                .as_deref()
                .is_none_or(|n| meta["name"].as_str() == Some(n))
            && self.fields.matches(obj)
            && self.labels.matches(obj)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn selectors() {
        let pod = json!({
            "metadata": { "name": "p", "labels": { "app": "web", "tier": "fe" } },
            "spec": { "nodeName": "node-a", "hostNetwork": false },
        });
        let f = |s| FieldSelector::parse(Kind::Pod, s).unwrap().matches(&pod);
        assert!(f("spec.nodeName=node-a"));
        assert!(f("spec.nodeName==node-a,metadata.name=p"));
        assert!(!f("spec.nodeName=node-b"));
        assert!(f("spec.nodeName!=node-b"));
        assert!(f("spec.hostNetwork=false"));
        assert!(f("status.phase="));
        assert!(FieldSelector::parse(Kind::Pod, "spec.foo=x").is_err());

        let l = |s| LabelSelector::parse(s).unwrap().matches(&pod);
        assert!(l("app=web"));
        assert!(l("app==web,tier=fe"));
        assert!(!l("app=db"));
        assert!(l("app!=db"));
        assert!(l("missing!=x"));
        assert!(l("app in (db, web)"));
        assert!(!l("app notin (db,web)"));
        assert!(l("app in (web),tier notin (be)"));
        assert!(l("app"));
        assert!(l("!missing"));
        assert!(!l("!app"));
        assert!(l(""));
        assert!(LabelSelector::parse("app in web").is_err());
    }
}
