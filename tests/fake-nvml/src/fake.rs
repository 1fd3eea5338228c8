//! The fake NVML: profile, state and every export except [`crate::optional`]'s.
//!
//! Handles are integers disguised as pointers and never dereferenced: a device
//! handle is `index + 1`, an event set handle is its id. Whatever a caller
//! passes, the worst outcome is `NVML_ERROR_INVALID_ARGUMENT`.
//!
//! No export may panic (a panic cannot unwind through `extern "C"`): locks
//! recover from poisoning and every lookup is checked.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::{CStr, c_char, c_int, c_uint, c_ulonglong, c_void};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// `nvmlReturn_t`.
pub type NvmlReturn = c_uint;
/// `nvmlDevice_t`: opaque pointer; here `index + 1`.
pub type NvmlDevice = *mut c_void;
/// `nvmlEventSet_t`: opaque pointer; here the set's id.
pub type NvmlEventSet = *mut c_void;

/// `NVML_SUCCESS`.
pub const NVML_SUCCESS: NvmlReturn = 0;
const NVML_ERROR_UNINITIALIZED: NvmlReturn = 1;
const NVML_ERROR_INVALID_ARGUMENT: NvmlReturn = 2;
const NVML_ERROR_NOT_SUPPORTED: NvmlReturn = 3;
const NVML_ERROR_INSUFFICIENT_SIZE: NvmlReturn = 7;
const NVML_ERROR_DRIVER_NOT_LOADED: NvmlReturn = 9;
const NVML_ERROR_TIMEOUT: NvmlReturn = 10;
const NVML_ERROR_UNKNOWN: NvmlReturn = 999;

const EVENT_SINGLE_BIT_ECC: u64 = 1;
const EVENT_DOUBLE_BIT_ECC: u64 = 2;
const EVENT_XID: u64 = 8;

/// How often a blocked `nvmlEventSetWait_v2` looks at the events file.
///
/// A real driver blocks in the kernel until an event or the timeout; the fake
/// has to poll a file, so it polls coarsely: at 5 ms the agent's idle
/// `gpu-events` thread cost about 1% of a core against the fake (200 wake-ups
/// a second, each opening and reading the file), which a benchmark of the
/// agent's idle footprint would wrongly charge to the agent. 100 ms keeps
/// injected events prompt for tests (they wait seconds) at a twentieth of that.
const EVENT_POLL: Duration = Duration::from_millis(100);

/// A machine, as the profile file describes it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Free text for people reading the profile; the library ignores it.
    #[serde(default)]
    #[allow(dead_code)]
    pub description: String,
    /// `nvmlSystemGetDriverVersion`, e.g. `550.54.15`.
    pub driver_version: String,
    /// As NVML encodes it: 12040 is CUDA 12.4.
    pub cuda_driver_version: i32,
    /// `nvmlSystemGetNVMLVersion`, e.g. `12.550.54.15`.
    pub nvml_version: String,
    /// Events file, relative to the profile's directory.
    #[serde(default)]
    pub events_file: Option<PathBuf>,
    /// The GPUs, in NVML index order.
    pub gpus: Vec<Gpu>,
}

