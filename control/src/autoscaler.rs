//! Autoscaling: pure scale decisions (stub).
