# Drover's node image for Azure: Ubuntu 22.04 LTS with Docker, drover-agent
# and drover-init, the agent's systemd unit and config, log rotation and,
# optionally, images pulled ahead of time. `-var variant=gpu` adds the NVIDIA
# driver and nvidia-container-toolkit. See README.md beside this file.
#
# Written for Packer 1.6 and later with the azure-arm builder built in (as
# Debian's packer has it); no plugin to download.

variable "variant" {
  type        = string
  default     = "cpu"
  description = "cpu, or gpu for the NVIDIA driver and nvidia-container-toolkit."
}

variable "subscription_id" {
  type        = string
  default     = ""
  description = "Azure subscription (default: the Azure CLI's current one)."
}

variable "resource_group" {
  type        = string
  description = "Resource group the managed image is written to."
}

variable "location" {
  type    = string
  default = "westeurope"
}

variable "vm_size" {
  type        = string
  default     = ""
  description = "Size of the build VM (default: Standard_D4s_v5, or Standard_NC4as_T4_v3 for gpu)."
}

variable "image_name" {
  type        = string
  default     = ""
  description = "Managed image name (default: drover-node-VARIANT-TIMESTAMP)."
}

variable "agent_binary" {
  type        = string
  default     = "target/release/drover-agent"
  description = "The drover-agent binary, built for x86_64 Linux (glibc 2.35 or older)."
}

variable "init_binary" {
  type        = string
  default     = "target/x86_64-unknown-linux-gnu/release/drover-init"
  description = "The static drover-init binary."
}

variable "nvidia_driver" {
  type        = string
  default     = "535-server"
  description = "Ubuntu's NVIDIA driver series (gpu variant)."
}

variable "prepull_images" {
  type        = list(string)
  default     = []
  description = "Images pulled and pinned in the image, so jobs start without a pull."
}

variable "prepull_environments" {
  type        = list(string)
  default     = []
  description = "Registered environments NAME[:VERSION] built or pulled and pinned."
}

variable "prepull_server" {
  type        = string
  default     = ""
  description = "The control plane the environments come from."
}

variable "prepull_token" {
  type        = string
  default     = ""
  sensitive   = true
  description = "Its API token, if it needs one; used while baking, never written to the image."
}

locals {
  gpu        = var.variant == "gpu"
  vm_size    = var.vm_size != "" ? var.vm_size : (local.gpu ? "Standard_NC4as_T4_v3" : "Standard_D4s_v5")
  image_name = var.image_name != "" ? var.image_name : "drover-node-${var.variant}-${formatdate("YYYYMMDDhhmmss", timestamp())}"
}

source "azure-arm" "node" {
  use_azure_cli_auth = true
  subscription_id    = var.subscription_id

  os_type         = "Linux"
  image_publisher = "Canonical"
  image_offer     = "0001-com-ubuntu-server-jammy"
  image_sku       = "22_04-lts-gen2"
  location        = var.location
  vm_size         = local.vm_size

  managed_image_name                = local.image_name
  managed_image_resource_group_name = var.resource_group

  azure_tags = {
    "drover-image"   = "node"
    "drover-variant" = var.variant
  }
}

build {
  sources = ["source.azure-arm.node"]

  provisioner "shell" {
    inline = ["mkdir -p /tmp/drover-vm/bin"]
  }

  provisioner "file" {
    source      = "${path.root}/"
    destination = "/tmp/drover-vm"
  }

  provisioner "file" {
    source      = var.agent_binary
    destination = "/tmp/drover-vm/bin/drover-agent"
  }

  provisioner "file" {
    source      = var.init_binary
    destination = "/tmp/drover-vm/bin/drover-init"
  }

  # The one provisioning script (idempotent).
  provisioner "shell" {
    environment_vars = [
      "DROVER_GPU=${local.gpu ? "1" : "0"}",
      "DROVER_NVIDIA_DRIVER=${var.nvidia_driver}",
      "DROVER_PREPULL_IMAGES=${join(" ", var.prepull_images)}",
      "DROVER_PREPULL_ENVIRONMENTS=${join(" ", var.prepull_environments)}",
      "DROVER_PREPULL_SERVER=${var.prepull_server}",
      "DROVER_TOKEN=${var.prepull_token}",
    ]
    inline = ["sudo -E bash /tmp/drover-vm/provision.sh"]
  }

  # Generalize, as every Azure image must be; nothing of the build VM
  # (its user, host keys, cloud-init state, the files uploaded) stays.
  provisioner "shell" {
    execute_command = "chmod +x {{ .Path }}; {{ .Vars }} sudo -E sh '{{ .Path }}'"
    inline = [
      "rm -rf /tmp/drover-vm",
      "cloud-init clean --logs",
      "/usr/sbin/waagent -force -deprovision+user && export HISTSIZE=0 && sync",
    ]
    inline_shebang = "/bin/sh -x"
  }
}