/// One GPU of a profile. `null` for an optional block means the GPU does not
/// support that query (`NVML_ERROR_NOT_SUPPORTED`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gpu {
    /// `nvmlDeviceGetName`.
    pub name: String,
    /// `nvmlDeviceGetUUID`, `GPU-` and a UUID.
    pub uuid: String,
    /// `nvmlDeviceGetSerial`.
    pub serial: String,
    /// `nvmlPciInfo_t.busId`, `DDDDDDDD:BB:DD.F`.
    pub pci_bus_id: String,
    /// `nvmlPciInfo_t.pciDeviceId` (device id << 16 | vendor id).
    pub pci_device_id: u32,
    /// `nvmlPciInfo_t.pciSubSystemId`.
    pub pci_subsystem_id: u32,
    /// `nvmlMemory_v2_t.total`, bytes.
    pub memory_total: u64,
    /// `nvmlMemory_v2_t.reserved`, bytes.
    pub memory_reserved: u64,
    /// `nvmlMemory_v2_t.used`, bytes.
    pub memory_used: u64,
    /// `nvmlMemory_v2_t.free`, bytes.
    pub memory_free: u64,
    /// `nvmlUtilization_t.gpu`, percent.
    pub utilization_gpu: u32,
    /// `nvmlUtilization_t.memory`, percent.
    pub utilization_memory: u32,
    /// `nvmlDeviceGetTemperature(NVML_TEMPERATURE_GPU)`, °C.
    pub temperature_c: u32,
    /// `nvmlDeviceGetPowerUsage`, milliwatts.
    pub power_mw: u32,
    /// `nvmlDeviceGetCudaComputeCapability` as `[major, minor]`.
    pub compute_capability: [i32; 2],
    /// `nvmlDeviceGetEccMode`; `null`: no ECC (then no ECC counters either).
    pub ecc: Option<EnableState>,
    /// `nvmlDeviceGetTotalEccErrors(UNCORRECTED, VOLATILE)`.
    pub ecc_uncorrected_volatile: Option<u64>,
    /// `nvmlDeviceGetTotalEccErrors(UNCORRECTED, AGGREGATE)`.
    pub ecc_uncorrected_aggregate: Option<u64>,
    /// `nvmlDeviceGetRetiredPages*`; `null` on Ampere and later.
    pub retired_pages: Option<RetiredPages>,
    /// `nvmlDeviceGetRemappedRows`; `null` before Ampere.
    pub remapped_rows: Option<RemappedRows>,
    /// `nvmlDeviceGetMigMode`; `null` on GPUs without MIG.
    pub mig: Option<EnableState>,
    /// Event kinds the GPU supports: `xid`, `dbe`, `sbe`.
    pub events: Vec<String>,
}

/// An on/off setting with its after-reboot value.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnableState {
    /// Enabled now.
    pub current: bool,
    /// Enabled after the next reboot or reset.
    pub pending: bool,
}

/// Page retirement (Kepler to Volta/Turing).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetiredPages {
    /// Pages retired for repeated single-bit errors.
    pub single_bit_ecc: u32,
    /// Pages retired for a double-bit error.
    pub double_bit_ecc: u32,
    /// `nvmlDeviceGetRetiredPagesPendingStatus`.
    pub pending: bool,
}

/// Row remapping (Ampere and later).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemappedRows {
    /// Rows remapped for correctable errors.
    pub correctable: u32,
    /// Rows remapped for uncorrectable errors.
    pub uncorrectable: u32,
    /// A remapping waits for a GPU reset.
    pub pending: bool,
    /// A remapping failed.
    pub failed: bool,
}

impl Gpu {
    fn supported_events(&self) -> u64 {
        self.events.iter().fold(0, |mask, e| {
            mask | match e.as_str() {
                "xid" => EVENT_XID,
                "dbe" => EVENT_DOUBLE_BIT_ECC,
                "sbe" => EVENT_SINGLE_BIT_ECC,
                _ => 0,
            }
        })
    }
}

/// One delivered event: (gpu index, event type, event data).
type Event = (u32, u64, u64);

struct EventSet {
    /// GPU index → registered event types.
    registered: HashMap<u32, u64>,
    /// Bytes of the events file already looked at.
    offset: u64,
    /// Events read but not yet returned.
    pending: VecDeque<Event>,
}

struct State {
    /// `nvmlInit_v2` calls not yet matched by `nvmlShutdown`.
    init_count: u32,
    profile: Option<Profile>,
    events_file: PathBuf,
    sets: BTreeMap<usize, EventSet>,
    next_set: usize,
}

static STATE: Mutex<State> = Mutex::new(State {
    init_count: 0,
    profile: None,
    events_file: PathBuf::new(),
    sets: BTreeMap::new(),
    next_set: 1,
});

fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The file this library was loaded from, found through `dladdr` on one of
/// its own functions.
fn own_path() -> Option<PathBuf> {
    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    // SAFETY: `nvmlInit_v2` is an address inside this library; `info` is a
    // writable Dl_info. dladdr returns 0 on failure, leaving `info` unused.
    let ok = unsafe { libc::dladdr(nvmlInit_v2 as *const c_void, info.as_mut_ptr()) };
    if ok == 0 {
        return None;
    }
    // SAFETY: dladdr succeeded, so `info` is initialised and `dli_fname`,
    // when not null, is a NUL-terminated string owned by the loader.
    let info = unsafe { info.assume_init() };
    if info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: checked non-null above; valid while the library is loaded.
    let name = unsafe { CStr::from_ptr(info.dli_fname) };
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(name.to_bytes())))
}

