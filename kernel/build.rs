//! Links the kernel against the Python it was built for. A source build
//! records where that libpython lives (rpath), so the binary runs without
//! LD_LIBRARY_PATH; the wheel's extension module records nothing (it links
//! no libpython: the Python that imports it is its interpreter).

fn main() {
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
    println!("cargo:rerun-if-env-changed=NOTEBOOKOS_RELOCATABLE");
    if std::env::var_os("NOTEBOOKOS_RELOCATABLE").is_some() {
        return;
    }
    let config = pyo3_build_config::get();
    if let Some(dir) = &config.lib_dir {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
