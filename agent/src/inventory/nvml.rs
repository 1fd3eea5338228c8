//! The real GPU source: NVML, loaded at run time through nvml-wrapper.
//!
//! **Invariant:** this is the only module that touches NVML. Everything else
//! sees [`GpuDiscovery`] and the plain types in [`super`].
//!
//! Two parts:
//! * [`NvmlGpus::discover`] reads every GPU fact on demand. A fact the library
//!   cannot give — a function the loaded `libnvidia-ml.so.1` lacks, or one the
//!   GPU does not support — becomes `None` with one log line per field kind,
//!   never an error.
//! * A watcher on its own OS thread (`gpu-events`) blocks in
//!   `nvmlEventSetWait_v2` for XID and double-bit ECC events and appends them
//!   to a shared, pruned per-GPU log. `discover` judges health from that log
//!   with the pure [`health::evaluate`]. It is an OS thread, not a tokio
//!   task, because the NVML wait blocks; it wakes at least every
//!   [`InventoryConfig::event_wait`] to notice it should stop.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{
    EccCounter, MemoryError, RetirementCause, TemperatureSensor,
};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::{NvmlError, nvml_try};
use nvml_wrapper::{Device, EventSet, Nvml};

use super::health::{self, GpuEvent, GpuEventKind, HealthPolicy, UNKNOWN_XID};
use super::{
    DriverInfo, EccMode, GpuDiscovery, GpuInfo, GpuMemory, GpuReport, GpuUtilization,
    InventoryConfig, MigMode, NoGpus, RemappedRows, RetiredPages,
};

/// Events kept per GPU after pruning; bounds memory under an XID storm.
const MAX_EVENTS_PER_GPU: usize = 64;

/// Why NVML could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum NvmlOpenError {
    /// The shared library could not be loaded: the usual state of a CPU node.
    #[error("failed to load the nvml library {path}")]
    LoadLibrary {
        /// What was passed to `dlopen`.
        path: String,
        /// nvml-wrapper's error (wrapping libloading's).
        #[source]
        source: NvmlError,
    },
    /// The library loaded but `nvmlInit_v2` failed (driver not loaded, no
    /// permission, ...).
    #[error("failed to initialise nvml from {path}")]
    Init {
        /// What was passed to `dlopen`.
        path: String,
        /// What `nvmlInit_v2` returned.
        #[source]
        source: NvmlError,
    },
}

