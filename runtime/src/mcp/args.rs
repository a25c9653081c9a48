//! A tool call's arguments, checked field by field: unknown names refused, each
//! value of the type its schema says, with a message that names the field.

use std::ops::RangeInclusive;

use serde_json::{Map, Value};

/// The `arguments` object of a `tools/call`.
pub(super) struct Args<'a> {
    obj: &'a Map<String, Value>,
}

impl<'a> Args<'a> {
    /// Checks that `args` is an object whose names are all in `known`.
    pub(super) fn new(args: &'a Value, known: &[&str]) -> Result<Self, String> {
        let obj = args.as_object().ok_or("arguments must be an object")?;
        if let Some(extra) = obj.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(format!("unknown argument {extra:?}"));
        }
        Ok(Self { obj })
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    /// An optional string.
    pub(super) fn text(&self, key: &str) -> Result<Option<String>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("{key} must be a string")),
        }
    }

    /// A string that must be there.
    pub(super) fn required_text(&self, key: &str) -> Result<String, String> {
        self.text(key)?.ok_or_else(|| format!("{key} is required"))
    }

    /// An optional integer in `range`, else `default`.
    pub(super) fn number(
        &self,
        key: &str,
        range: RangeInclusive<u64>,
        default: u64,
    ) -> Result<u64, String> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_u64().filter(|n| range.contains(n)).ok_or(format!(
                "{key} must be an integer in {}..={}",
                range.start(),
                range.end()
            )),
        }
    }

    /// A program and its arguments: a non-empty list of strings.
    pub(super) fn command(&self, key: &str) -> Result<Vec<String>, String> {
        let command: Vec<String> = self
            .get(key)
            .and_then(Value::as_array)
            .ok_or(format!(
                "{key} must be a list of strings, the program first"
            ))?
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or(format!("{key} must be a list of strings"))?;
        if command.is_empty() {
            return Err(format!("{key} is empty"));
        }
        Ok(command)
    }

    /// An object of string values (environment variables).
    pub(super) fn env(&self, key: &str) -> Result<Vec<(String, String)>, String> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                .collect::<Option<_>>()
                .ok_or(format!("{key} values must be strings")),
            Some(_) => Err(format!("{key} must be an object of strings")),
        }
    }

    /// An optional list of strings (empty when absent).
    pub(super) fn texts(&self, key: &str) -> Result<Vec<String>, String> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or(format!("{key} must be a list of strings")),
            Some(_) => Err(format!("{key} must be a list of strings")),
        }
    }

    /// Secrets the guest sees only as placeholders: a list of objects
    /// `{name, placeholder, host}`, each field a string, nothing else in them.
    pub(super) fn substitutions(&self, key: &str) -> Result<Vec<Substitution>, String> {
        let Some(value) = self.get(key) else {
            return Ok(Vec::new());
        };
        let list = value.as_array().ok_or(format!(
            "{key} must be a list of {{name, placeholder, host}}"
        ))?;
        list.iter()
            .enumerate()
            .map(|(i, item)| {
                let item = Args::new(item, &["name", "placeholder", "host"])
                    .map_err(|e| format!("{key}[{i}]: {e}"))?;
                let field = |f: &str| {
                    item.required_text(f)
                        .map_err(|e| format!("{key}[{i}]: {e}"))
                };
                Ok(Substitution {
                    name: field("name")?,
                    placeholder: field("placeholder")?,
                    host: field("host")?,
                })
            })
            .collect()
    }
}

/// One entry of `secrets_for`: the stored secret `name`, the `placeholder` the guest
/// sees, the `host` whose HTTPS requests get the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Substitution {
    pub name: String,
    pub placeholder: String,
    pub host: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_field_is_checked_and_named() {
        let v = json!({"a": "x", "n": 5, "c": ["ls", "-l"], "e": {"K": "V"}});
        let args = Args::new(&v, &["a", "n", "c", "e"]).unwrap();
        assert_eq!(args.text("a").unwrap().as_deref(), Some("x"));
        assert_eq!(args.number("n", 1..=10, 3).unwrap(), 5);
        assert_eq!(args.number("missing", 1..=10, 3).unwrap(), 3);
        assert!(args.number("n", 6..=10, 7).unwrap_err().contains("n must"));
        assert_eq!(args.command("c").unwrap(), ["ls", "-l"]);
        assert_eq!(args.env("e").unwrap(), [("K".into(), "V".into())]);
        assert!(args.text("n").is_err());
        assert!(args
            .required_text("zz")
            .unwrap_err()
            .contains("zz is required"));
        assert!(Args::new(&v, &["a"]).is_err(), "unknown names are refused");
        assert!(Args::new(&json!([1]), &[]).is_err());
        let empty = json!({"c": []});
        assert!(Args::new(&empty, &["c"]).unwrap().command("c").is_err());
    }

    #[test]
    fn substitutions_are_objects_of_three_strings() {
        let v = json!({"s": [{"name": "T", "placeholder": "P", "host": "api.example.com"}]});
        let args = Args::new(&v, &["s"]).unwrap();
        assert_eq!(
            args.substitutions("s").unwrap(),
            [Substitution {
                name: "T".into(),
                placeholder: "P".into(),
                host: "api.example.com".into()
            }]
        );
        assert!(args.substitutions("none").unwrap().is_empty());
        for bad in [
            json!({"s": "T"}),
            json!({"s": ["T"]}),
            json!({"s": [{"name": "T", "placeholder": "P"}]}),
            json!({"s": [{"name": "T", "placeholder": "P", "host": 443}]}),
            json!({"s": [{"name": "T", "placeholder": "P", "host": "h", "value": "v"}]}),
        ] {
            let args = Args::new(&bad, &["s"]).unwrap();
            let err = args.substitutions("s").unwrap_err();
            assert!(err.starts_with("s"), "{err}");
        }
    }
}