fn profile_path() -> Option<PathBuf> {
    let beside = own_path().and_then(|p| p.parent().map(|d| d.join("fake-nvml-profile.json")));
    match beside {
        Some(p) if p.is_file() => Some(p),
        _ => std::env::var_os("FAKE_NVML_PROFILE").map(PathBuf::from),
    }
}

fn load(path: &Path) -> Result<(Profile, PathBuf), String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let profile: Profile =
        serde_json::from_str(&text).map_err(|e| format!("parsing {}: {e}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let events = match (std::env::var_os("FAKE_NVML_EVENTS"), &profile.events_file) {
        (Some(env), _) => PathBuf::from(env),
        (None, Some(f)) => dir.join(f),
        (None, None) => dir.join("fake-nvml-events"),
    };
    Ok((profile, events))
}

/// Runs `f` on the profile of an initialised library.
fn with_profile(f: impl FnOnce(&Profile) -> NvmlReturn) -> NvmlReturn {
    let st = state();
    match (&st.profile, st.init_count) {
        (Some(p), 1..) => f(p),
        _ => NVML_ERROR_UNINITIALIZED,
    }
}

/// Runs `f` on the GPU a device handle names.
pub fn with_gpu(device: NvmlDevice, f: impl FnOnce(&Gpu) -> NvmlReturn) -> NvmlReturn {
    with_profile(
        |p| match gpu_index(device).and_then(|i| p.gpus.get(i as usize)) {
            Some(gpu) => f(gpu),
            None => NVML_ERROR_INVALID_ARGUMENT,
        },
    )
}

fn gpu_index(device: NvmlDevice) -> Option<u32> {
    (device as usize)
        .checked_sub(1)
        .and_then(|i| u32::try_from(i).ok())
}

fn handle(index: u32) -> NvmlDevice {
    (index as usize + 1) as NvmlDevice
}

/// Writes `s` NUL-terminated into the caller's `len`-byte buffer.
///
/// # Safety
/// `buf` must be valid for `len` bytes of writes.
unsafe fn write_str(s: &str, buf: *mut c_char, len: c_uint) -> NvmlReturn {
    if buf.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    if s.len() + 1 > len as usize {
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    // SAFETY: `buf` has room for `len >= s.len() + 1` bytes (caller's contract).
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr().cast::<c_char>(), buf, s.len());
        *buf.add(s.len()) = 0;
    }
    NVML_SUCCESS
}

/// Writes `v` through `out` if it is not null.
///
/// # Safety
/// `out`, if not null, must be valid for writes.
unsafe fn put<T>(out: *mut T, v: T) -> NvmlReturn {
    if out.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: non-null and writable per the caller's contract.
    unsafe { out.write(v) };
    NVML_SUCCESS
}

// ---------------------------------------------------------------- library

/// `nvmlInit_v2`: reference-counted; the profile is read on the first call.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> NvmlReturn {
    let mut st = state();
    if st.init_count == 0 {
        let Some(path) = profile_path() else {
            // No profile: behave like a machine whose driver is not loaded.
            return NVML_ERROR_DRIVER_NOT_LOADED;
        };
        match load(&path) {
            Ok((profile, events_file)) => {
                st.profile = Some(profile);
                st.events_file = events_file;
            }
            Err(e) => {
                // A broken fixture must be loud; this library only runs in tests.
                eprintln!("fake-nvml: {e}");
                return NVML_ERROR_UNKNOWN;
            }
        }
    }
    st.init_count += 1;
    NVML_SUCCESS
}

/// `nvmlShutdown`: the last call forgets the profile and all event sets.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> NvmlReturn {
    let mut st = state();
    match st.init_count {
        0 => NVML_ERROR_UNINITIALIZED,
        1 => {
            st.init_count = 0;
            st.profile = None;
            st.sets.clear();
            NVML_SUCCESS
        }
        _ => {
            st.init_count -= 1;
            NVML_SUCCESS
        }
    }
}

