//! Checks on JSON documents as clients send them, shared by every strict
//! door: strings with NUL bytes, and fields that reading dropped.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::FieldError;

/// Reads `T` from `value`, naming the field of the first problem.
pub(crate) fn from_value_at<T: DeserializeOwned>(value: Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        FieldError::new(field, e.into_inner().to_string())
    })
}

/// Reads `T` from a client's JSON strictly: no NUL byte in any string, the
/// first type error named by its field, and no field that `T` does not
/// have (it would be silently dropped, so a misspelled or smuggled setting
/// would seem accepted).
pub(crate) fn decode_strict<T: DeserializeOwned + Serialize>(
    value: Value,
) -> Result<T, Vec<FieldError>> {
    let mut errors = Vec::new();
    nul_strings(&value, "", &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    let parsed: T = from_value_at(value.clone()).map_err(|e| vec![e])?;
    let known =
        serde_json::to_value(&parsed).map_err(|e| vec![FieldError::new("", e.to_string())])?;
    unknown_fields(&value, &known, "", &mut errors);
    if errors.is_empty() {
        Ok(parsed)
    } else {
        Err(errors)
    }
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Strings (values and keys) with a NUL byte: C strings end there, so the
/// engine and the kernel would see something else than what was checked.
pub(crate) fn nul_strings(value: &Value, path: &str, errors: &mut Vec<FieldError>) {
    match value {
        Value::String(s) if s.contains('\0') => {
            errors.push(FieldError::new(path, "contains a NUL byte"));
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                nul_strings(v, &format!("{path}[{i}]"), errors);
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                if k.contains('\0') {
                    errors.push(FieldError::new(path, "a key contains a NUL byte"));
                } else {
                    nul_strings(v, &child(path, k), errors);
                }
            }
        }
        _ => {}
    }
}

/// Fields of `given` that reading dropped: present in what the client sent,
/// absent from the job as read back.
pub(crate) fn unknown_fields(
    given: &Value,
    known: &Value,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    match (given, known) {
        (Value::Object(g), Value::Object(k)) => {
            for (key, v) in g {
                match k.get(key) {
                    Some(kv) => unknown_fields(v, kv, &child(path, key), errors),
                    None => errors.push(FieldError::new(child(path, key), "unknown field")),
                }
            }
        }
        (Value::Array(g), Value::Array(k)) => {
            for (i, (gv, kv)) in g.iter().zip(k).enumerate() {
                unknown_fields(gv, kv, &format!("{path}[{i}]"), errors);
            }
        }
        _ => {}
    }
}
