//! One module per `drover-agent` subcommand; `main` only dispatches here.

pub mod inventory;
pub mod run;
pub mod uninstall;
