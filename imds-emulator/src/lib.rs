//! IMDS emulator (stub).