/// Why the GPU event watcher could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatcherError {
    /// The OS refused a thread.
    #[error("failed to spawn the gpu event watcher thread")]
    SpawnThread(#[source] std::io::Error),
    /// `nvmlDeviceGetCount_v2` failed.
    #[error("failed to count gpus for event registration")]
    CountDevices(#[source] NvmlError),
    /// `nvmlEventSetCreate` failed.
    #[error("failed to create an nvml event set")]
    CreateEventSet(#[source] NvmlError),
    /// The thread ended before saying it was ready (it panicked).
    #[error("the gpu event watcher thread exited before it was ready")]
    ThreadExited,
}

/// Opens NVML as configured, or — when it cannot — returns [`NoGpus`] after
/// one log line: `info` when the library is simply not there (a CPU node),
/// `warn` when it is there but does not work.
pub fn open_or_none(config: &InventoryConfig) -> Box<dyn GpuDiscovery> {
    match NvmlGpus::open(config) {
        Ok(gpus) => Box::new(gpus),
        Err(NvmlOpenError::LoadLibrary { path, source }) => {
            tracing::info!(path, error = %source, "no nvml library, this node has no gpus");
            Box::new(NoGpus)
        }
        Err(error @ NvmlOpenError::Init { .. }) => {
            tracing::warn!(
                error = %error,
                cause = %std::error::Error::source(&error).map(ToString::to_string).unwrap_or_default(),
                "nvml present but unusable, reporting no gpus"
            );
            Box::new(NoGpus)
        }
    }
}

/// Per-GPU event log shared between the watcher thread and `discover`.
type EventLog = Arc<Mutex<HashMap<u32, Vec<GpuEvent>>>>;

/// GPUs through NVML.
pub struct NvmlGpus {
    // Declared first so it drops first: the watcher thread must stop (and
    // release its `Arc<Nvml>`) before `nvmlShutdown` can run.
    watcher: Option<Watcher>,
    nvml: Arc<Nvml>,
    policy: HealthPolicy,
    events: EventLog,
    /// (field, error class) pairs already logged, so each is logged once.
    logged: Mutex<HashSet<(&'static str, ErrorClass)>>,
}

impl NvmlGpus {
    /// Loads and initialises NVML from `config.nvml_lib` and, if
    /// `config.watch_events`, starts the event watcher. A watcher that cannot
    /// start is logged and left out: the inventory still works, and health
    /// then only reflects what was seen (nothing).
    pub fn open(config: &InventoryConfig) -> Result<Self, NvmlOpenError> {
        let path = config.nvml_lib.display().to_string();
        let nvml = Nvml::builder()
            .lib_path(OsStr::new(config.nvml_lib.as_os_str()))
            .init()
            .map_err(|source| match source {
                NvmlError::LibloadingError(_) => NvmlOpenError::LoadLibrary {
                    path: path.clone(),
                    source,
                },
                source => NvmlOpenError::Init {
                    path: path.clone(),
                    source,
                },
            })?;
        let nvml = Arc::new(nvml);
        tracing::debug!(path, "nvml loaded");
        let events = EventLog::default();
        let watcher = if config.watch_events {
            match Watcher::start(
                Arc::clone(&nvml),
                Arc::clone(&events),
                config.health.clone(),
                config.event_wait,
            ) {
                Ok(w) => Some(w),
                Err(error) => {
                    tracing::warn!(error = %error, "gpu event watcher not started, gpu health will not change");
                    None
                }
            }
        } else {
            None
        };
        Ok(Self {
            watcher,
            nvml,
            policy: config.health.clone(),
            events,
            logged: Mutex::default(),
        })
    }

    /// Whether the XID/ECC watcher is running.
    pub fn is_watching(&self) -> bool {
        self.watcher.is_some()
    }

    /// Turns a failed read into `None`, logging it once per field and kind.
    fn field<T>(
        &self,
        field: &'static str,
        gpu: Option<u32>,
        r: Result<T, NvmlError>,
    ) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(error) => {
                let class = ErrorClass::of(&error);
                let first = self
                    .logged
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert((field, class));
                if first {
                    match class {
                        ErrorClass::MissingFunction => tracing::warn!(
                            field, gpu, error = %error,
                            "nvml library lacks this function, field left out"
                        ),
                        ErrorClass::NotSupported => {
                            tracing::debug!(field, gpu, "not supported by this gpu, field left out")
                        }
                        ErrorClass::Other => tracing::warn!(
                            field, gpu, error = %error,
                            "failed to read gpu field, field left out"
                        ),
                    }
                }
                None
            }
        }
    }

    fn read_gpu(&self, index: u32, device: &Device<'_>, now: SystemTime) -> GpuInfo {
        let i = Some(index);
        let health = {
            let log = self.events.lock().unwrap_or_else(PoisonError::into_inner);
            health::evaluate(
                &self.policy,
                log.get(&index).map_or(&[], Vec::as_slice),
                now,
            )
        };
        let retired_pages = self
            .field(
                "retired_pages",
                i,
                device
                    .retired_pages(RetirementCause::MultipleSingleBitEccErrors)
                    .and_then(|sbe| {
                        let dbe = device.retired_pages(RetirementCause::DoubleBitEccError)?;
                        Ok((sbe.len(), dbe.len()))
                    }),
            )
            .map(|(sbe, dbe)| RetiredPages {
                single_bit_ecc: u32::try_from(sbe).unwrap_or(u32::MAX),
                double_bit_ecc: u32::try_from(dbe).unwrap_or(u32::MAX),
                pending: self.field(
                    "retired_pages_pending",
                    i,
                    device.are_pages_pending_retired(),
                ),
            });
        GpuInfo {
            index,
            name: self.field("name", i, device.name()),
            uuid: self.field("uuid", i, device.uuid()),
            serial: self.field("serial", i, device.serial()),
            pci_bus_id: self.field("pci_bus_id", i, device.pci_info().map(|p| p.bus_id)),
            memory: self
                .field("memory", i, device.memory_info())
                .map(|m| GpuMemory {
                    total_bytes: m.total,
                    used_bytes: m.used,
                    free_bytes: m.free,
                }),
            utilization: self
                .field("utilization", i, device.utilization_rates())
                .map(|u| GpuUtilization {
                    gpu_percent: u.gpu,
                    memory_percent: u.memory,
                }),
            temperature_c: self.field("temperature", i, device.temperature(TemperatureSensor::Gpu)),
            power_mw: self.field("power", i, device.power_usage()),
            compute_capability: self
                .field("compute_capability", i, device.cuda_compute_capability())
                .map(|c| format!("{}.{}", c.major, c.minor)),
            ecc: self
                .field("ecc_mode", i, device.is_ecc_enabled())
                .map(|e| EccMode {
                    enabled: e.currently_enabled,
                    pending_enabled: e.pending_enabled,
                }),
            ecc_uncorrected_volatile: self.field(
                "ecc_uncorrected_volatile",
                i,
                device.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile),
            ),
            ecc_uncorrected_aggregate: self.field(
                "ecc_uncorrected_aggregate",
                i,
                device.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Aggregate),
            ),
            retired_pages,
            remapped_rows: self.field("remapped_rows", i, remapped_rows(&self.nvml, device)),
            mig: self
                .field("mig_mode", i, device.mig_mode())
                .map(|m| MigMode {
                    // NVML_DEVICE_MIG_ENABLE
                    enabled: m.current == 1,
                    pending_enabled: m.pending == 1,
                }),
            health,
        }
    }
}

