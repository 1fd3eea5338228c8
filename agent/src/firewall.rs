//! The IMDS firewall: on the node's network, only the agent's own packets
//! reach IMDS. Job containers get cloud tokens through the agent's identity
//! endpoint, for the identities their cluster grants — never from IMDS
//! directly, which would hand them every identity of the VM.
//!
//! How: the agent's IMDS client marks its sockets (`SO_MARK`
//! [`IMDS_MARK`]); setting a mark needs `CAP_NET_ADMIN`, which job
//! containers never get (Docker's default capabilities leave it out and
//! `docker_args` cannot add it). A chain of the `filter` table lets marked
//! packets to the IMDS address and port through and resets every other
//! connection:
//!
//! ```text
//! -N DROVER-IMDS
//! -A DROVER-IMDS -m mark --mark 0xd50 -j RETURN
//! -A DROVER-IMDS -p tcp -j REJECT --reject-with tcp-reset
//! -I OUTPUT      -d IMDS/32 -p tcp --dport PORT -j DROVER-IMDS   processes in the node's network:
//!                                                                host-network parts, or a local
//!                                                                node's parts (its namespace)
//! -I DOCKER-USER -d IMDS/32 -p tcp --dport PORT -j DROVER-IMDS   parts on a Docker bridge (FORWARD
//!                                                                when Docker has no DOCKER-USER)
//! ```
//!
//! [`keep`] checks the rules every few seconds and puts back what is
//! missing (a typed event: a log line and a metric); `drover-agent
//! uninstall` removes them ([`ImdsFirewall::remove`]).
//!
//! This module is the only code that runs `iptables`.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// The mark on the agent's IMDS sockets.
pub const IMDS_MARK: u32 = 0xd50;
/// The chain holding the decision.
pub const CHAIN: &str = "DROVER-IMDS";
/// How often [`keep`] checks the rules.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Why the firewall could not be set up or checked.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// The IMDS URL does not name an IPv4 address (a firewall rule needs one).
    #[error("the imds url {0} does not name an IPv4 address and port")]
    Address(String),
    /// `iptables` could not be run at all.
    #[error("cannot run {}", .program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `iptables` refused a rule.
    #[error("iptables {args} failed: {stderr}")]
    Refused {
        /// The arguments, as one line.
        args: String,
        /// What it said.
        stderr: String,
    },
}

/// The rules protecting one IMDS address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImdsFirewall {
    /// IMDS's address.
    pub address: Ipv4Addr,
    /// Its TCP port.
    pub port: u16,
    /// The `iptables` program.
    pub iptables: PathBuf,
}

/// One rule: the chain it is in, where it goes, and its match and target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The chain (`DROVER-IMDS`, `OUTPUT`, `DOCKER-USER`, `FORWARD`).
    pub chain: String,
    /// Inserted first in its chain (jumps, which must come before other
    /// rules) or appended (the chain's own rules, in order).
    pub first: bool,
    /// The rule after `-A CHAIN`.
    pub spec: Vec<String>,
}

/// What [`ImdsFirewall::ensure`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Repair {
    /// Rules that were missing and were put in, as `CHAIN spec…`.
    pub added: Vec<String>,
}

fn words(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_string).collect()
}

