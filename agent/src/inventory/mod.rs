//! Node inventory: host resources and GPUs.
