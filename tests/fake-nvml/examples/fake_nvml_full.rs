//! `libfake_nvml_full.so`: the whole fake NVML library (the same exports as
//! `libfake_nvml.so`), built by `cargo test` for the agent's tests.

#[path = "../src/fake.rs"]
mod fake;
#[path = "../src/optional.rs"]
mod optional;
