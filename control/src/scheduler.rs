//! Gang scheduling: pure placement decisions (stub).
