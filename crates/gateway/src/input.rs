//! Reading client input without trusting it: JSON bodies (malformed JSON → `malformed_json`,
//! over the size limit → `payload_too_large`), objects read field by field so every error names
//! its field (`scans[3].quantity`), unknown fields refused, and query strings read the same way.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use serde_json::{Map, Value};

use crate::problem::{FieldError, Problem};

/// Longest identifier (work order, lot, station, device, material, location, defect code).
pub const MAX_IDENT: usize = 64;
/// Longest free text (reasons).
pub const MAX_TEXT: usize = 500;

/// The body as JSON, or the problem to answer.
pub fn json_body(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Value, Problem> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::payload_too_large(limit)
        } else {
            Problem::malformed_json("the request body could not be read")
        }
    })?;
    if bytes.len() > limit {
        return Err(Problem::payload_too_large(limit));
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(Problem::malformed_json(
            "the request body is empty; a JSON object is expected",
        ));
    }
    serde_json::from_slice::<Value>(&bytes).map_err(|e| {
        Problem::malformed_json(format!(
            "the body is not valid JSON: {} at line {} column {}",
            classify(&e),
            e.line(),
            e.column()
        ))
    })
}

fn classify(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Eof => "unexpected end of input",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "invalid data",
        serde_json::error::Category::Io => "unreadable input",
    }
}

/// Whether `s` is a plant identifier: 1..=64 of `A-Z a-z 0-9 . _ : / # + -`.
pub fn is_ident(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_IDENT
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:/#+".contains(&b))
}

pub const IDENT_RULE: &str = "must be 1 to 64 characters of letters, digits and . _ : / # + -";

/// A path segment that must be an identifier.
pub fn path_ident(name: &str, value: &str) -> Result<String, Problem> {
    if is_ident(value) {
        Ok(value.to_owned())
    } else {
        Err(Problem::field(name, IDENT_RULE))
    }
}

/// Reads a JSON object field by field, collecting errors that name each field.
pub struct Fields<'a> {
    obj: Option<&'a Map<String, Value>>,
    path: String,
    known: Vec<&'static str>,
    pub errors: Vec<FieldError>,
}

impl<'a> Fields<'a> {
    /// `value` must be an object; `path` is its location (empty for the body itself).
    pub fn new(value: &'a Value, path: &str) -> Self {
        let mut f = Self {
            obj: value.as_object(),
            path: path.to_owned(),
            known: Vec::new(),
            errors: Vec::new(),
        };
        if f.obj.is_none() {
            let name = if path.is_empty() { "body" } else { path };
            f.errors.push(FieldError::new(
                name,
                format!("must be a JSON object, not {}", type_name(value)),
            ));
        }
        f
    }

    pub fn path_of(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    pub fn error(&mut self, name: &str, message: impl Into<String>) {
        let field = self.path_of(name);
        self.errors.push(FieldError::new(field, message));
    }

    /// The raw value of `name` (`null` counts as absent); records it as a known field.
    pub fn raw(&mut self, name: &'static str) -> Option<&'a Value> {
        self.known.push(name);
        self.obj?.get(name).filter(|v| !v.is_null())
    }

    fn required(&mut self, name: &'static str, required: bool) {
        if required && self.obj.is_some() {
            self.error(name, "is required");
        }
    }

    /// A string field (trimmed strings only: leading or trailing blanks are refused).
    pub fn string(&mut self, name: &'static str, required: bool, max: usize) -> Option<String> {
        match self.raw(name) {
            None => {
                self.required(name, required);
                None
            }
            Some(Value::String(s)) if s.is_empty() => {
                self.error(name, "must not be empty");
                None
            }
            Some(Value::String(s)) if s.chars().count() > max => {
                self.error(name, format!("must be at most {max} characters"));
                None
            }
            Some(Value::String(s)) if s.chars().any(char::is_control) => {
                self.error(name, "must not contain control characters");
                None
            }
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                self.error(name, format!("must be a string, not {}", type_name(other)));
                None
            }
        }
    }

    /// An identifier field (see [`is_ident`]).
    pub fn ident(&mut self, name: &'static str, required: bool) -> Option<String> {
        let s = self.string(name, required, MAX_TEXT)?;
        if is_ident(&s) {
            Some(s)
        } else {
            self.error(name, IDENT_RULE);
            None
        }
    }

    pub fn boolean(&mut self, name: &'static str, required: bool) -> Option<bool> {
        match self.raw(name) {
            None => {
                self.required(name, required);
                None
            }
            Some(Value::Bool(b)) => Some(*b),
            Some(other) => {
                self.error(
                    name,
                    format!("must be true or false, not {}", type_name(other)),
                );
                None
            }
        }
    }

    /// An integer in `min..=max`.
    pub fn integer(
        &mut self,
        name: &'static str,
        required: bool,
        min: u64,
        max: u64,
    ) -> Option<u64> {
        match self.raw(name) {
            None => {
                self.required(name, required);
                None
            }
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) if (min..=max).contains(&v) => Some(v),
                _ => {
                    self.error(name, format!("must be an integer from {min} to {max}"));
                    None
                }
            },
            Some(other) => {
                self.error(
                    name,
                    format!("must be an integer, not {}", type_name(other)),
                );
                None
            }
        }
    }

    /// Ends reading: every field not read is unknown.
    pub fn finish(mut self) -> Vec<FieldError> {
        if let Some(obj) = self.obj {
            let unknown: Vec<String> = obj
                .keys()
                .filter(|k| !self.known.contains(&k.as_str()))
                .cloned()
                .collect();
            for k in unknown {
                let field = self.path_of(&k);
                self.errors
                    .push(FieldError::new(field, "is not a known field"));
            }
        }
        self.errors
    }
}

