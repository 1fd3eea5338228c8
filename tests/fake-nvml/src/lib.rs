//! Fake NVML library (stub).
