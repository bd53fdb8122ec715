//! Links the kernel against the Python it was built for and records where
//! that libpython lives (rpath), so the binary runs without LD_LIBRARY_PATH.

fn main() {
    let config = pyo3_build_config::get();
    if let Some(dir) = &config.lib_dir {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
}
