//! notebookos: a Jupyter kernel in Rust that runs Python cells in CPython
//! (pyo3) through IPython's shell: embedded in its own binary, or, from the
//! wheel, inside the Python that launched it ([`extension`]).
//!
//! The tokio side owns every socket (a module per channel in [`channels`]),
//! so heartbeats, interrupts and kernel_info are answered while a cell holds
//! the GIL; the Python side ([`python`]) runs on one dedicated thread that
//! is also Python's main thread, so signals and `signal.signal` behave as
//! they do in a normal interpreter.

pub mod agent;
pub mod channels;
pub mod cli;
pub mod cluster;
pub mod connection;
pub mod extension;
pub mod gpu;
pub mod kernel;
pub mod libpython;
pub mod program;
pub mod python;
pub mod replica;
pub mod signals;
pub mod sim;
pub mod wire;