impl GpuDiscovery for NvmlGpus {
    fn discover(&self) -> GpuReport {
        let now = SystemTime::now();
        let driver = DriverInfo {
            driver_version: self.field("driver_version", None, self.nvml.sys_driver_version()),
            cuda_version: self
                .field("cuda_version", None, self.nvml.sys_cuda_driver_version())
                .map(cuda_version),
            nvml_version: self.field("nvml_version", None, self.nvml.sys_nvml_version()),
        };
        let count = self
            .field("device_count", None, self.nvml.device_count())
            .unwrap_or(0);
        let mut gpus = Vec::new();
        for index in 0..count {
            if let Some(device) = self.field(
                "device_handle",
                Some(index),
                self.nvml.device_by_index(index),
            ) {
                gpus.push(self.read_gpu(index, &device, now));
            }
        }
        GpuReport {
            driver: Some(driver),
            gpus,
        }
    }
}

/// `12040` → `"12.4"`, the way `nvidia-smi` prints the CUDA version
/// (NVML's `NVML_CUDA_DRIVER_VERSION_MAJOR/MINOR` macros).
fn cuda_version(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// `nvmlDeviceGetRemappedRows`, which nvml-wrapper 0.13 has no safe method
/// for: called through the symbol the wrapper already resolved.
fn remapped_rows(nvml: &Nvml, device: &Device<'_>) -> Result<RemappedRows, NvmlError> {
    let sym = nvml
        .lib()
        .nvmlDeviceGetRemappedRows
        .as_ref()
        .map_err(|e| NvmlError::FailedToLoadSymbol(e.to_string()))?;
    let (mut corr, mut unc, mut pending, mut failed) = (0u32, 0u32, 0u32, 0u32);
    // SAFETY: `device.handle()` is a handle NVML gave for this still
    // initialised library, and the four out-pointers are valid, writable
    // `unsigned int`s, as the C signature requires.
    let rc = unsafe {
        sym(
            device.handle(),
            &mut corr,
            &mut unc,
            &mut pending,
            &mut failed,
        )
    };
    nvml_try(rc)?;
    Ok(RemappedRows {
        correctable: corr,
        uncorrectable: unc,
        pending: pending != 0,
        failed: failed != 0,
    })
}

/// How a failed read is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ErrorClass {
    /// The library lacks the function (older driver, or a partial library).
    MissingFunction,
    /// The GPU does not support the query; normal across GPU generations.
    NotSupported,
    /// Anything else (GPU lost, permission, ...).
    Other,
}

impl ErrorClass {
    fn of(e: &NvmlError) -> Self {
        match e {
            NvmlError::FailedToLoadSymbol(_) | NvmlError::FunctionNotFound => Self::MissingFunction,
            NvmlError::NotSupported => Self::NotSupported,
            _ => Self::Other,
        }
    }
}

