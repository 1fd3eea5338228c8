//! `libfake_nvml_no_power.so`: the fake NVML library without
//! `nvmlDeviceGetPowerUsage`, for the agent's "library lacks a symbol" test.

// `with_gpu` and friends are only used by the power export left out here.
#[allow(dead_code)]
#[path = "../src/fake.rs"]
mod fake;