/// `nvmlErrorString`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlErrorString(result: NvmlReturn) -> *const c_char {
    let s: &'static CStr = match result {
        NVML_SUCCESS => c"Success",
        NVML_ERROR_UNINITIALIZED => c"Uninitialized",
        NVML_ERROR_INVALID_ARGUMENT => c"Invalid Argument",
        NVML_ERROR_NOT_SUPPORTED => c"Not Supported",
        NVML_ERROR_INSUFFICIENT_SIZE => c"Insufficient Size",
        NVML_ERROR_DRIVER_NOT_LOADED => c"Driver Not Loaded",
        NVML_ERROR_TIMEOUT => c"Timeout",
        _ => c"Unknown Error",
    };
    s.as_ptr()
}

/// `nvmlSystemGetDriverVersion`.
///
/// # Safety
/// `version` must be valid for `length` bytes of writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(
    version: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    // SAFETY: forwarded caller contract.
    with_profile(|p| unsafe { write_str(&p.driver_version, version, length) })
}

/// `nvmlSystemGetNVMLVersion`.
///
/// # Safety
/// `version` must be valid for `length` bytes of writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetNVMLVersion(
    version: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    // SAFETY: forwarded caller contract.
    with_profile(|p| unsafe { write_str(&p.nvml_version, version, length) })
}

/// `nvmlSystemGetCudaDriverVersion_v2`.
///
/// # Safety
/// `version` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion_v2(version: *mut c_int) -> NvmlReturn {
    // SAFETY: forwarded caller contract.
    with_profile(|p| unsafe { put(version, p.cuda_driver_version) })
}

// ---------------------------------------------------------------- devices

/// `nvmlDeviceGetCount_v2`.
///
/// # Safety
/// `count` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> NvmlReturn {
    with_profile(|p| {
        let n = u32::try_from(p.gpus.len()).unwrap_or(u32::MAX);
        // SAFETY: forwarded caller contract.
        unsafe { put(count, n) }
    })
}

/// `nvmlDeviceGetHandleByIndex_v2`.
///
/// # Safety
/// `device` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut NvmlDevice,
) -> NvmlReturn {
    with_profile(|p| {
        if index as usize >= p.gpus.len() {
            return NVML_ERROR_INVALID_ARGUMENT;
        }
        // SAFETY: forwarded caller contract.
        unsafe { put(device, handle(index)) }
    })
}

/// `nvmlDeviceGetIndex`.
///
/// # Safety
/// `index` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetIndex(device: NvmlDevice, index: *mut c_uint) -> NvmlReturn {
    with_gpu(device, |_| match gpu_index(device) {
        // SAFETY: forwarded caller contract.
        Some(i) => unsafe { put(index, i) },
        None => NVML_ERROR_INVALID_ARGUMENT,
    })
}

/// `nvmlDeviceGetName`.
///
/// # Safety
/// `name` must be valid for `length` bytes of writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: NvmlDevice,
    name: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    // SAFETY: forwarded caller contract.
    with_gpu(device, |g| unsafe { write_str(&g.name, name, length) })
}

/// `nvmlDeviceGetUUID`.
///
/// # Safety
/// `uuid` must be valid for `length` bytes of writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: NvmlDevice,
    uuid: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    // SAFETY: forwarded caller contract.
    with_gpu(device, |g| unsafe { write_str(&g.uuid, uuid, length) })
}

/// `nvmlDeviceGetSerial`.
///
/// # Safety
/// `serial` must be valid for `length` bytes of writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSerial(
    device: NvmlDevice,
    serial: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    // SAFETY: forwarded caller contract.
    with_gpu(device, |g| unsafe { write_str(&g.serial, serial, length) })
}

/// `nvmlPciInfo_t` (`nvml.h`, v3 layout).
#[repr(C)]
pub struct PciInfo {
    bus_id_legacy: [c_char; 16],
    domain: c_uint,
    bus: c_uint,
    device: c_uint,
    pci_device_id: c_uint,
    pci_sub_system_id: c_uint,
    bus_id: [c_char; 32],
}

