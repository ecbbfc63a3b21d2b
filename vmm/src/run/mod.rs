//! One run of a VM, from plan to report: build the VM, load the guest, start the vCPU
//! threads, wait in the event loop, stop everything and collect the statistics.

pub mod events;
pub mod probe;
pub mod report;

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::boot::{linux, program};
use crate::config::{BootSource, RunPlan};
use crate::devices::paravirt::VcpuPorts;
use crate::devices::serial::{Serial, COM1_IRQ};
use crate::devices::{Devices, SerialError};
use crate::kvm::stats::StatsFd;
use crate::vm::control::{Outcome, RunControl};
use crate::vm::handoff::Handoff;
use crate::vm::{vcpu, Vm, VmError};
use kvm_ioctls::VcpuFd;
use report::{ReportInputs, RunReport};

/// Errors that stop a run before the guest could decide its outcome.
#[derive(Debug, Error)]
pub enum RunError {
    /// The VM could not be built.
    #[error("cannot create the VM")]
    Vm(#[from] VmError),
    /// The console could not be set up.
    #[error("cannot set up the serial console")]
    Serial(#[from] SerialError),
    /// The serial interrupt could not be wired.
    #[error("cannot wire the serial interrupt")]
    Irqfd(#[source] kvm_ioctls::Error),
    /// The guest program could not be loaded.
    #[error("cannot load the guest program")]
    Program(#[from] program::ProgramError),
    /// The kernel could not be loaded.
    #[error("cannot load the kernel")]
    Linux(#[from] linux::LinuxError),
    /// The initial private state could not be applied.
    #[error("cannot make private=on memory private")]
    Private(#[from] guest_mem::attrs::AttrError),
    /// KVM's MSR list or capabilities could not be read.
    #[error("cannot read what KVM saves per vCPU")]
    Caps(#[source] crate::state::StateError),
    /// The API socket could not be set up.
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    /// Threads, signals or the event loop failed.
    #[error("VMM runtime error")]
    Runtime(#[from] io::Error),
}

/// Where `private=on` memory starts: below it is the VMM's system area (guest
/// programs) or boot data (Linux), which stays shared.
pub const PRIVATE_FROM: u64 = program::layout::IMAGE_START;

/// How much guest RAM a handed-over process unmaps at a time before it exits, yielding
/// the CPU after each step: 2 MiB, ~40 µs of page-table work for 4 KiB pages (once the
/// old VM has let go of the memory: before, KVM's reverse-map walk made each step take
/// hundreds of µs, and even 256 KiB steps delayed the new process by up to ~100 µs);
/// one page of 1 GiB pages (128 MiB steps made a 16 GiB guest's gaps longer: the new
/// process's faults wait for the hugetlb mapping lock the unmap holds).
const RELEASE_STEP: usize = 2 << 20;

/// Gives the CPU to another runnable thread, if any: how the threads that poll while a
/// live update has the guest paused wait without sleeping.
pub fn yield_cpu() {
    // SAFETY: sched_yield has no preconditions.
    unsafe { libc::sched_yield() };
}

/// Clears what polling with [`yield_cpu`] cost the calling thread in the scheduler.
/// Each sched_yield pushes the thread's EEVDF deadline one time slice later, so a
/// vCPU thread that polled through a live update's pause then lost its CPU to every
/// task that woke up (the old process finishing, an API client, a shell) for up to
/// milliseconds of the guest's first run after the update: traced with `perf sched`,
/// a resumed vCPU waited 1.6 ms, runnable, behind them. A real sleep has the thread
/// placed afresh when it wakes. Costs ~5 µs. (Sleeping instead of yielding in the
/// polls themselves was much worse: each short sleep's wake-up preempted whatever ran,
/// the receiving thread included.)
pub fn clear_yield_debt() {
    // SAFETY: prctl(PR_SET_TIMERSLACK) sets the calling thread's timer slack (1 ns,
    // so the sleep below is as short as asked); no memory is passed.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    let t = libc::timespec { tv_sec: 0, tv_nsec: 1_000 };
    // SAFETY: nanosleep reads the timespec we pass; no remainder is asked for.
    unsafe { libc::nanosleep(&t, std::ptr::null_mut()) };
}

/// One wait of a thread that polls during a live update's pause and then does the
/// pause's work or runs the guest (the old process's update thread waiting for the
/// captures, the new vCPU threads waiting for their entries and for the commit):
/// mostly [`yield_cpu`], but every [`POLL_DEBT_EVERY`]th time a short sleep
/// ([`clear_yield_debt`]), so the yields' debt never grows large enough for the
/// poller to lose its CPU to other tasks when what it waits for has come.
pub fn poll_wait(polls: &mut u32) {
    *polls = polls.wrapping_add(1);
    if polls.is_multiple_of(POLL_DEBT_EVERY) {
        clear_yield_debt();
    } else {
        yield_cpu();
    }
}

/// See [`poll_wait`].
const POLL_DEBT_EVERY: u32 = 16;

/// `CLOCK_MONOTONIC` now, in ns.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes only into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// A VM ready to run: built and loaded for a fresh boot, or adopted and restored by a
/// live update.
pub struct Machine {
    /// The VM (shared with the API's live-update path, which captures its state).
    pub vm: Arc<Vm>,
    /// Its devices.
    pub devices: Arc<Devices>,
    /// vCPUs with their port registers, by index; `None` for a vCPU that stays parked.
    pub vcpus: Vec<Option<(VcpuFd, VcpuPorts)>>,
    /// Guest program name or kernel path.
    pub guest: String,
    /// A guest program (as opposed to Linux).
    pub is_program: bool,
    /// What vCPU state captures ask KVM, asked once.
    pub caps: Arc<crate::state::vcpu::CaptureCaps>,
    /// When the guest's first process started (uptime and boot-marker times count from it).
    pub start: Instant,
    /// The same, as CLOCK_MONOTONIC ns.
    pub start_ns: u64,
}

/// How a machine is run, beyond the machine itself.
pub struct DriveOptions {
    /// Stop a run that takes longer.
    pub deadline: Option<Duration>,
    /// The API socket, if any.
    pub api: Option<crate::api::ApiSocket>,
    /// Per-zone settings, as the API shows them.
    pub zones: serde_json::Value,
    /// What a live update hands the next process besides the state.
    pub handover: crate::live::HandoverInfo,
    /// Holds the vCPU threads (started and waiting) until it opens: a live update's
    /// new process starts everything, then waits for the old process's commit.
    pub gate: Option<Box<dyn StartGate>>,
}

/// What the vCPUs wait for before they first run.
pub trait StartGate {
    /// Blocks until the vCPUs may run; `Err` ends the run before any guest code runs
    /// (why, for the run's outcome). The vCPU threads are started and held; each
    /// restores its vCPU from what the gate posts to `handoff` first.
    fn wait_open(&mut self, ctl: &RunControl, handoff: &Handoff) -> Result<(), String>;
    /// The first vCPU is about to enter KVM_RUN, at `ns` (CLOCK_MONOTONIC).
    fn running(&mut self, ns: u64);
    /// The process the guest came from, if known (it exits soon after).
    fn predecessor(&self) -> Option<libc::pid_t> {
        None
    }
}

/// Builds the VM of `plan` and loads its guest.
pub fn build(plan: &RunPlan, start: Instant, start_ns: u64) -> Result<Machine, RunError> {
    let n = plan.vcpus;
    let vm = Vm::with_engine(plan.layout.clone(), plan.engine)?;
    let mem = vm.memory().clone();
    if matches!(plan.boot, BootSource::Linux(_)) {
        vm.create_pit()?;
    }
    let serial = Serial::new(&plan.serial)?;
    vm.fd().register_irqfd(serial.irq_evt(), COM1_IRQ).map_err(RunError::Irqfd)?;
    let is_program = matches!(plan.boot, BootSource::Program { .. });
    let devices = Arc::new(Devices::new(serial, start, is_program));
    let vcpus = (0..n).map(|i| vm.create_vcpu(i, n)).collect::<Result<Vec<_>, _>>()?;
    // With the kernel engine private pages start zeroed (they live in a guest_memfd):
    // private=on then covers only the free RAM of guest programs, not what was loaded.
    let mut private_from: Vec<(u64, u64)> =
        mem.regions().iter().map(|r| (r.gpa.max(PRIVATE_FROM), r.gpa + r.size)).collect();
    let guest = match &plan.boot {
        BootSource::Program { name, image, kernel_mode } => {
            let tsc_khz = vcpus[0].get_tsc_khz().unwrap_or(0);
            let mut boot = program::prepare(&mem, image, n, tsc_khz, vm.offers_1g_pages(), plan.guest_arg)?;
            boot.kernel_mode = *kernel_mode;
            for (i, v) in vcpus.iter().enumerate() {
                program::configure_vcpu(v, i as u32, &boot)?;
            }
            if plan.engine == guest_mem::EngineKind::Kernel {
                private_from = boot.free.iter().map(|&(g, l)| (g, g + l)).collect();
            }
            name.clone()
        }
        BootSource::Linux(cfg) => {
            let boot = linux::load(&mem, cfg, n)?;
            for (i, v) in vcpus.iter().enumerate() {
                linux::configure_vcpu(v, i as u32, &boot, &mem)?;
            }
            cfg.kernel.display().to_string()
        }
    };
    let caps = Arc::new(crate::state::vcpu::CaptureCaps::new(vm.kvm()).map_err(RunError::Caps)?);
    // private=on zones: everything the guest owns (from 2 MiB on; the system area below
    // stays shared) becomes private now that the VMM has loaded what it loads.
    for r in mem.regions() {
        if !plan.layout.zones()[r.zone].backend.private {
            continue;
        }
        for &(s, e) in &private_from {
            let (start, end) = (s.max(r.gpa), e.min(r.gpa + r.size));
            if start < end {
                mem.make_private(start, end - start)?;
            }
        }
    }
    Ok(Machine {
        vm: Arc::new(vm),
        devices,
        vcpus: vcpus.into_iter().map(|v| Some((v, VcpuPorts::default()))).collect(),
        guest,
        is_program,
        caps,
        start,
        start_ns,
    })
}

/// Runs `plan` to the end. `start` is when the VMM started; `deadline` (from now)
/// stops a run that takes longer.
pub fn execute(
    plan: &RunPlan,
    start: Instant,
    start_ns: u64,
    deadline: Option<Duration>,
) -> Result<RunReport, RunError> {
    let machine = build(plan, start, start_ns)?;
    let opts = DriveOptions {
        deadline,
        api: plan.api_socket.clone().map(crate::api::ApiSocket::Bind),
        zones: serde_json::to_value(plan.layout.zones()).unwrap_or_default(),
        handover: crate::live::HandoverInfo {
            stats_json: plan.stats_json.clone(),
            pool_grants: plan.pool_grants.clone(),
            zones_json: String::new(),
        },
        gate: None,
    };
    drive(machine, opts)
}

/// Runs a machine to the end: starts its vCPU threads, serves the API socket, waits
/// for the outcome, stops everything and reports.
pub fn drive(machine: Machine, mut opts: DriveOptions) -> Result<RunReport, RunError> {
    let Machine { vm, devices, vcpus, guest, is_program, caps, start, start_ns } = machine;
    let n = vcpus.len() as u32;
    let mem = vm.memory().clone();
    let vm_stats = StatsFd::open(vm.fd()).ok().map(Arc::new);
    let before_conversions = Arc::new(std::sync::OnceLock::new());
    if let Some(stats) = vm_stats.clone() {
        let slot = before_conversions.clone();
        mem.observe_first_conversion(Box::new(move || {
            if let Ok(s) = stats.read() {
                let _ = slot.set(report::KvmCoverage::new(&s));
            }
        }));
    }
    vcpu::install_kick_handler()?;
    let ctl = Arc::new(RunControl::new(n, start)?);
    opts.handover.zones_json = opts.zones.to_string();
    let live = crate::live::Source {
        vm: vm.clone(),
        devices: devices.clone(),
        ctl: ctl.clone(),
        guest: guest.clone(),
        is_program,
        start_ns,
        info: opts.handover,
    };
    let api_ctx = crate::api::ApiContext {
        ctl: ctl.clone(),
        mem: mem.clone(),
        vm_stats: vm_stats.clone(),
        guest: guest.clone(),
        vcpu_threads: Vec::new(),
        zones: opts.zones,
        live: Arc::new(live),
        live_state: Default::default(),
    };
    // An incoming live update's API socket is served only once committed to: until
    // then it is the old process's (a server dropped here would remove its file).
    let (mut api, mut api_after_gate) = match opts.api {
        Some(sock) if opts.gate.is_some() => (None, Some((sock, api_ctx))),
        Some(sock) => (Some(crate::api::ApiServer::new(sock, api_ctx)?), None),
        None => (None, None),
    };
    let handoff = opts.gate.as_ref().map(|_| Arc::new(Handoff::new(n)));
    if opts.gate.is_some() {
        ctl.hold();
    }
    let shared = vcpu::VcpuShared {
        devices: devices.clone(),
        mem: mem.clone(),
        ctl: ctl.clone(),
        caps,
        handoff: handoff.clone(),
    };
    let mut handles = Vec::with_capacity(vcpus.len());
    for (i, v) in vcpus.into_iter().enumerate() {
        let Some((v, ports)) = v else {
            ctl.park();
            continue;
        };
        match vcpu::spawn(i as u32, v, ports, shared.clone()) {
            Ok(h) => handles.push(h),
            Err(e) => {
                ctl.finish(Outcome::Error { vcpu: i as u32, message: format!("cannot start thread: {e}") });
                break;
            }
        }
    }
    if let (Some(mut gate), Some(handoff)) = (opts.gate.take(), handoff) {
        match gate.wait_open(&ctl, &handoff) {
            Ok(()) => {
                ctl.resume();
                gate.running(ctl.wait_first_run(Duration::from_secs(1)));
                crate::vm::handoff::unpin_when_gone(gate.predecessor(), ctl.vcpu_tids());
                if let Some((sock, ctx)) = api_after_gate.take() {
                    match crate::api::ApiServer::new(sock, ctx) {
                        Ok(a) => api = Some(a),
                        Err(e) => eprintln!("mosaic: cannot serve the API socket handed over: {e}"),
                    }
                }
            }
            Err(why) => {
                handoff.abort();
                ctl.finish(Outcome::NotStarted(why));
            }
        }
    }
    if let Some(api) = api.as_mut() {
        use std::os::unix::thread::JoinHandleExt;
        api.set_vcpu_threads(handles.iter().map(|h| h.as_pthread_t()).collect());
    }
    if let Err(e) = events::wait_for_stop(&ctl, opts.deadline, api) {
        ctl.finish(Outcome::Error { vcpu: 0, message: format!("event loop failed: {e}") });
    }
    let reports = vcpu::stop_all(handles);
    devices.flush();
    // Once the guest runs in another process, this one only ends: what it would
    // measure (smaps of all guest memory, KVM stats) is not reported and costs CPU
    // time the guest's first milliseconds over there should have.
    let handed_over = ctl.handed_over();
    if handed_over {
        // The vCPU threads are gone: the old VM lets go of the memory first, so that
        // the release below does not go through KVM for every step.
        if let Err(e) = vm.forget_memory() {
            eprintln!("mosaic: cannot take the memory out of the handed-over VM: {}", crate::error_chain(&e));
        }
        // Already at low priority (live::source::step_aside): a little at a time, so
        // that the guest's vCPUs in the new process are never kept waiting for long.
        mem.release_pages(RELEASE_STEP, &mut yield_cpu);
    }
    // The VMM's own footprint is read first, before building the report allocates.
    let (rss, pss) = if handed_over { (None, None) } else { (report::vm_rss(), report::vm_pss()) };
    let kvm_vm = vm_stats.filter(|_| !handed_over).and_then(|s| s.read().ok()).unwrap_or_default();
    Ok(RunReport::new(ReportInputs {
        outcome: ctl.outcome(),
        boot_marker: devices.guest_ports().boot_marker(),
        guest,
        vcpus: n,
        start_monotonic_ns: start_ns,
        memory: if handed_over { Vec::new() } else { report::regions(&mem) },
        kvm_vm,
        kvm_vcpus: reports.into_iter().map(|r| r.stats).collect(),
        rss,
        pss,
        unknown_port_accesses: devices.unknown_accesses(),
        private: report::PrivateReport::new(&mem),
        generation: devices.guest_ports().generation(),
        coverage_before_conversions: before_conversions.get().cloned(),
    }))
}
