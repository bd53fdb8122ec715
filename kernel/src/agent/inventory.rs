//! The host's GPUs: from the CUDA driver, loaded at run time (the build needs
//! no CUDA; a host without a driver has zero GPUs), or fake ones for tests.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpu {
    pub index: u32,
    pub name: String,
    pub memory_mib: u64,
}

/// `n` fake GPUs, for tests on machines without any.
pub fn fake(n: u32) -> Vec<Gpu> {
    (0..n)
        .map(|index| Gpu {
            index,
            name: "fake GPU".into(),
            memory_mib: 80 * 1024,
        })
        .collect()
}

/// Whether the CUDA driver library can be loaded, under any of the names
/// cudarc tries. cudarc panics when it cannot load it, so nothing may call
/// into cudarc on a host where this is false.
pub fn cuda_driver_present() -> bool {
    static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PRESENT.get_or_init(|| {
        cudarc::get_lib_name_candidates("cuda").iter().any(|name| {
            let Ok(name) = std::ffi::CString::new(name.as_str()) else {
                return false;
            };
            // SAFETY: dlopen/dlclose on a NUL-terminated name; the handle is not used
            // beyond closing it again.
            unsafe {
                let handle = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
                if handle.is_null() {
                    return false;
                }
                libc::dlclose(handle);
                true
            }
        })
    })
}

/// The GPUs the CUDA driver reports, or none when there is no usable driver.
pub fn discover() -> Vec<Gpu> {
    if !cuda_driver_present() {
        tracing::info!("no CUDA driver on this host; no GPUs");
        return Vec::new();
    }
    // A driver too old for a symbol cudarc expects also panics in cudarc.
    let found = std::panic::catch_unwind(|| -> Result<Vec<Gpu>, cudarc::driver::DriverError> {
        use cudarc::driver::result;
        result::init()?;
        let n = result::device::get_count()?;
        let mut gpus = Vec::new();
        for i in 0..n {
            let dev = result::device::get(i)?;
            let name = result::device::get_name(dev).unwrap_or_else(|_| "GPU".into());
            // SAFETY: dev is a valid device handle returned by the driver above.
            let bytes = unsafe { result::device::total_mem(dev) }.unwrap_or(0);
            gpus.push(Gpu {
                index: i as u32,
                name,
                memory_mib: (bytes / (1 << 20)) as u64,
            });
        }
        Ok(gpus)
    });
    match found {
        Ok(Ok(gpus)) => gpus,
        Ok(Err(e)) => {
            tracing::info!("CUDA driver present but unusable ({e}); no GPUs");
            Vec::new()
        }
        Err(_) => {
            tracing::warn!("the CUDA driver lacks what cudarc needs; no GPUs");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a host without a driver: zero GPUs, and no panic (not even a caught one,
    /// whose message and backtrace would reach the kernel's stderr).
    #[test]
    fn discovery_never_panics() {
        static PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        std::panic::set_hook(Box::new(|_| {
            PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        let gpus = discover();
        drop(std::panic::take_hook());
        assert_eq!(PANICS.load(std::sync::atomic::Ordering::SeqCst), 0);
        if !cuda_driver_present() {
            assert!(gpus.is_empty());
        }
    }
}
