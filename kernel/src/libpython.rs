//! The launcher's libpython entry on `LD_LIBRARY_PATH`.
//!
//! A binary that `python -m notebookos` starts (a source build named by
//! `NOTEBOOKOS_KERNEL_BIN`; the wheel runs in Python instead) gets the
//! environment's libpython directory first on `LD_LIBRARY_PATH`, named
//! again in [`DIR_VAR`]. Cells
//! must not inherit it (a conda environment's `lib/` would shadow the
//! system's libraries for every `!command`), so the kernel takes it off at
//! start and puts it back only for the processes it starts from its own
//! binary: replicas and agents.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::process::Command;

/// Set by the launcher: the directory holding this host's libpython.
pub const DIR_VAR: &str = "NOTEBOOKOS_LIBPYTHON_DIR";
const PATH_VAR: &str = "LD_LIBRARY_PATH";

/// Takes the launcher's entry off this process's `LD_LIBRARY_PATH`; the
/// loader has read it already. Call before any other thread exists.
pub fn hide_from_cells() {
    let (Some(dir), Some(path)) = (std::env::var_os(DIR_VAR), std::env::var_os(PATH_VAR)) else {
        return;
    };
    match without_leading(&path, &dir) {
        Some(rest) if !rest.is_empty() => std::env::set_var(PATH_VAR, rest),
        Some(_) => std::env::remove_var(PATH_VAR),
        None => {}
    }
}

/// Gives a process started from this binary the launcher's entry back, in
/// front of `library_path`, the `LD_LIBRARY_PATH` it is started with.
pub fn for_own_binary(cmd: &mut Command, library_path: Option<&OsStr>) {
    if let Some(dir) = std::env::var_os(DIR_VAR) {
        cmd.env(DIR_VAR, &dir)
            .env(PATH_VAR, with_leading(&dir, library_path));
    }
}

/// `path` without its first entry when that entry is `dir`.
fn without_leading(path: &OsStr, dir: &OsStr) -> Option<OsString> {
    let bytes = path.as_bytes();
    let rest = bytes.strip_prefix(dir.as_bytes())?;
    match rest {
        [] => Some(OsString::new()),
        [b':', rest @ ..] => Some(OsStr::from_bytes(rest).to_owned()),
        _ => None,
    }
}

fn with_leading(dir: &OsStr, path: Option<&OsStr>) -> OsString {
    let mut joined = dir.to_owned();
    if let Some(path) = path.filter(|p| !p.is_empty()) {
        joined.push(":");
        joined.push(path);
    }
    joined
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    #[test]
    fn only_a_leading_launcher_entry_comes_off() {
        assert_eq!(
            without_leading(os("/py/lib"), os("/py/lib")),
            Some("".into())
        );
        assert_eq!(
            without_leading(os("/py/lib:/opt/x"), os("/py/lib")),
            Some("/opt/x".into())
        );
        // The user's own entries, even one that merely starts the same way, stay.
        assert_eq!(without_leading(os("/py/lib64:/opt/x"), os("/py/lib")), None);
        assert_eq!(without_leading(os("/opt/x:/py/lib"), os("/py/lib")), None);
    }

    #[test]
    fn the_entry_goes_back_in_front() {
        assert_eq!(with_leading(os("/py/lib"), None), "/py/lib");
        assert_eq!(with_leading(os("/py/lib"), Some(os(""))), "/py/lib");
        assert_eq!(
            with_leading(os("/py/lib"), Some(os("/opt/x"))),
            "/py/lib:/opt/x"
        );
    }
}