fn c_array<const N: usize>(s: &str) -> [c_char; N] {
    let mut out = [0 as c_char; N];
    for (o, b) in out.iter_mut().zip(s.bytes().take(N - 1)) {
        *o = b as c_char;
    }
    out
}

/// `nvmlDeviceGetPciInfo_v3`. The bus id is `DDDDDDDD:BB:DD.F`.
///
/// # Safety
/// `pci` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(
    device: NvmlDevice,
    pci: *mut PciInfo,
) -> NvmlReturn {
    with_gpu(device, |g| {
        let mut parts = g
            .pci_bus_id
            .split([':', '.'])
            .map(|p| u32::from_str_radix(p, 16).unwrap_or(0));
        let (domain, bus, dev) = (
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
        );
        let info = PciInfo {
            // The legacy form has a 4-digit domain.
            bus_id_legacy: c_array(&format!("{:04x}:{:02x}:{:02x}.0", domain, bus, dev)),
            domain,
            bus,
            device: dev,
            pci_device_id: g.pci_device_id,
            pci_sub_system_id: g.pci_subsystem_id,
            bus_id: c_array(&g.pci_bus_id),
        };
        // SAFETY: forwarded caller contract.
        unsafe { put(pci, info) }
    })
}

/// `nvmlMemory_v2_t`.
#[repr(C)]
pub struct MemoryV2 {
    version: c_uint,
    total: c_ulonglong,
    reserved: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}

/// `nvmlDeviceGetMemoryInfo_v2`. Checks the struct version the caller set,
/// as the driver does.
///
/// # Safety
/// `memory` must be valid for reads and writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: NvmlDevice,
    memory: *mut MemoryV2,
) -> NvmlReturn {
    with_gpu(device, |g| {
        if memory.is_null() {
            return NVML_ERROR_INVALID_ARGUMENT;
        }
        // NVML_STRUCT_VERSION(Memory, 2)
        let expected = (std::mem::size_of::<MemoryV2>() | (2 << 24)) as c_uint;
        // SAFETY: non-null, readable per the caller's contract.
        if unsafe { (*memory).version } != expected {
            return NVML_ERROR_INVALID_ARGUMENT;
        }
        let info = MemoryV2 {
            version: expected,
            total: g.memory_total,
            reserved: g.memory_reserved,
            free: g.memory_free,
            used: g.memory_used,
        };
        // SAFETY: forwarded caller contract.
        unsafe { put(memory, info) }
    })
}

/// `nvmlUtilization_t`.
#[repr(C)]
pub struct Utilization {
    gpu: c_uint,
    memory: c_uint,
}

/// `nvmlDeviceGetUtilizationRates`.
///
/// # Safety
/// `utilization` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: NvmlDevice,
    utilization: *mut Utilization,
) -> NvmlReturn {
    with_gpu(device, |g| {
        let u = Utilization {
            gpu: g.utilization_gpu,
            memory: g.utilization_memory,
        };
        // SAFETY: forwarded caller contract.
        unsafe { put(utilization, u) }
    })
}

/// `nvmlDeviceGetTemperature`; only `NVML_TEMPERATURE_GPU` (0) exists.
///
/// # Safety
/// `temp` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: NvmlDevice,
    sensor: c_uint,
    temp: *mut c_uint,
) -> NvmlReturn {
    with_gpu(device, |g| match sensor {
        // SAFETY: forwarded caller contract.
        0 => unsafe { put(temp, g.temperature_c) },
        _ => NVML_ERROR_INVALID_ARGUMENT,
    })
}

/// `nvmlDeviceGetCudaComputeCapability`.
///
/// # Safety
/// `major` and `minor` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCudaComputeCapability(
    device: NvmlDevice,
    major: *mut c_int,
    minor: *mut c_int,
) -> NvmlReturn {
    with_gpu(device, |g| {
        // SAFETY: forwarded caller contract.
        match unsafe { put(major, g.compute_capability[0]) } {
            NVML_SUCCESS => unsafe { put(minor, g.compute_capability[1]) },
            e => e,
        }
    })
}

