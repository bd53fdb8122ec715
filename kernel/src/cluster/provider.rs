//! Where servers come from: the autoscaler asks a [`Provider`] for servers
//! and gives drained ones back.
//!
//! * [`ShellProvider`] runs operator-configured commands, so any cloud CLI
//!   (or a script around one) can add and remove GPU servers.
//! * [`InProcess`] names servers and remembers them; the simulator uses it.

use std::process::Command;

use super::policy::ServerId;

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("`{command}` printed no server names")]
    NoServers { command: String },
}

pub trait Provider: Send {
    /// Asks for `n` servers; returns the names of those it started (their
    /// agents join when they come up).
    fn add(&mut self, n: usize) -> Result<Vec<ServerId>, ProviderError>;
    /// Gives back a server whose replicas have been moved away.
    fn remove(&mut self, server: &ServerId) -> Result<(), ProviderError>;
}

/// Runs `sh -c ADD` with `NOTEBOOKOS_SCALE_OUT=n`, which prints one server
/// name per line, and `sh -c REMOVE` with `NOTEBOOKOS_SERVER=name`. A
/// non-zero exit is an error carrying the command's stderr.
#[derive(Debug, Clone)]
pub struct ShellProvider {
    pub add: String,
    pub remove: String,
}

impl ShellProvider {
    fn run(&self, command: &str, env: (&str, &str)) -> Result<String, ProviderError> {
        let out = Command::new("sh")
            .arg("-c")
            .arg(command)
            .env(env.0, env.1)
            .output()
            .map_err(|source| ProviderError::Spawn {
                command: command.to_owned(),
                source,
            })?;
        if !out.status.success() {
            return Err(ProviderError::Failed {
                command: command.to_owned(),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Provider for ShellProvider {
    fn add(&mut self, n: usize) -> Result<Vec<ServerId>, ProviderError> {
        let stdout = self.run(&self.add, ("NOTEBOOKOS_SCALE_OUT", &n.to_string()))?;
        let names: Vec<ServerId> = stdout
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        if names.is_empty() {
            return Err(ProviderError::NoServers {
                command: self.add.clone(),
            });
        }
        if names.len() != n {
            tracing::warn!(
                asked = n,
                got = names.len(),
                "the provider started another number of servers"
            );
        }
        Ok(names)
    }

    fn remove(&mut self, server: &ServerId) -> Result<(), ProviderError> {
        self.run(&self.remove, ("NOTEBOOKOS_SERVER", server))
            .map(drop)
    }
}

/// Servers that exist as soon as they are named: `s00000`, `s00001`, ...
#[derive(Debug, Default)]
pub struct InProcess {
    next: usize,
    pub removed: Vec<ServerId>,
}

impl Provider for InProcess {
    fn add(&mut self, n: usize) -> Result<Vec<ServerId>, ProviderError> {
        let names = (self.next..self.next + n)
            .map(|i| format!("s{i:05}"))
            .collect();
        self.next += n;
        Ok(names)
    }

    fn remove(&mut self, server: &ServerId) -> Result<(), ProviderError> {
        self.removed.push(server.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_provider_runs_the_operators_commands() {
        let dir = std::env::temp_dir().join(format!("nbos-provider-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("removed");
        let mut p = ShellProvider {
            add: "for i in $(seq $NOTEBOOKOS_SCALE_OUT); do echo gpu-$i; done".into(),
            remove: format!("echo \"$NOTEBOOKOS_SERVER\" >> {}", log.display()),
        };
        assert_eq!(p.add(3).unwrap(), vec!["gpu-1", "gpu-2", "gpu-3"]);
        p.remove(&"gpu-2".to_string()).unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "gpu-2\n");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn shell_provider_failures_say_why() {
        let mut p = ShellProvider {
            add: "echo quota exceeded >&2; exit 3".into(),
            remove: "true".into(),
        };
        let err = p.add(1).unwrap_err().to_string();
        assert!(
            err.contains("quota exceeded") && err.contains("exit status: 3"),
            "{err}"
        );
        p.add = "true".into();
        assert!(matches!(p.add(1), Err(ProviderError::NoServers { .. })));
    }

    #[test]
    fn in_process_names_servers_in_order() {
        let mut p = InProcess::default();
        assert_eq!(p.add(2).unwrap(), vec!["s00000", "s00001"]);
        assert_eq!(p.add(1).unwrap(), vec!["s00002"]);
        p.remove(&"s00001".to_string()).unwrap();
        assert_eq!(p.removed, vec!["s00001"]);
    }
}
