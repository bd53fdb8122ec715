//! A replica's connection to its host's agent.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use super::grants::GrantId;
use super::protocol::{Request, Response, Status};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("GPU agent at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("GPU agent: {0}")]
    Agent(String),
    #[error("GPU agent answered something unexpected: {0}")]
    Protocol(String),
    #[error("no GPU agent came up at {0}")]
    NotStarted(PathBuf),
}

/// An answer to a grant request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Granting {
    Granted(AgentGrant),
    Refused,
    /// Others' cached GPUs are being reclaimed for us: ask again shortly.
    Reclaiming,
}

/// GPUs granted for one cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentGrant {
    pub id: GrantId,
    pub gpus: Vec<u32>,
    /// From a fake inventory: there is no device to bind.
    pub fake: bool,
}

pub struct AgentClient {
    path: PathBuf,
    conn: tokio::sync::Mutex<Option<(BufReader<OwnedReadHalf>, OwnedWriteHalf)>>,
}

impl AgentClient {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            conn: tokio::sync::Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn call(&self, req: &Request) -> Result<Response, ClientError> {
        let io = |source| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        let mut conn = self.conn.lock().await;
        // One retry on a fresh connection: the agent may have restarted.
        for attempt in 0..2 {
            if conn.is_none() {
                let stream = UnixStream::connect(&self.path).await.map_err(io)?;
                let (r, w) = stream.into_split();
                *conn = Some((BufReader::new(r), w));
            }
            let Some((reader, writer)) = conn.as_mut() else {
                continue;
            };
            let mut line =
                serde_json::to_vec(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
            line.push(b'\n');
            let mut answer = String::new();
            let exchanged = async {
                writer.write_all(&line).await?;
                reader.read_line(&mut answer).await
            }
            .await;
            match exchanged {
                Ok(n) if n > 0 => {
                    return serde_json::from_str(&answer)
                        .map_err(|e| ClientError::Protocol(e.to_string()))
                }
                Ok(_) | Err(_) if attempt == 0 => *conn = None,
                Ok(_) => return Err(io(std::io::ErrorKind::UnexpectedEof.into())),
                Err(e) => return Err(io(e)),
            }
        }
        Err(io(std::io::ErrorKind::UnexpectedEof.into()))
    }

    /// Refused when the GPUs are not free now.
    pub async fn grant(
        &self,
        kernel: &str,
        replica: u64,
        gpus: u32,
        lease: Duration,
    ) -> Result<Granting, ClientError> {
        let req = Request::Grant {
            kernel: kernel.into(),
            replica,
            gpus,
            lease_ms: lease.as_millis() as u64,
        };
        match self.call(&req).await? {
            Response::Granted { id, gpus, fake } => {
                Ok(Granting::Granted(AgentGrant { id, gpus, fake }))
            }
            Response::Refused { reason, reclaiming } => {
                tracing::debug!(%reason, "GPU grant refused");
                Ok(if reclaiming {
                    Granting::Reclaiming
                } else {
                    Granting::Refused
                })
            }
            other => Err(unexpected(other)),
        }
    }

    /// Whether the grant is still ours (false: revoked, release it).
    pub async fn renew(&self, id: GrantId) -> Result<bool, ClientError> {
        match self.call(&Request::Renew { id }).await? {
            Response::Ok => Ok(true),
            Response::Revoked => Ok(false),
            other => Err(unexpected(other)),
        }
    }

    pub async fn cache(&self, id: GrantId, used: Duration) -> Result<(), ClientError> {
        let req = Request::Cache {
            id,
            used_ms: used.as_millis() as u64,
        };
        match self.call(&req).await? {
            Response::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    pub async fn release(
        &self,
        id: GrantId,
        used: Duration,
        moving: Duration,
    ) -> Result<(), ClientError> {
        match self
            .call(&Request::Release {
                id,
                used_ms: used.as_millis() as u64,
                moving_ms: moving.as_millis() as u64,
            })
            .await?
        {
            Response::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    pub async fn status(&self) -> Result<Status, ClientError> {
        match self.call(&Request::Status).await? {
            Response::Status(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// Connects to the host's agent, starting one (this binary, detached) if
    /// none answers: the embedded default of one agent per host.
    pub async fn ensure(path: PathBuf) -> Result<Self, ClientError> {
        let client = Self::new(path.clone());
        if client.status().await.is_ok() {
            return Ok(client);
        }
        let program = crate::program::Program::current().map_err(|source| ClientError::Io {
            path: path.clone(),
            source,
        })?;
        let mut cmd = program.command();
        cmd.arg("agent")
            .arg("--socket")
            .arg(&path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        crate::libpython::for_own_binary(&mut cmd, std::env::var_os("LD_LIBRARY_PATH").as_deref());
        // Its own session: it serves every kernel on the host and outlives this one.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.spawn().map_err(|source| ClientError::Io {
            path: path.clone(),
            source,
        })?;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if client.status().await.is_ok() {
                return Ok(client);
            }
        }
        Err(ClientError::NotStarted(path))
    }
}

fn unexpected(r: Response) -> ClientError {
    match r {
        Response::Error { message } => ClientError::Agent(message),
        other => ClientError::Protocol(format!("{other:?}")),
    }
}
