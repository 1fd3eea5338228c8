//! Serde helpers for IMDS JSON, whose primitives are documented as strings
//! ("" when missing) but which in practice sometimes carries numbers, booleans
//! or nulls (scheduled events use numbers; some fields are booleans).

use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// Any JSON primitive as a string; null or absent as `""`.
pub(crate) fn string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => s,
        Value::Null => String::new(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        other => other.to_string(),
    })
}

/// A number that may arrive as a JSON number or a string; `""` or null as `None`.
pub(crate) fn opt_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    match Value::deserialize(d)? {
        Value::Number(n) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom(format!("{n} is not an integer"))),
        Value::String(s) if s.trim().is_empty() => Ok(None),
        Value::String(s) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not an integer"))),
        Value::Null => Ok(None),
        other => Err(serde::de::Error::custom(format!(
            "{other} is not an integer"
        ))),
    }
}

/// Like [`opt_i64`], with `0` for a missing value.
pub(crate) fn i64_or_zero<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    opt_i64(d).map(|v| v.unwrap_or(0))
}

/// Like [`opt_i64`], without negative values.
pub(crate) fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    opt_i64(d)?
        .map(|v| u64::try_from(v).map_err(|_| serde::de::Error::custom(format!("{v} is negative"))))
        .transpose()
}
