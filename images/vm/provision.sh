#!/bin/bash
# Provisions a Drover node image: Docker, the agent and drover-init, the
# agent's systemd unit and config, log rotation and, when asked, images
# pulled ahead of time. Idempotent: running it again changes nothing.
#
# The Packer template (drover-node.pkr.hcl) runs it on an Ubuntu 22.04 VM;
# tests/tests/vm_image.rs runs it twice in a Debian bookworm container.
#
# Nothing secret goes into the image: the join token and the control plane's
# URL arrive at first boot (cloud-init.yaml, or IMDS user data).
#
# Environment:
#   DROVER_BIN_DIR      folder holding drover-agent and drover-init
#                       (default: bin/ beside this script)
#   DROVER_GPU          1: also the NVIDIA driver and nvidia-container-toolkit
#   DROVER_NVIDIA_DRIVER  the driver's Ubuntu package series (default 535-server)
#   DROVER_PREPULL_IMAGES        images to pull and pin, space-separated
#   DROVER_PREPULL_ENVIRONMENTS  environments NAME[:VERSION], space-separated
#   DROVER_PREPULL_SERVER        control plane the environments come from
#                                (its token, if it needs one, in DROVER_TOKEN)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin_dir="${DROVER_BIN_DIR:-$here/bin}"
gpu="${DROVER_GPU:-0}"
nvidia_driver="${DROVER_NVIDIA_DRIVER:-535-server}"
read -r -a prepull_images <<<"${DROVER_PREPULL_IMAGES:-}"
read -r -a prepull_environments <<<"${DROVER_PREPULL_ENVIRONMENTS:-}"
prepull_server="${DROVER_PREPULL_SERVER:-}"

export DEBIAN_FRONTEND=noninteractive

log() { echo "provision: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    echo "provision: run as root (sudo $0)" >&2
    exit 1
fi
for f in drover-agent drover-init; do
    if [ ! -x "$bin_dir/$f" ]; then
        echo "provision: $bin_dir/$f is missing; build it first (see images/vm/README.md) or set DROVER_BIN_DIR" >&2
        exit 1
    fi
done

# Packages: only what is missing, so a second run asks apt nothing.
packages=(docker.io iptables logrotate ca-certificates)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The engine's settings: container logs rotated by the engine (the agent
# ships them to the control plane as they come).
install -d -m 0755 /etc/docker
daemon_json_before="$(cat /etc/docker/daemon.json 2>/dev/null || true)"
install -m 0644 "$here/docker-daemon.json" /etc/docker/daemon.json

if [ "$gpu" = "1" ]; then
    # The driver from Ubuntu's archive; the toolkit from NVIDIA's (Ubuntu
    # carries none). The agent loads libnvidia-ml.so.1 at run time.
    if ! dpkg-query -W -f='${Status}' "nvidia-headless-$nvidia_driver" 2>/dev/null | grep -q "install ok installed"; then
        log "installing the NVIDIA driver $nvidia_driver"
        apt-get update -q
        apt-get install -y -q --no-install-recommends \
            "nvidia-headless-$nvidia_driver" "nvidia-utils-$nvidia_driver"
    fi
    if ! dpkg-query -W -f='${Status}' nvidia-container-toolkit 2>/dev/null | grep -q "install ok installed"; then
        log "installing nvidia-container-toolkit"
        apt-get install -y -q --no-install-recommends curl gnupg
        keyring=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg
        curl -fsSL https://nvidia.github.io/libnvidia-container/gpgkey |
            gpg --batch --yes --dearmor -o "$keyring"
        curl -fsSL https://nvidia.github.io/libnvidia-container/stable/deb/nvidia-container-toolkit.list |
            sed "s#deb https://#deb [signed-by=$keyring] https://#g" \
                >/etc/apt/sources.list.d/nvidia-container-toolkit.list
        apt-get update -q
        apt-get install -y -q --no-install-recommends nvidia-container-toolkit
    fi
    # Registers the nvidia runtime in daemon.json (merged into ours above;
    # the same result every run). Docker's --gpus device requests, which
    # the agent uses, need the toolkit's hook.
    nvidia-ctk runtime configure --runtime=docker
fi

# The agent and drover-init (bound into every job container as PID 1).
install -d -m 0755 /usr/local/bin /usr/local/lib/drover
install -m 0755 "$bin_dir/drover-agent" /usr/local/bin/drover-agent
install -m 0755 "$bin_dir/drover-init" /usr/local/lib/drover/drover-init

# Its config (no secret: the join settings come at first boot), the folder
# for the node's own registry logins (DOCKER_CONFIG), its data dir.
install -d -m 0755 /etc/drover
install -m 0644 "$here/agent.toml" /etc/drover/agent.toml
install -d -m 0700 /etc/drover/docker
install -d -m 0700 /var/lib/drover-agent

# The unit, enabled (what `systemctl enable` does, without needing a
# running systemd) but not started: it starts at the VM's first boot.
install -m 0644 "$here/drover-agent.service" /etc/systemd/system/drover-agent.service
install -d -m 0755 /etc/systemd/system/multi-user.target.wants
ln -sfn /etc/systemd/system/drover-agent.service \
    /etc/systemd/system/multi-user.target.wants/drover-agent.service

# Log rotation: the agent logs to the journal (bounded here); its identity
# audit log is rotated by logrotate.
install -d -m 0755 /etc/systemd/journald.conf.d /etc/logrotate.d
install -m 0644 "$here/journald-drover.conf" /etc/systemd/journald.conf.d/drover.conf
install -m 0644 "$here/logrotate-drover-agent" /etc/logrotate.d/drover-agent

running_systemd=0
[ -d /run/systemd/system ] && running_systemd=1
if [ "$running_systemd" = "1" ]; then
    systemctl daemon-reload
    # A running engine takes the new daemon.json now (the image's first
    # boot would anyway).
    if [ "$(cat /etc/docker/daemon.json)" != "$daemon_json_before" ]; then
        systemctl try-restart docker.service
    fi
fi

# The IMDS firewall (chain DROVER-IMDS) is not installed here: the agent
# installs it itself at every start, before any job container, and puts
# back what is removed while it runs. The unit grants what that needs.

# Images pulled (or environments built) ahead of time and pinned, so jobs
# start without a pull.
if [ "${#prepull_images[@]}" -gt 0 ] || [ "${#prepull_environments[@]}" -gt 0 ]; then
    if ! docker info >/dev/null 2>&1; then
        if [ "$running_systemd" = "1" ]; then
            systemctl start docker.service
        else
            echo "provision: prepulling needs a running Docker engine" >&2
            exit 1
        fi
    fi
    args=(prepull --config /etc/drover/agent.toml)
    for i in "${prepull_images[@]}"; do args+=(--image "$i"); done
    for e in "${prepull_environments[@]}"; do args+=(--environment "$e"); done
    if [ -n "$prepull_server" ]; then args+=(--from-server "$prepull_server"); fi
    log "drover-agent ${args[*]}"
    /usr/local/bin/drover-agent "${args[@]}"
else
    log "no images to prepull"
fi

log "done"