/// Writes an enable-state pair (`nvmlEnableState_t` or MIG mode, both
/// `unsigned int`, 1 = enabled).
///
/// # Safety
/// Both pointers must be valid for writes.
unsafe fn put_pair(
    state: Option<EnableState>,
    current: *mut c_uint,
    pending: *mut c_uint,
) -> NvmlReturn {
    let Some(s) = state else {
        return NVML_ERROR_NOT_SUPPORTED;
    };
    // SAFETY: forwarded caller contract.
    match unsafe { put(current, c_uint::from(s.current)) } {
        NVML_SUCCESS => unsafe { put(pending, c_uint::from(s.pending)) },
        e => e,
    }
}

/// `nvmlDeviceGetEccMode`.
///
/// # Safety
/// `current` and `pending` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetEccMode(
    device: NvmlDevice,
    current: *mut c_uint,
    pending: *mut c_uint,
) -> NvmlReturn {
    // SAFETY: forwarded caller contract.
    with_gpu(device, |g| unsafe { put_pair(g.ecc, current, pending) })
}

/// `nvmlDeviceGetMigMode`.
///
/// # Safety
/// `current` and `pending` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(
    device: NvmlDevice,
    current: *mut c_uint,
    pending: *mut c_uint,
) -> NvmlReturn {
    // SAFETY: forwarded caller contract.
    with_gpu(device, |g| unsafe { put_pair(g.mig, current, pending) })
}

/// `nvmlDeviceGetTotalEccErrors`: only uncorrected (error type 1) counts are
/// in profiles; corrected counts report zero.
///
/// # Safety
/// `count` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTotalEccErrors(
    device: NvmlDevice,
    error_type: c_uint,
    counter_type: c_uint,
    count: *mut c_ulonglong,
) -> NvmlReturn {
    with_gpu(device, |g| {
        if g.ecc.is_none() {
            return NVML_ERROR_NOT_SUPPORTED;
        }
        let n = match (error_type, counter_type) {
            (0, 0 | 1) => Some(0),
            (1, 0) => g.ecc_uncorrected_volatile,
            (1, 1) => g.ecc_uncorrected_aggregate,
            _ => return NVML_ERROR_INVALID_ARGUMENT,
        };
        match n {
            // SAFETY: forwarded caller contract.
            Some(n) => unsafe { put(count, n) },
            None => NVML_ERROR_NOT_SUPPORTED,
        }
    })
}

fn retired_count(g: &Gpu, cause: c_uint) -> Result<u32, NvmlReturn> {
    let r = g.retired_pages.ok_or(NVML_ERROR_NOT_SUPPORTED)?;
    match cause {
        0 => Ok(r.single_bit_ecc),
        1 => Ok(r.double_bit_ecc),
        _ => Err(NVML_ERROR_INVALID_ARGUMENT),
    }
}

/// Fills page addresses (and timestamps) for `nvmlDeviceGetRetiredPages*`:
/// with `*count` too small, sets the needed count and returns
/// `NVML_ERROR_INSUFFICIENT_SIZE`, as the driver does.
///
/// # Safety
/// `count` must be valid for reads and writes; `addresses` and `timestamps`
/// (if not null) for `*count` writes.
unsafe fn retired(
    device: NvmlDevice,
    cause: c_uint,
    count: *mut c_uint,
    addresses: *mut c_ulonglong,
    timestamps: *mut c_ulonglong,
) -> NvmlReturn {
    with_gpu(device, |g| {
        let n = match retired_count(g, cause) {
            Ok(n) => n,
            Err(e) => return e,
        };
        if count.is_null() {
            return NVML_ERROR_INVALID_ARGUMENT;
        }
        // SAFETY: non-null; readable and writable per the caller's contract.
        let room = unsafe { *count };
        // SAFETY: as above.
        unsafe { *count = n };
        if room < n {
            return NVML_ERROR_INSUFFICIENT_SIZE;
        }
        for i in 0..n as usize {
            // SAFETY: `i < n <= room`, the caller's buffer length.
            unsafe {
                if !addresses.is_null() {
                    *addresses.add(i) = 0x1000 * (i as u64 + 1);
                }
                if !timestamps.is_null() {
                    *timestamps.add(i) = 1_700_000_000 + i as u64;
                }
            }
        }
        NVML_SUCCESS
    })
}

