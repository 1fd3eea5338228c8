//! A job's JSON: the kind's fields plus `type` and `format`, read leniently
//! where stored or assigned jobs are read (unknown fields are a newer
//! writer's additions and are ignored) and strictly at the server's door,
//! where an unknown field is a mistake or an attempt to smuggle a setting
//! past the rules, and is refused naming it.

use serde::de::Error as _;
use serde::ser::{Error as _, SerializeMap};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use super::{CommandJob, JobSpec};
use crate::error::FieldError;
use crate::json::{from_value_at, nul_strings, unknown_fields};

/// The format of the job JSON this build writes. 1 is the format of jobs
/// stored before kinds and formats were recorded (no `type`, no `format`);
/// 2 adds both; 3 adds code snapshots, URL, datastore and uploaded inputs,
/// and output types. A reader refuses a newer format than its own rather than
/// guess at it.
pub const JOB_FORMAT: u32 = 3;

impl Serialize for JobSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let fields = match self {
            JobSpec::Command(c) => serde_json::to_value(c).map_err(S::Error::custom)?,
        };
        let Value::Object(fields) = fields else {
            return Err(S::Error::custom("a job serializes to a JSON object"));
        };
        let mut map = s.serialize_map(Some(fields.len() + 2))?;
        map.serialize_entry("type", self.kind())?;
        map.serialize_entry("format", &JOB_FORMAT)?;
        for (k, v) in &fields {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for JobSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(d)?;
        JobSpec::from_value(value).map_err(|e| D::Error::custom(e.to_string()))
    }
}

/// Takes `type` and `format` off a job's JSON object.
fn split_header(value: Value) -> Result<(String, Map<String, Value>), FieldError> {
    let Value::Object(mut map) = value else {
        return Err(FieldError::new("", "a job is a JSON object"));
    };
    match map.remove("format") {
        None => {}
        Some(Value::Number(n)) => match n.as_u64() {
            Some(f) if (1..=u64::from(JOB_FORMAT)).contains(&f) => {}
            Some(f) if f > u64::from(JOB_FORMAT) => {
                return Err(FieldError::new(
                    "format",
                    format!(
                        "the job was written in format {f} by a newer drover; this build reads formats up to {JOB_FORMAT}"
                    ),
                ));
            }
            _ => {
                return Err(FieldError::new(
                    "format",
                    format!("expected 1 to {JOB_FORMAT}, got {n}"),
                ));
            }
        },
        Some(other) => {
            return Err(FieldError::new(
                "format",
                format!("expected a number, got {other}"),
            ));
        }
    }
    let kind = match map.remove("type") {
        None | Some(Value::Null) => "command".to_string(),
        Some(Value::String(t)) => t,
        Some(other) => {
            return Err(FieldError::new(
                "type",
                format!("expected a job type, got {other}"),
            ));
        }
    };
    Ok((kind, map))
}

impl JobSpec {
    /// Reads a job from its JSON, as stored or assigned: unknown fields are
    /// ignored (a newer writer's additions).
    pub fn from_value(value: Value) -> Result<JobSpec, FieldError> {
        let (kind, map) = split_header(value)?;
        match kind.as_str() {
            "command" => from_value_at::<CommandJob>(Value::Object(map)).map(JobSpec::Command),
            other => Err(FieldError::new(
                "type",
                format!("job type `{other}` is not supported by this build (supported: command)"),
            )),
        }
    }

