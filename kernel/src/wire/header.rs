//! The message header and its identity, date and version conventions.

use serde::{Deserialize, Serialize};

/// Messaging protocol version this kernel implements.
pub const PROTOCOL_VERSION: &str = "5.4";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub msg_id: String,
    pub session: String,
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub date: String,
    pub msg_type: String,
    #[serde(default)]
    pub version: String,
    /// Which subshell runs a shell request (JEP 91); absent for the main shell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subshell_id: Option<String>,
}

impl Header {
    pub fn new(msg_type: &str, session: &str) -> Self {
        Self {
            msg_id: uuid::Uuid::new_v4().to_string(),
            session: session.to_owned(),
            username: "kernel".to_owned(),
            date: now_iso8601(),
            msg_type: msg_type.to_owned(),
            version: PROTOCOL_VERSION.to_owned(),
            subshell_id: None,
        }
    }
}

/// Jupyter dates are ISO 8601 with an explicit UTC offset; microseconds match
/// what jupyter_client itself writes, so date round-trips compare equal.
pub fn now_iso8601() -> String {
    chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_iso8601_utc() {
        let d = now_iso8601();
        assert!(chrono::DateTime::parse_from_rfc3339(&d).is_ok(), "{d}");
    }

    #[test]
    fn header_tolerates_missing_optional_fields() {
        let h: Header = serde_json::from_str(
            r#"{"msg_id":"1","session":"s","msg_type":"kernel_info_request"}"#,
        )
        .unwrap();
        assert_eq!(h.msg_type, "kernel_info_request");
        assert!(h.username.is_empty());
    }
}