/// The `gpu-events` thread and how to stop it.
struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Starts the thread and waits until it has registered for events, so an
    /// event raised after `start` returns is never missed.
    fn start(
        nvml: Arc<Nvml>,
        log: EventLog,
        policy: HealthPolicy,
        wait: Duration,
    ) -> Result<Self, WatcherError> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("gpu-events".into())
            .spawn({
                let stop = Arc::clone(&stop);
                move || watch(&nvml, &log, &policy, wait, &stop, ready_tx)
            })
            .map_err(WatcherError::SpawnThread)?;
        let ready = ready_rx.recv();
        let mut watcher = Self {
            stop,
            thread: Some(thread),
        };
        match ready {
            Ok(Ok(())) => Ok(watcher),
            Ok(Err(e)) => {
                watcher.shut_down();
                Err(e)
            }
            Err(_) => {
                watcher.shut_down();
                Err(WatcherError::ThreadExited)
            }
        }
    }

    fn shut_down(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("gpu event watcher thread panicked");
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// The watcher thread's body.
fn watch(
    nvml: &Nvml,
    log: &EventLog,
    policy: &HealthPolicy,
    wait: Duration,
    stop: &AtomicBool,
    ready: SyncSender<Result<(), WatcherError>>,
) {
    let set = match register(nvml) {
        Ok(set) => {
            // The receiver only disappears if `start` is gone; nothing to do then.
            let _ = ready.send(Ok(()));
            set
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let Some(set) = set else {
        return;
    };
    let timeout_ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX);
    let mut failing = false;
    while !stop.load(Ordering::Acquire) {
        match set.wait(timeout_ms) {
            Ok(data) => {
                failing = false;
                let kind = if let Some(xid) = data.event_data {
                    GpuEventKind::Xid {
                        xid: match xid {
                            XidError::Value(v) => v,
                            XidError::Unknown => UNKNOWN_XID,
                        },
                    }
                } else if data.event_type.contains(EventTypes::DOUBLE_BIT_ECC_ERROR) {
                    GpuEventKind::DoubleBitEcc
                } else {
                    continue;
                };
                let index = match data.device.index() {
                    Ok(i) => i,
                    Err(error) => {
                        tracing::warn!(error = %error, ?kind, "gpu event from an unknown gpu, dropped");
                        continue;
                    }
                };
                let event = GpuEvent {
                    kind,
                    at: SystemTime::now(),
                };
                if event.is_critical(policy) {
                    tracing::warn!(gpu = index, reason = %event.reason(), "gpu reported a critical error");
                } else {
                    tracing::info!(gpu = index, reason = %event.reason(), "gpu reported an application error");
                }
                let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
                let events = log.entry(index).or_default();
                events.push(event);
                health::prune(policy, events, MAX_EVENTS_PER_GPU);
            }
            Err(NvmlError::Timeout) => failing = false,
            Err(
                error @ (NvmlError::FailedToLoadSymbol(_)
                | NvmlError::FunctionNotFound
                | NvmlError::NotSupported),
            ) => {
                tracing::warn!(error = %error, "cannot wait for gpu events, gpu health will not change");
                return;
            }
            Err(error) => {
                // Transient or not, never spin: back off one wait period.
                if !failing {
                    tracing::warn!(error = %error, "waiting for gpu events failed, retrying");
                }
                failing = true;
                std::thread::sleep(wait);
            }
        }
    }
}

/// Registers every GPU that supports them for XID and double-bit ECC events.
/// `Ok(None)` when no GPU does (nothing to watch).
fn register(nvml: &Nvml) -> Result<Option<EventSet<'_>>, WatcherError> {
    let wanted = EventTypes::CRITICAL_XID_ERROR | EventTypes::DOUBLE_BIT_ECC_ERROR;
    let count = nvml.device_count().map_err(WatcherError::CountDevices)?;
    let mut plan: Vec<(u32, EventTypes)> = Vec::new();
    for index in 0..count {
        let types = nvml
            .device_by_index(index)
            .and_then(|d| d.supported_event_types());
        match types {
            Ok(t) if !(t & wanted).is_empty() => plan.push((index, t & wanted)),
            Ok(_) => tracing::info!(
                gpu = index,
                "gpu reports no xid or ecc events, its health is not watched"
            ),
            Err(error) => {
                tracing::warn!(gpu = index, error = %error, "failed to read supported gpu events, its health is not watched")
            }
        }
    }
    // nvmlDeviceRegisterEvents frees the whole set when it fails, so a GPU that
    // refuses is dropped from the plan and the set is built again.
    loop {
        if plan.is_empty() {
            return Ok(None);
        }
        let mut set = Some(
            nvml.create_event_set()
                .map_err(WatcherError::CreateEventSet)?,
        );
        let mut refused = None;
        for (pos, &(index, types)) in plan.iter().enumerate() {
            let registered = nvml
                .device_by_index(index)
                .map_err(Into::into)
                .and_then(|device| match set.take() {
                    Some(s) => device.register_events(types, s),
                    None => Err(NvmlError::SetReleaseFailed.into()),
                });
            match registered {
                Ok(s) => set = Some(s),
                Err(error) => {
                    tracing::warn!(gpu = index, error = %error, "failed to register gpu events, its health is not watched");
                    refused = Some(pos);
                    break;
                }
            }
        }
        match (refused, set) {
            (None, Some(set)) => {
                tracing::debug!(gpus = plan.len(), "watching gpu events");
                return Ok(Some(set));
            }
            (Some(pos), _) => {
                plan.remove(pos);
            }
            (None, None) => return Ok(None),
        }
    }
}
