//! `drover run`.
