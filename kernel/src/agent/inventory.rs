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

/// The GPUs the CUDA driver reports, or none when there is no usable driver.
pub fn discover() -> Vec<Gpu> {
    // cudarc panics when libcuda cannot be loaded; that only means "no GPUs".
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
            tracing::info!("no CUDA driver on this host; no GPUs");
            Vec::new()
        }
    }
}