impl ImdsFirewall {
    /// The firewall for the IMDS at `url` (`http://169.254.169.254`, an
    /// emulator's `http://10.213.0.1:7341`).
    pub fn for_url(url: &str, iptables: PathBuf) -> Result<Self, FirewallError> {
        let bad = || FirewallError::Address(url.to_string());
        let rest = url.strip_prefix("http://").ok_or_else(bad)?;
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| bad())?),
            None => (authority, 80),
        };
        Ok(ImdsFirewall {
            address: host.parse().map_err(|_| bad())?,
            port,
            iptables,
        })
    }

    /// Every rule, in the order they are put in: the chain's own, then the
    /// jumps into it. `forward_chain` is where bridged containers' packets
    /// are filtered (`DOCKER-USER` when Docker made it, else `FORWARD`).
    pub fn rules(&self, forward_chain: &str) -> Vec<Rule> {
        let to_imds = format!(
            "-d {}/32 -p tcp -m tcp --dport {} -j {CHAIN}",
            self.address, self.port
        );
        vec![
            Rule {
                chain: CHAIN.into(),
                first: false,
                spec: words(&format!("-m mark --mark 0x{IMDS_MARK:x} -j RETURN")),
            },
            Rule {
                chain: CHAIN.into(),
                first: false,
                spec: words("-p tcp -j REJECT --reject-with tcp-reset"),
            },
            Rule {
                chain: "OUTPUT".into(),
                first: true,
                spec: words(&to_imds),
            },
            Rule {
                chain: forward_chain.into(),
                first: true,
                spec: words(&to_imds),
            },
        ]
    }

    fn run(&self, args: &[String]) -> Result<std::process::Output, FirewallError> {
        Command::new(&self.iptables)
            // Wait for the xtables lock rather than fail when Docker holds it.
            .arg("-w")
            .args(args)
            .output()
            .map_err(|source| FirewallError::Spawn {
                program: self.iptables.clone(),
                source,
            })
    }

    fn must(&self, args: Vec<String>) -> Result<(), FirewallError> {
        let out = self.run(&args)?;
        if out.status.success() {
            return Ok(());
        }
        Err(FirewallError::Refused {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }

    fn chain_exists(&self, chain: &str) -> Result<bool, FirewallError> {
        Ok(self.run(&words(&format!("-S {chain}")))?.status.success())
    }

    fn forward_chain(&self) -> Result<&'static str, FirewallError> {
        Ok(if self.chain_exists("DOCKER-USER")? {
            "DOCKER-USER"
        } else {
            "FORWARD"
        })
    }

    /// Puts in whatever rule is missing; says what it added. A rule of the
    /// chain that is out of place means the chain was edited: it is
    /// rebuilt whole, so marked packets always pass and others never do.
    pub fn ensure(&self) -> Result<Repair, FirewallError> {
        let mut repair = Repair::default();
        if !self.chain_exists(CHAIN)? {
            self.must(words(&format!("-N {CHAIN}")))?;
        }
        let rules = self.rules(self.forward_chain()?);
        let own: Vec<&Rule> = rules.iter().filter(|r| r.chain == CHAIN).collect();
        let listed = self.run(&words(&format!("-S {CHAIN}")))?;
        let wanted: Vec<String> = own
            .iter()
            .map(|r| format!("-A {CHAIN} {}", r.spec.join(" ")))
            .collect();
        let present: Vec<String> = String::from_utf8_lossy(&listed.stdout)
            .lines()
            .filter(|l| l.starts_with("-A "))
            .map(str::to_string)
            .collect();
        if present != wanted {
            self.must(words(&format!("-F {CHAIN}")))?;
            for r in &own {
                let mut args = vec!["-A".to_string(), CHAIN.to_string()];
                args.extend(r.spec.iter().cloned());
                self.must(args)?;
                repair.added.push(format!("{CHAIN} {}", r.spec.join(" ")));
            }
        }
        for r in rules.iter().filter(|r| r.chain != CHAIN) {
            let mut check = vec!["-C".to_string(), r.chain.clone()];
            check.extend(r.spec.iter().cloned());
            if self.run(&check)?.status.success() {
                continue;
            }
            let mut insert = vec!["-I".to_string(), r.chain.clone(), "1".to_string()];
            insert.extend(r.spec.iter().cloned());
            self.must(insert)?;
            repair
                .added
                .push(format!("{} {}", r.chain, r.spec.join(" ")));
        }
        Ok(repair)
    }

    /// Takes every rule out (each jump as often as it is there), then the
    /// chain. What is already gone is no error.
    pub fn remove(&self) -> Result<(), FirewallError> {
        for forward in ["DOCKER-USER", "FORWARD"] {
            for r in self.rules(forward).iter().filter(|r| r.chain != CHAIN) {
                let mut delete = vec!["-D".to_string(), r.chain.clone()];
                delete.extend(r.spec.iter().cloned());
                // At most a few copies; the bound only guards a loop.
                for _ in 0..16 {
                    if !self.run(&delete)?.status.success() {
                        break;
                    }
                }
            }
        }
        if self.chain_exists(CHAIN)? {
            self.must(words(&format!("-F {CHAIN}")))?;
            self.must(words(&format!("-X {CHAIN}")))?;
        }
        Ok(())
    }
}

/// Checks the rules every [`CHECK_INTERVAL`] until `shutdown`, putting back
/// what was removed: each repair is a warning and counts in
/// `drover_agent_imds_firewall_repairs`; a check that fails is an error
/// line and counts in `drover_agent_imds_firewall_failures`.
pub async fn keep(firewall: ImdsFirewall, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(CHECK_INTERVAL) => {}
        }
        let fw = firewall.clone();
        match tokio::task::spawn_blocking(move || fw.ensure()).await {
            Ok(Ok(repair)) if repair.added.is_empty() => {}
            Ok(Ok(repair)) => {
                metrics.imds_firewall_repairs.inc();
                tracing::warn!(rules = ?repair.added, "imds firewall rules were missing; put back");
            }
            Ok(Err(e)) => {
                metrics.imds_firewall_failures.inc();
                tracing::error!(error = %drover_api::error::chain(&e), "cannot check the imds firewall");
            }
            Err(e) => {
                metrics.imds_firewall_failures.inc();
                tracing::error!(error = %e, "imds firewall check panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_comes_from_the_imds_url() {
        let fw = ImdsFirewall::for_url("http://169.254.169.254", "iptables".into()).unwrap();
        assert_eq!(
            (fw.address, fw.port),
            (Ipv4Addr::new(169, 254, 169, 254), 80)
        );
        let fw = ImdsFirewall::for_url("http://10.213.0.1:7341/", "iptables".into()).unwrap();
        assert_eq!((fw.address, fw.port), (Ipv4Addr::new(10, 213, 0, 1), 7341));
        for bad in [
            "https://169.254.169.254",
            "http://imds.local",
            "http://1.2.3.4:x",
        ] {
            assert!(
                ImdsFirewall::for_url(bad, "iptables".into()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn marked_packets_pass_and_the_jumps_catch_both_paths_to_imds() {
        let fw = ImdsFirewall::for_url("http://10.213.0.1:7341", "iptables".into()).unwrap();
        let rules = fw.rules("DOCKER-USER");
        let lines: Vec<String> = rules
            .iter()
            .map(|r| {
                format!(
                    "{}{} {}",
                    if r.first { "-I " } else { "-A " },
                    r.chain,
                    r.spec.join(" ")
                )
            })
            .collect();
        assert_eq!(
            lines,
            [
                "-A DROVER-IMDS -m mark --mark 0xd50 -j RETURN",
                "-A DROVER-IMDS -p tcp -j REJECT --reject-with tcp-reset",
                "-I OUTPUT -d 10.213.0.1/32 -p tcp -m tcp --dport 7341 -j DROVER-IMDS",
                "-I DOCKER-USER -d 10.213.0.1/32 -p tcp -m tcp --dport 7341 -j DROVER-IMDS",
            ]
        );
    }
}