    /// Reads a job submitted by a client: like [`JobSpec::from_value`], and
    /// also refuses any field the job kind does not have and any string
    /// holding a NUL byte, naming each. Every problem found is returned.
    pub fn from_value_strict(value: Value) -> Result<JobSpec, Vec<FieldError>> {
        let mut errors = Vec::new();
        nul_strings(&value, "", &mut errors);
        if !errors.is_empty() {
            return Err(errors);
        }
        let job = JobSpec::from_value(value.clone()).map_err(|e| vec![e])?;
        let known =
            serde_json::to_value(&job).map_err(|e| vec![FieldError::new("", e.to_string())])?;
        unknown_fields(&value, &known, "", &mut errors);
        if errors.is_empty() {
            Ok(job)
        } else {
            Err(errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_job_carries_its_kind_and_format() {
        let job = JobSpec::from_value(json!({"command": "echo hi", "image": "busybox"})).unwrap();
        let v = serde_json::to_value(&job).unwrap();
        assert_eq!(v["type"], "command");
        assert_eq!(v["format"], JOB_FORMAT);
        assert_eq!(v["command"], "echo hi");
        let back: JobSpec = serde_json::from_value(v).unwrap();
        assert_eq!(back, job);
    }

    #[test]
    fn formats_and_kinds_this_build_does_not_know_are_refused() {
        let newer =
            JobSpec::from_value(json!({"format": 99, "command": "x", "image": "y"})).unwrap_err();
        assert_eq!(newer.field, "format");
        assert!(newer.message.contains("newer drover"), "{newer}");
        let kind = JobSpec::from_value(json!({"type": "sweep", "command": "x", "image": "y"}))
            .unwrap_err();
        assert_eq!(
            kind.to_string(),
            "type: job type `sweep` is not supported by this build (supported: command)"
        );
    }

    #[test]
    fn reading_names_the_field() {
        let e = JobSpec::from_value(json!({
            "command": "x", "image": "y",
            "resources": {"docker_args": {"ipc": "host"}}
        }))
        .unwrap_err();
        assert_eq!(e.field, "resources.docker_args.ipc");
        assert!(e.message.starts_with("--ipc=host is not allowed"), "{e}");
        let e = JobSpec::from_value(json!({"command": "x", "image": null})).unwrap_err();
        assert_eq!(e.field, "image");
        let e = JobSpec::from_value(json!({"image": "y"})).unwrap_err();
        assert_eq!(e.to_string(), "missing field `command`");
    }

    #[test]
    fn the_strict_door_reads_a_managed_identity_and_refuses_the_other_kinds() {
        let job = JobSpec::from_value_strict(json!({
            "command": "x", "image": "y",
            "identity": {"type": "managed", "client_id": "6f4c2a58-21c5-4b0e-9c1c-7a5d1e0f3b2a"}
        }))
        .unwrap();
        assert!(job.validate().is_ok());
        let errors = JobSpec::from_value_strict(json!({
            "command": "x", "image": "y",
            "identity": {"type": "managed", "client_id": "c", "tenant": "t"}
        }))
        .unwrap_err();
        assert_eq!(errors[0].to_string(), "identity.tenant: unknown field");
        for kind in ["user_identity", "aml_token"] {
            let job = JobSpec::from_value_strict(json!({
                "command": "x", "image": "y", "identity": {"type": kind}
            }))
            .unwrap();
            let invalid = job.validate().unwrap_err();
            assert_eq!(invalid.errors[0].field, "identity.type", "{invalid}");
            assert!(
                invalid.errors[0]
                    .message
                    .starts_with(&format!("{kind} is not supported")),
                "{invalid}"
            );
        }
    }

    #[test]
    fn the_strict_door_refuses_unknown_fields_and_nul_bytes() {
        let errors = JobSpec::from_value_strict(json!({
            "command": "x", "image": "y", "privileged": true,
            "resources": {"docker_args": {"cap_add": ["SYS_ADMIN"], "memory": 1073741824}},
            "drover": {"mounts": [{"source": "/data", "target": "/d", "propagation": "shared"}]}
        }))
        .unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "drover.mounts[0].propagation",
                "privileged",
                "resources.docker_args.cap_add"
            ]
        );
        let errors =
            JobSpec::from_value_strict(json!({"command": "echo\u{0}x", "image": "y"})).unwrap_err();
        assert_eq!(errors[0].to_string(), "command: contains a NUL byte");
        // What the lenient reader accepts from a newer writer.
        assert!(JobSpec::from_value(json!({"command": "x", "image": "y", "later": 1})).is_ok());
    }
}
