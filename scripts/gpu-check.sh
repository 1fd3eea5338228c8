#!/usr/bin/env bash
# Checks the agent's inventory against the real NVIDIA driver on a GPU machine.
#
#   scripts/gpu-check.sh BIN_DIR OUT_DIR
#
# BIN_DIR holds `drover-agent` and `inventory_probe` (release builds; see
# agent/examples/inventory_probe.rs). Writes the raw outputs to OUT_DIR and
# prints a field-by-field comparison with nvidia-smi; exits non-zero on a
# mismatch. Needs nvidia-smi and python3; Docker is not needed.
set -uo pipefail
bin=${1:?usage: gpu-check.sh BIN_DIR OUT_DIR}
out=${2:?usage: gpu-check.sh BIN_DIR OUT_DIR}
mkdir -p "$out"

# nvidia-smi puts its libraries where the loader may not look by default.
for d in /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu; do
  [ -e "$d/libnvidia-ml.so.1" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" && break
done

uname -a | tee "$out/uname.txt"
nvidia-smi -L | tee "$out/smi-L.txt"
nvidia-smi --query-gpu=index,name,uuid,serial,pci.bus_id,memory.total,memory.used,memory.free,driver_version,compute_cap,temperature.gpu,power.draw,ecc.mode.current,ecc.errors.uncorrected.volatile.total,ecc.errors.uncorrected.aggregate.total,mig.mode.current \
  --format=csv | tee "$out/smi-query.csv"
nvidia-smi -q > "$out/smi-q.txt"
nvidia-smi -q -x > "$out/smi-q.xml"

"$bin/drover-agent" inventory > "$out/inventory.txt" 2> "$out/inventory.stderr"; echo "inventory table rc=$?"
cat "$out/inventory.txt"
"$bin/drover-agent" inventory --json > "$out/inventory.json" 2>> "$out/inventory.stderr"; echo "inventory json rc=$?"
cat "$out/inventory.stderr"
"$bin/inventory_probe" 500 5 > "$out/probe.json" 2> "$out/probe.stderr"; echo "probe rc=$?"
cat "$out/probe.stderr"
python3 - "$out/inventory.json" "$out/smi-q.xml" "$out/probe.json" <<'PY'
import json, sys, xml.etree.ElementTree as ET

inv = json.load(open(sys.argv[1]))
smi = ET.parse(sys.argv[2]).getroot()
probe = json.load(open(sys.argv[3]))
MiB = 1024 * 1024
bad = 0

def check(what, ours, theirs):
    global bad
    ok = ours == theirs
    bad += 0 if ok else 1
    print(f"{'ok ' if ok else 'BAD'} {what}: drover={ours!r} nvidia-smi={theirs!r}")

def text(node, path):
    e = node.find(path)
    return None if e is None else (e.text or "").strip()

check("driver_version", (inv.get("driver") or {}).get("driver_version"), text(smi, "driver_version"))
check("cuda_version", (inv.get("driver") or {}).get("cuda_version"), text(smi, "cuda_version"))
gpus = smi.findall("gpu")
check("gpu count", len(inv["gpus"]), len(gpus))
for ours, theirs in zip(inv["gpus"], gpus):
    i = ours["index"]
    check(f"gpu{i} name", ours.get("name"), text(theirs, "product_name"))
    check(f"gpu{i} uuid", ours.get("uuid"), text(theirs, "uuid"))
    check(f"gpu{i} serial", ours.get("serial"), text(theirs, "serial"))
    # nvidia-smi prints the 8-digit domain, NVML's v2 id too.
    check(f"gpu{i} pci_bus_id", (ours.get("pci_bus_id") or "").upper(), (theirs.get("id") or "").upper())
    mem = ours.get("memory") or {}
    check(f"gpu{i} memory total MiB", mem.get("total_bytes", 0) // MiB,
          int(text(theirs, "fb_memory_usage/total").split()[0]))
    cc = text(theirs, "compute_cap") or None
    if cc is not None:
        check(f"gpu{i} compute capability", ours.get("compute_capability"), cc)
    ecc_now = text(theirs, "ecc_mode/current_ecc")
    if ecc_now not in (None, "N/A"):
        check(f"gpu{i} ecc enabled", (ours.get("ecc") or {}).get("enabled"), ecc_now == "Enabled")
    mig = text(theirs, "mig_mode/current_mig")
    if mig not in (None, "N/A"):
        check(f"gpu{i} mig enabled", (ours.get("mig") or {}).get("enabled"), mig == "Enabled")
    rr = theirs.find("remapped_rows")
    if rr is not None and text(rr, "remapped_row_corr") not in (None, "N/A"):
        ours_rr = ours.get("remapped_rows") or {}
        check(f"gpu{i} remapped rows correctable", ours_rr.get("correctable"), int(text(rr, "remapped_row_corr")))
        check(f"gpu{i} remapped rows uncorrectable", ours_rr.get("uncorrectable"), int(text(rr, "remapped_row_unc")))
    print(f"    gpu{i} health: {ours.get('health')}")
print("probe: event watcher running:", probe["event_watcher_running"], "refresh µs:", probe["refresh_us"])
print("mismatches:", bad)
sys.exit(1 if bad else 0)
PY
