//! Exports left out of the `fake_nvml_no_power` variant, which stands in for a
//! library that lacks a function the agent calls.

use std::ffi::c_uint;

use crate::fake::{NVML_SUCCESS, NvmlDevice, NvmlReturn, with_gpu};

/// `nvmlDeviceGetPowerUsage`: power draw in milliwatts.
///
/// # Safety
/// `power` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(
    device: NvmlDevice,
    power: *mut c_uint,
) -> NvmlReturn {
    with_gpu(device, |gpu| {
        // SAFETY: the caller passes a writable `unsigned int`.
        unsafe { *power = gpu.power_mw };
        NVML_SUCCESS
    })
}