/// `nvmlDeviceGetRetiredPages`.
///
/// # Safety
/// See [`retired`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPages(
    device: NvmlDevice,
    cause: c_uint,
    count: *mut c_uint,
    addresses: *mut c_ulonglong,
) -> NvmlReturn {
    // SAFETY: forwarded caller contract.
    unsafe { retired(device, cause, count, addresses, std::ptr::null_mut()) }
}

/// `nvmlDeviceGetRetiredPages_v2`.
///
/// # Safety
/// See [`retired`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPages_v2(
    device: NvmlDevice,
    cause: c_uint,
    count: *mut c_uint,
    addresses: *mut c_ulonglong,
    timestamps: *mut c_ulonglong,
) -> NvmlReturn {
    // SAFETY: forwarded caller contract.
    unsafe { retired(device, cause, count, addresses, timestamps) }
}

/// `nvmlDeviceGetRetiredPagesPendingStatus`.
///
/// # Safety
/// `pending` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPagesPendingStatus(
    device: NvmlDevice,
    pending: *mut c_uint,
) -> NvmlReturn {
    with_gpu(device, |g| match g.retired_pages {
        // SAFETY: forwarded caller contract.
        Some(r) => unsafe { put(pending, c_uint::from(r.pending)) },
        None => NVML_ERROR_NOT_SUPPORTED,
    })
}

/// `nvmlDeviceGetRemappedRows`.
///
/// # Safety
/// All four pointers must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetRemappedRows(
    device: NvmlDevice,
    corr_rows: *mut c_uint,
    unc_rows: *mut c_uint,
    is_pending: *mut c_uint,
    failure_occurred: *mut c_uint,
) -> NvmlReturn {
    with_gpu(device, |g| {
        let Some(r) = g.remapped_rows else {
            return NVML_ERROR_NOT_SUPPORTED;
        };
        // SAFETY: forwarded caller contract.
        unsafe {
            for rc in [
                put(corr_rows, r.correctable),
                put(unc_rows, r.uncorrectable),
                put(is_pending, c_uint::from(r.pending)),
                put(failure_occurred, c_uint::from(r.failed)),
            ] {
                if rc != NVML_SUCCESS {
                    return rc;
                }
            }
        }
        NVML_SUCCESS
    })
}

// ---------------------------------------------------------------- events

/// `nvmlDeviceGetSupportedEventTypes`.
///
/// # Safety
/// `event_types` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSupportedEventTypes(
    device: NvmlDevice,
    event_types: *mut c_ulonglong,
) -> NvmlReturn {
    // SAFETY: forwarded caller contract.
    with_gpu(device, |g| unsafe {
        put(event_types, g.supported_events())
    })
}

/// `nvmlEventSetCreate`. The set sees only events written after this call.
///
/// # Safety
/// `set` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut NvmlEventSet) -> NvmlReturn {
    let mut st = state();
    if st.init_count == 0 {
        return NVML_ERROR_UNINITIALIZED;
    }
    if set.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    let offset = std::fs::metadata(&st.events_file).map_or(0, |m| m.len());
    let id = st.next_set;
    st.next_set += 1;
    st.sets.insert(
        id,
        EventSet {
            registered: HashMap::new(),
            offset,
            pending: VecDeque::new(),
        },
    );
    // SAFETY: non-null, writable per the caller's contract.
    unsafe { put(set, id as NvmlEventSet) }
}

/// `nvmlEventSetFree`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlEventSetFree(set: NvmlEventSet) -> NvmlReturn {
    let mut st = state();
    if st.init_count == 0 {
        return NVML_ERROR_UNINITIALIZED;
    }
    match st.sets.remove(&(set as usize)) {
        Some(_) => NVML_SUCCESS,
        None => NVML_ERROR_INVALID_ARGUMENT,
    }
}

