//! Starting the embedded interpreter as the user's environment's Python.
//!
//! The interpreter is told the path of the environment's own `python`
//! (from `NOTEBOOKOS_PYTHON`, written into the kernelspec by install.sh), so
//! `sys.prefix`, site-packages and `sys.executable` are those of that
//! environment, virtual environments included: `!pip install`,
//! `subprocess` and `multiprocessing` (spawn) then use a real Python.

use std::ffi::{CStr, CString};
use std::mem::MaybeUninit;

use pyo3::ffi;

use super::PythonError;

/// Initialises CPython on the calling thread, which becomes Python's main
/// thread, then releases the GIL for pyo3.
///
/// # Safety
/// Call once per process, before any other use of Python.
pub unsafe fn initialize(
    executable: Option<&str>,
    hash_seed: Option<u32>,
) -> Result<(), PythonError> {
    let mut config = MaybeUninit::<ffi::PyConfig>::uninit();
    ffi::PyConfig_InitPythonConfig(config.as_mut_ptr());
    let mut config = config.assume_init();
    // Python's own SIGINT handler is installed by the shim, from Python,
    // once it can tell whether a cell is running.
    config.install_signal_handlers = 0;
    config.parse_argv = 0;
    if let Some(seed) = hash_seed.filter(|_| std::env::var_os("PYTHONHASHSEED").is_none()) {
        config.use_hash_seed = 1;
        config.hash_seed = seed as libc::c_ulong;
    }
    let result = (|| {
        if let Some(exe) = executable {
            let exe = CString::new(exe)
                .map_err(|_| PythonError::Init("NUL in NOTEBOOKOS_PYTHON".into()))?;
            let program_name: *mut *mut libc::wchar_t = &mut config.program_name;
            check(ffi::PyConfig_SetBytesString(
                &mut config,
                program_name,
                exe.as_ptr(),
            ))?;
            let executable: *mut *mut libc::wchar_t = &mut config.executable;
            check(ffi::PyConfig_SetBytesString(
                &mut config,
                executable,
                exe.as_ptr(),
            ))?;
        }
        check(ffi::Py_InitializeFromConfig(&config))
    })();
    ffi::PyConfig_Clear(&mut config);
    result?;
    ffi::PyEval_SaveThread();
    Ok(())
}

unsafe fn check(status: ffi::PyStatus) -> Result<(), PythonError> {
    if ffi::PyStatus_Exception(status) == 0 {
        return Ok(());
    }
    let msg = if status.err_msg.is_null() {
        "unknown error".to_owned()
    } else {
        CStr::from_ptr(status.err_msg)
            .to_string_lossy()
            .into_owned()
    };
    Err(PythonError::Init(msg))
}
