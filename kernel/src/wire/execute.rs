//! `execute_request`, `execute_reply`, and the iopub `execute_input` /
//! `execute_result` it causes.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecuteRequest {
    pub code: String,
    #[serde(default)]
    pub silent: bool,
    #[serde(default = "yes")]
    pub store_history: bool,
    #[serde(default)]
    pub user_expressions: Map<String, Value>,
    #[serde(default = "yes")]
    pub allow_stdin: bool,
    #[serde(default = "yes")]
    pub stop_on_error: bool,
}

fn yes() -> bool {
    true
}

/// The reply as the Python side reports it; `status` decides which of the
/// optional groups is present.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecuteReply {
    pub status: String,
    pub execution_count: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_expressions: Option<Map<String, Value>>,
    #[serde(flatten)]
    pub error: Option<super::error::ErrorContent>,
}

impl ExecuteReply {
    pub fn aborted(execution_count: i64) -> Self {
        Self {
            status: "aborted".into(),
            execution_count,
            payload: None,
            user_expressions: None,
            error: None,
        }
    }

    pub fn is_error(&self) -> bool {
        self.status == "error"
    }
}

/// The execute_reply's metadata as ipykernel writes it (ipyparallel and
/// some front-ends read `started`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplyMetadata {
    pub started: String,
    pub dependencies_met: bool,
    pub engine: String,
    pub status: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecuteInput {
    pub code: String,
    pub execution_count: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecuteResult {
    pub execution_count: i64,
    pub data: Map<String, Value>,
    #[serde(default)]
    pub metadata: Map<String, Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_defaults_follow_the_spec() {
        let r: ExecuteRequest = serde_json::from_str(r#"{"code":"1"}"#).unwrap();
        assert!(!r.silent && r.store_history && r.allow_stdin && r.stop_on_error);
    }

    #[test]
    fn error_reply_flattens_error_fields() {
        let r: ExecuteReply = serde_json::from_str(
            r#"{"status":"error","execution_count":3,"ename":"E","evalue":"v","traceback":["t"]}"#,
        )
        .unwrap();
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["ename"], "E");
        assert_eq!(v["traceback"][0], "t");
        assert!(r.is_error());
    }
}
