//! Compute (cluster) definitions (stub).
