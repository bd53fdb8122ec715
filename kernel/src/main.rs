//! The kernel as its own binary (source builds); the wheel runs the same
//! program inside Python instead (`python -m notebookos`).

fn main() {
    std::process::exit(notebookos_kernel::cli::main(std::env::args_os().collect()))
}
