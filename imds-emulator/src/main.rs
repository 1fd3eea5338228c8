//! `drover-imds-emulator`: run the IMDS emulator by hand.
//!
//! ```text
//! drover-imds-emulator [--listen 127.0.0.1:8169] [--vm NAME]... [--vm-address IP] [--user-data FILE]
//!     [--no-rate-limit] [--registry-token-key KEY.pem --registry-token-cert CERT.pem]
//! ```
//! Each `--vm` registers a VM with a system-assigned identity, answered
//! for requests from `--vm-address` when given (else from its private IP),
//! and with `--user-data` the file's bytes as its `compute.userData`. With
//! the registry token key and certificate it also serves a container
//! registry's token service (`/oauth2/exchange`, `/oauth2/token`). More VMs,
//! identities, events and faults can be added through the admin API under
//! `/drover-emulator/`.

use std::net::SocketAddr;

use anyhow::Context as _;
use drover_imds_emulator::acr::RegistryTokens;
use drover_imds_emulator::{Emulator, EmulatorConfig, VmSpec};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let mut listen: SocketAddr = "127.0.0.1:8169".parse().context("parse default address")?;
    let mut vms = Vec::new();
    let mut user_data = String::new();
    let mut config = EmulatorConfig::default();
    let mut vm_address: Option<std::net::IpAddr> = None;
    let (mut token_key, mut token_cert) = (None::<String>, None::<String>);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                let value = args.next().context("--listen needs an address")?;
                listen = value
                    .parse()
                    .with_context(|| format!("parse --listen {value}"))?;
            }
            "--vm" => vms.push(args.next().context("--vm needs a name")?),
            "--user-data" => {
                let path = args.next().context("--user-data needs a file")?;
                user_data = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading the user data {path}"))?;
            }
            "--vm-address" => {
                let value = args.next().context("--vm-address needs an IP address")?;
                vm_address = Some(
                    value
                        .parse()
                        .with_context(|| format!("parse --vm-address {value}"))?,
                );
            }
            "--registry-token-key" => {
                token_key = Some(args.next().context("--registry-token-key needs a file")?)
            }
            "--registry-token-cert" => {
                token_cert = Some(args.next().context("--registry-token-cert needs a file")?)
            }
            "--no-rate-limit" => {
                config.general_rate_limit = None;
                config.identity_rate_limit = None;
            }
            other => anyhow::bail!(
                "unknown argument {other}; usage: drover-imds-emulator [--listen ADDR] [--vm NAME]... [--vm-address IP] [--user-data FILE] [--no-rate-limit] [--registry-token-key KEY.pem --registry-token-cert CERT.pem]"
            ),
        }
    }
    let emulator = Emulator::new(config);
    match (&token_key, &token_cert) {
        (Some(key), Some(cert)) => {
            let read = |path: &str| {
                std::fs::read_to_string(path).with_context(|| format!("reading {path}"))
            };
            let tokens =
                RegistryTokens::from_pem(&read(key)?, &read(cert)?).with_context(|| {
                    format!("loading the registry token key {key} and certificate {cert}")
                })?;
            emulator.enable_registry_tokens(tokens);
        }
        (None, None) => {}
        _ => anyhow::bail!("--registry-token-key and --registry-token-cert go together"),
    }
    for name in &vms {
        let mut vm = VmSpec::new(name);
        vm.user_data = user_data.clone();
        vm.source_addr = vm_address;
        emulator
            .add_vm(vm)
            .with_context(|| format!("register vm {name}"))?;
    }
    let server = emulator
        .bind(listen)
        .await
        .with_context(|| format!("listen on {listen}"))?;
    tracing::info!(addr = %server.local_addr(), vms = vms.len(), "imds emulator listening");
    tokio::signal::ctrl_c().await.context("wait for ctrl-c")?;
    server.shutdown().await;
    Ok(())
}