/// `nvmlDeviceRegisterEvents`: types the GPU does not support are refused
/// with `NVML_ERROR_NOT_SUPPORTED`, as the driver does.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceRegisterEvents(
    device: NvmlDevice,
    event_types: c_ulonglong,
    set: NvmlEventSet,
) -> NvmlReturn {
    let mut st = state();
    let Some(profile) = st.profile.as_ref().filter(|_| st.init_count > 0) else {
        return NVML_ERROR_UNINITIALIZED;
    };
    let Some(index) = gpu_index(device).filter(|&i| (i as usize) < profile.gpus.len()) else {
        return NVML_ERROR_INVALID_ARGUMENT;
    };
    let supported = profile.gpus[index as usize].supported_events();
    if event_types & !supported != 0 {
        return NVML_ERROR_NOT_SUPPORTED;
    }
    match st.sets.get_mut(&(set as usize)) {
        Some(s) => {
            *s.registered.entry(index).or_default() |= event_types;
            NVML_SUCCESS
        }
        None => NVML_ERROR_INVALID_ARGUMENT,
    }
}

/// `nvmlEventData_t`.
#[repr(C)]
pub struct EventData {
    device: NvmlDevice,
    event_type: c_ulonglong,
    event_data: c_ulonglong,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

/// Parses one events-file line into (gpu, type, data).
fn parse_event(line: &str) -> Option<Event> {
    let mut words = line.split_whitespace();
    let kind = words.next()?;
    let gpu: u32 = words.next()?.parse().ok()?;
    match kind {
        "xid" => Some((gpu, EVENT_XID, words.next()?.parse().ok()?)),
        "dbe" => Some((gpu, EVENT_DOUBLE_BIT_ECC, 0)),
        "sbe" => Some((gpu, EVENT_SINGLE_BIT_ECC, 0)),
        _ => None,
    }
}

/// Reads complete lines appended to the events file since the set last
/// looked, queueing those the set registered for.
fn poll_events(events_file: &Path, set: &mut EventSet) {
    // One `stat` when nothing was appended (the common case while idle).
    if !matches!(std::fs::metadata(events_file), Ok(m) if m.len() > set.offset) {
        return;
    }
    let Ok(mut file) = std::fs::File::open(events_file) else {
        return;
    };
    let mut buf = Vec::new();
    if file.seek(SeekFrom::Start(set.offset)).is_err() || file.read_to_end(&mut buf).is_err() {
        return;
    }
    // Only whole lines: a writer may be half-way through one.
    let Some(end) = buf.iter().rposition(|&b| b == b'\n') else {
        return;
    };
    set.offset += end as u64 + 1;
    for line in String::from_utf8_lossy(&buf[..end]).lines() {
        if let Some(ev @ (gpu, ty, _)) = parse_event(line)
            && set.registered.get(&gpu).is_some_and(|mask| mask & ty != 0)
        {
            set.pending.push_back(ev);
        }
    }
}

/// `nvmlEventSetWait_v2`: blocks up to `timeout_ms` for an event.
///
/// # Safety
/// `data` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    set: NvmlEventSet,
    data: *mut EventData,
    timeout_ms: c_uint,
) -> NvmlReturn {
    if data.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    let deadline = Instant::now() + Duration::from_millis(u64::from(timeout_ms));
    loop {
        {
            let mut st = state();
            if st.init_count == 0 {
                return NVML_ERROR_UNINITIALIZED;
            }
            let events_file = st.events_file.clone();
            let Some(s) = st.sets.get_mut(&(set as usize)) else {
                return NVML_ERROR_INVALID_ARGUMENT;
            };
            if s.pending.is_empty() {
                poll_events(&events_file, s);
            }
            if let Some((gpu, event_type, event_data)) = s.pending.pop_front() {
                let ev = EventData {
                    device: handle(gpu),
                    event_type,
                    event_data,
                    gpu_instance_id: 0xFFFF_FFFF,
                    compute_instance_id: 0xFFFF_FFFF,
                };
                // SAFETY: non-null, writable per the caller's contract.
                return unsafe { put(data, ev) };
            }
        }
        // The lock is released while sleeping so other calls proceed.
        let now = Instant::now();
        if now >= deadline {
            return NVML_ERROR_TIMEOUT;
        }
        std::thread::sleep(EVENT_POLL.min(deadline - now));
    }
}
