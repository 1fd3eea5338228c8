//! A stand-in `libnvidia-ml.so.1` for machines without an NVIDIA GPU.
//!
//! It exports, with the C ABI and the layouts of `nvml.h`, the NVML functions
//! `drover-agent` calls through nvml-wrapper, and answers them from a *profile*
//! (JSON, see `profiles/`). Tests copy the built `libfake_nvml.so` to a
//! directory of their own as `libnvidia-ml.so.1` and load it through
//! nvml-wrapper's `lib_path` exactly as the real library is loaded.
//!
//! * Profile: `fake-nvml-profile.json` beside the loaded library file if there
//!   is one (so tests running in parallel in one process each get their own
//!   copy and state), else the file named by `FAKE_NVML_PROFILE`. Read at
//!   `nvmlInit_v2` when the library goes from uninitialised to initialised.
//! * Events: lines appended to an events file — `xid <gpu> <xid>`,
//!   `dbe <gpu>` (double-bit ECC), `sbe <gpu>` — are delivered by
//!   `nvmlEventSetWait_v2` to event sets registered for that GPU and event
//!   type after the line was written, blocking up to the caller's timeout and
//!   returning `NVML_ERROR_TIMEOUT` when nothing arrives, like the driver. The
//!   file is `FAKE_NVML_EVENTS`, else the profile's `events_file`, else
//!   `fake-nvml-events` beside the profile.
//!
//! `examples/fake_nvml_full.rs` builds this same library under another name
//! (`cargo test` builds examples, not cdylibs); `examples/fake_nvml_no_power.rs`
//! builds it without `nvmlDeviceGetPowerUsage` (the exports of `optional`).

mod fake;
mod optional;