pub use mes_common::errors::json_type as type_name;

/// Query parameters read like [`Fields`]: unknown or repeated parameters are refused.
pub struct Params {
    values: BTreeMap<String, String>,
    known: Vec<&'static str>,
    pub errors: Vec<FieldError>,
}

impl Params {
    pub fn new(pairs: Vec<(String, String)>) -> Self {
        let mut values = BTreeMap::new();
        let mut errors = Vec::new();
        for (k, v) in pairs {
            if values.insert(k.clone(), v).is_some() {
                errors.push(FieldError::new(k, "must be given at most once"));
            }
        }
        Self {
            values,
            known: Vec::new(),
            errors,
        }
    }

    /// The value of `name`; an empty value counts as absent.
    pub fn get(&mut self, name: &'static str) -> Option<String> {
        self.known.push(name);
        self.values.get(name).filter(|v| !v.is_empty()).cloned()
    }

    pub fn ident(&mut self, name: &'static str) -> Option<String> {
        let v = self.get(name)?;
        if is_ident(&v) {
            Some(v)
        } else {
            self.errors.push(FieldError::new(name, IDENT_RULE));
            None
        }
    }

    pub fn one_of(&mut self, name: &'static str, allowed: &[&str]) -> Option<String> {
        let v = self.get(name)?;
        if allowed.contains(&v.as_str()) {
            Some(v)
        } else {
            self.errors.push(FieldError::new(
                name,
                format!("must be one of: {}", allowed.join(", ")),
            ));
            None
        }
    }

    pub fn integer(&mut self, name: &'static str, min: u64, max: u64) -> Option<u64> {
        let v = self.get(name)?;
        match v.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                self.errors.push(FieldError::new(
                    name,
                    format!("must be an integer from {min} to {max}"),
                ));
                None
            }
        }
    }

    pub fn time(&mut self, name: &'static str) -> Option<chrono::DateTime<chrono::Utc>> {
        let v = self.get(name)?;
        match chrono::DateTime::parse_from_rfc3339(&v) {
            Ok(t) => Some(t.with_timezone(&chrono::Utc)),
            Err(_) => {
                self.errors.push(FieldError::new(
                    name,
                    "must be an RFC 3339 time with offset, e.g. 2025-01-31T08:00:00Z",
                ));
                None
            }
        }
    }

    /// Ends reading: unknown parameters are errors; `Err` when anything is wrong.
    pub fn finish(mut self) -> Result<(), Problem> {
        for k in self.values.keys() {
            if !self.known.contains(&k.as_str()) {
                self.errors
                    .push(FieldError::new(k.clone(), "is not a known query parameter"));
            }
        }
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(Problem::validation(self.errors))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_name_every_problem() {
        let v = json!({"reason": 5, "confirm": "yes", "extra": 1});
        let mut f = Fields::new(&v, "");
        assert_eq!(f.string("reason", true, MAX_TEXT), None);
        assert_eq!(f.boolean("confirm", false), None);
        let errors = f.finish();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, vec!["reason", "confirm", "extra"]);
    }

    #[test]
    fn identifiers_refuse_injection_like_text() {
        assert!(is_ident("WO-1000"));
        assert!(is_ident("BIKE-S0001"));
        assert!(!is_ident("x' OR '1'='1"));
        assert!(!is_ident("a;DROP TABLE lots"));
        assert!(!is_ident(""));
        assert!(!is_ident(&"a".repeat(65)));
    }

    #[test]
    fn malformed_and_oversized_bodies() {
        let p = json_body(Ok(Bytes::from_static(b"{\"scans\": [")), 100).unwrap_err();
        assert_eq!(p.code, "malformed_json");
        let p = json_body(Ok(Bytes::from_static(b"")), 100).unwrap_err();
        assert_eq!(p.code, "malformed_json");
        let p = json_body(Ok(Bytes::from(vec![b' '; 200])), 100).unwrap_err();
        assert_eq!(p.code, "payload_too_large");
    }

    #[test]
    fn params_refuse_unknown_and_repeated() {
        let mut p = Params::new(vec![
            ("limit".into(), "10".into()),
            ("limit".into(), "11".into()),
            ("x".into(), "1".into()),
        ]);
        assert_eq!(p.integer("limit", 1, 500), Some(11));
        let err = p.finish().unwrap_err();
        let fields: Vec<&str> = err.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, vec!["limit", "x"]);
    }
}
