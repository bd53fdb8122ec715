//! How this program starts another copy of itself (a peer replica, an
//! agent): its own binary in a source build; `python -m notebookos` with the
//! same Python when it runs inside Python as the wheel's extension module.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// Set once by the extension module: the Python it runs in.
static IN_PYTHON: OnceLock<PathBuf> = OnceLock::new();

/// Records that this process is the Python at `executable` running the
/// program as an extension module.
pub fn set_running_in(executable: PathBuf) {
    let _ = IN_PYTHON.set(executable);
}

/// The command line prefix that runs this program again.
#[derive(Debug, Clone)]
pub struct Program {
    executable: PathBuf,
    leading: Vec<OsString>,
}

impl Program {
    pub fn current() -> std::io::Result<Self> {
        Ok(match IN_PYTHON.get() {
            Some(python) => Self {
                executable: python.clone(),
                leading: vec!["-m".into(), "notebookos".into()],
            },
            None => Self::binary(std::env::current_exe()?),
        })
    }

    /// The binary of this program at `executable`.
    pub fn binary(executable: PathBuf) -> Self {
        Self {
            executable,
            leading: Vec::new(),
        }
    }

    /// A command for this program, before its own arguments (give it
    /// [`crate::libpython::for_own_binary`] once its environment is set).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.executable);
        cmd.args(&self.leading);
        cmd
    }
}

impl std::fmt::Display for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.executable.display())?;
        for arg in &self.leading {
            write!(f, " {}", arg.to_string_lossy())?;
        }
        Ok(())
    }
}
