//! A vCPU thread: `KVM_RUN` in a loop, port and MMIO exits to the devices, and an
//! explicit state for how the loop ends.
//!
//! ```text
//!   Running ──KVM_RUN──► exit ──► devices ──► Running
//!      │                   │
//!      │ stop flag/kick    ├─ exit port / fault / shutdown / error ──► Stopped (run ends)
//!      ▼                   └─ park port ─────────────────────────────► Parked  (thread ends)
//!   Stopped
//! ```

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use guest_mem::GuestMemory;
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::control::{FaultReport, Outcome, RunControl, VcpuCapture};
use super::handoff::{Deboost, Handoff, Placement, Take, POLL_FOR};
use crate::devices::paravirt::VcpuPorts;
use crate::devices::{Devices, IoAction};
use crate::kvm::stats::StatsFd;
use crate::state::format::VcpuEntry;
use crate::state::vcpu::VcpuFixed;

/// How a vCPU thread ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuState {
    /// Still in the run loop.
    Running,
    /// The guest parked this vCPU.
    Parked,
    /// The run was stopped (by this vCPU or another).
    Stopped,
}

/// What a vCPU thread hands back when it ends.
#[derive(Debug)]
pub struct VcpuReport {
    /// vCPU index.
    pub index: u32,
    /// How it ended.
    pub state: VcpuState,
    /// Its KVM binary stats at the end (empty if unavailable).
    pub stats: BTreeMap<String, u64>,
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Kicks these vCPU threads out of KVM_RUN.
pub fn kick_threads(threads: &[libc::pthread_t]) {
    for &t in threads {
        // SAFETY: callers pass the run's vCPU threads, which are joined only after the
        // event loop (and so the API and live update it serves) has stopped; a thread
        // that has already returned (parked) is still a valid, unjoined pthread_t.
        unsafe { libc::pthread_kill(t, kick_signal()) };
    }
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the kick signal's handler (once per process): it does nothing but
/// interrupt `KVM_RUN` with `EINTR`.
pub fn install_kick_handler() -> io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))
}

/// Starts vCPU `index` on a thread named `vcpuN`.
pub fn spawn(index: u32, vcpu: VcpuFd, ports: VcpuPorts, shared: VcpuShared) -> io::Result<JoinHandle<VcpuReport>> {
    thread::Builder::new().name(format!("vcpu{index}")).spawn(move || {
        let mut vcpu = vcpu;
        let state = run_loop(index, &mut vcpu, ports, &shared);
        // Opened at the end, not the start: it costs time a live update's resume (and
        // boot) should not wait for. Not read at all once the guest runs elsewhere.
        let stats = if shared.ctl.handed_over() {
            BTreeMap::new()
        } else {
            StatsFd::open(&vcpu).ok().and_then(|s| s.read().ok()).unwrap_or_default()
        };
        VcpuReport { index, state, stats }
    })
}

/// What every vCPU thread of a VM shares.
#[derive(Clone)]
pub struct VcpuShared {
    /// Devices on the port bus.
    pub devices: Arc<Devices>,
    /// Guest memory.
    pub mem: Arc<GuestMemory>,
    /// Run control.
    pub ctl: Arc<RunControl>,
    /// What state captures ask KVM (MSR list, capabilities), asked once.
    pub caps: Arc<crate::state::vcpu::CaptureCaps>,
    /// A live update's incoming state: each thread restores its own vCPU from it
    /// before its first run.
    pub handoff: Option<Arc<Handoff>>,
}

/// Captures this vCPU for a live update: KVM state, port registers, TSC offset.
///
/// KVM completes an I/O or MMIO exit (writes the `in` result, moves RIP past the
/// instruction) only on the next KVM_RUN, and that pending work is not in any state
/// it lets us read. So the vCPU re-enters once with `immediate_exit` set: KVM finishes
/// the instruction and returns at once, without running guest code.
fn capture(
    vcpu: &mut VcpuFd,
    shared: &VcpuShared,
    fixed: Option<&VcpuFixed>,
    ports: &VcpuPorts,
) -> Result<VcpuEntry, String> {
    enter_and_leave(vcpu).map_err(|e| format!("cannot complete the last exit before the capture: {e}"))?;
    let kvm_state = match fixed {
        Some(f) => crate::state::vcpu::capture_fixed(vcpu, f, &shared.caps),
        None => crate::state::vcpu::capture_with(vcpu, &shared.caps),
    }
    .map_err(|e| crate::error_chain(&e))?;
    crate::live::trace::mark("captured");
    Ok(VcpuEntry { kvm: Some(kvm_state), ports: ports.clone(), tsc_offset: crate::state::vcpu::tsc_offset(vcpu) })
}

/// Enters KVM_RUN once with `immediate_exit` set: KVM does its entry work (completes a
/// pending I/O exit; on a thread's first KVM_RUN, records the thread) and returns
/// EINTR at once, without running guest code. `Ok` for that EINTR.
fn enter_and_leave(vcpu: &mut VcpuFd) -> Result<(), kvm_ioctls::Error> {
    vcpu.set_kvm_immediate_exit(1);
    let r = vcpu.run().map(|_| ()).or_else(|e| if e.errno() == libc::EINTR { Ok(()) } else { Err(e) });
    vcpu.set_kvm_immediate_exit(0);
    r
}

/// [`enter_and_leave`] from this thread before the state arrives (a vCPU not yet
/// restored, an AP not even started, stays as it is): KVM's first-run work for the
/// thread (and, on the VM's first, starting its NX huge page recovery thread) is then
/// out of a live update's pause: the guest's first resumed iteration was seen to come
/// ~100 µs sooner.
fn first_entry_ahead(vcpu: &mut VcpuFd) {
    // Anything but EINTR will show again at the real entry.
    let _ = enter_and_leave(vcpu);
}

/// Captures this fresh vCPU and restores that state into it, before a live update's
/// pause: the state does not change, but each ioctl's first call on a vCPU is slow
/// (KVM_SET_XSAVE took 27 µs the first time, 4 µs after; KVM_SET_MSRS 25 and 12), so
/// the restore in the pause takes ~65 µs instead of ~90. Anything that fails here
/// fails again, and is reported, in the real restore.
fn restore_ahead(vcpu: &VcpuFd, fixed: Option<&VcpuFixed>, caps: &crate::state::vcpu::CaptureCaps) {
    let Some(f) = fixed else { return };
    if let Ok(own) = crate::state::vcpu::capture_fixed(vcpu, f, caps) {
        let _ = crate::state::vcpu::restore_with(vcpu, &own, Some(f));
    }
}

/// Restores this vCPU from a live update's handoff; `Err` is how the thread ends
/// (the update failed, or the guest had parked this vCPU).
fn restore_handed(
    index: u32,
    vcpu: &VcpuFd,
    handoff: &Handoff,
    fixed: Option<&mut VcpuFixed>,
    ctl: &RunControl,
) -> Result<VcpuPorts, VcpuState> {
    let (entry, captured_ns) = match handoff.take(index) {
        Take::Restore(e, ns) => (e, ns),
        Take::Abort => return Err(VcpuState::Stopped),
    };
    crate::live::trace::mark_vcpu("restoring", index);
    let Some(state) = entry.kvm.as_ref() else {
        ctl.park();
        if handoff.report(index, Ok(())) {
            ctl.resume();
        }
        return Err(VcpuState::Parked);
    };
    let (cpuid, tsc_khz) = (state.cpuid.clone(), state.tsc_khz);
    match crate::state::vcpu::restore_entry(vcpu, *entry, captured_ns, fixed.as_deref()) {
        Ok(ports) => {
            if let Some(f) = fixed {
                f.restored(cpuid, tsc_khz);
            }
            crate::live::trace::mark_vcpu("restored", index);
            // The last one restored commits (protocol v2) and opens the gate at once.
            if handoff.report(index, Ok(())) {
                ctl.resume();
            }
            Ok(ports)
        }
        Err(e) => {
            handoff.report(index, Err(crate::error_chain(&e)));
            Err(VcpuState::Stopped)
        }
    }
}

fn run_loop(index: u32, vcpu: &mut VcpuFd, mut ports: VcpuPorts, shared: &VcpuShared) -> VcpuState {
    let (devices, mem, ctl) = (&*shared.devices, &*shared.mem, &*shared.ctl);
    let fail = |message: String| {
        ctl.finish(Outcome::Error { vcpu: index, message });
        VcpuState::Stopped
    };
    ctl.note_thread(index);
    let mut first_run = true;
    // Read before the first run (see VcpuFixed); a failure here leaves captures to read
    // it themselves.
    let mut fixed = VcpuFixed::read(vcpu, &shared.caps).ok();
    let mut placement = None;
    if let Some(handoff) = &shared.handoff {
        placement = Some(Placement::pin(index));
        crate::live::warm::for_pause(1);
        first_entry_ahead(vcpu);
        restore_ahead(vcpu, fixed.as_ref(), &shared.caps);
        match restore_handed(index, vcpu, handoff, fixed.as_mut(), ctl) {
            Ok(p) => ports = p,
            Err(end) => return end,
        }
        // Restored: wait for the commit on this CPU.
        ctl.poll_while_held(POLL_FOR);
        if ctl.pause_requested() {
            // No commit in time: back to the scheduling it had before it waits longer.
            if let Some(p) = placement.as_mut() {
                p.release();
            }
        }
    }
    let mut deboost: Option<Deboost> = None;
    loop {
        if deboost.as_ref().is_some_and(Deboost::due) {
            deboost = None;
            if let Some(p) = placement.as_mut() {
                p.unboost();
                crate::run::clear_yield_debt();
            }
        }
        if ctl.stopping() {
            return VcpuState::Stopped;
        }
        if ctl.pause_requested() {
            if ctl.capture_requested() {
                crate::live::trace::mark_vcpu("left_run", index);
                let left_run_ns = crate::run::monotonic_ns();
                let state = capture(vcpu, shared, fixed.as_ref(), &ports);
                ctl.deposit(index, VcpuCapture { left_run_ns, state });
            }
            ctl.wait_while_paused();
            continue;
        }
        if first_run {
            first_run = false;
            if let Some(p) = placement.as_mut() {
                // Real-time into the guest's first run where it has a CPU to itself
                // (see Deboost); else its scheduling back now. Either way it stays on
                // its CPU until the old process is gone (`handoff::unpin_when_gone`).
                deboost = p.alone().then(|| Deboost::arm(kick_signal())).flatten();
                if deboost.is_none() {
                    p.unboost();
                    // It polled (yielding) for its entry and for the commit.
                    crate::run::clear_yield_debt();
                }
            }
            ctl.note_first_run();
            crate::live::trace::mark_vcpu("first_run", index);
        }
        let action = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) if VcpuPorts::claims(port) => {
                ports.write(port, data, mem);
                IoAction::Continue
            }
            Ok(VcpuExit::IoIn(port, data)) if VcpuPorts::claims(port) => {
                ports.read(port, data);
                IoAction::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => devices.io_out(port, data),
            Ok(VcpuExit::IoIn(port, data)) => {
                devices.io_in(port, data);
                IoAction::Continue
            }
            Ok(VcpuExit::MmioRead(_, data)) => {
                data.fill(0xff);
                IoAction::Continue
            }
            Ok(VcpuExit::MmioWrite(..)) => IoAction::Continue,
            Ok(VcpuExit::MemoryFault { flags, gpa, size }) => {
                match crate::devices::paravirt::memory_fault(flags, gpa, size, mem) {
                    Ok(()) => IoAction::Continue,
                    Err(e) => return fail(format!("memory fault at {gpa:#x} (+{size:#x}) cannot be converted: {e}")),
                }
            }
            Ok(VcpuExit::Hypercall(h)) if h.nr == crate::kvm::caps::KVM_HC_MAP_GPA_RANGE => {
                *h.ret = crate::devices::paravirt::map_gpa_range(&h.args, mem);
                IoAction::Continue
            }
            Ok(VcpuExit::Shutdown) => {
                ctl.finish(Outcome::Shutdown { vcpu: index });
                return VcpuState::Stopped;
            }
            Ok(VcpuExit::Hlt) => return fail("halted with interrupts disabled".into()),
            Ok(VcpuExit::InternalError) => {
                return fail("KVM internal error (emulation failure: kernel-mode code this host cannot run)".into())
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return fail(format!("VM entry failed (reason {reason:#x}, cpu {cpu})"))
            }
            Ok(other) => return fail(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => IoAction::Continue,
            Err(e) => return fail(format!("KVM_RUN failed: {e}")),
        };
        match action {
            IoAction::Continue => {}
            IoAction::Exit(code) => {
                ctl.finish(Outcome::Exit(code));
                return VcpuState::Stopped;
            }
            IoAction::Reset => {
                ctl.finish(Outcome::Reset);
                return VcpuState::Stopped;
            }
            IoAction::Park => {
                ctl.park();
                return VcpuState::Parked;
            }
            IoAction::Exception => {
                return match fault_report(index, vcpu, mem) {
                    Ok(f) => {
                        ctl.finish(Outcome::Fault(f));
                        VcpuState::Stopped
                    }
                    Err(m) => fail(format!("guest fault, and its frame could not be read: {m}")),
                }
            }
        }
    }
}

/// Reads the exception frame the CPL0 stub left on its stack:
/// `[vector, error code, RIP, CS, RFLAGS, RSP, SS]`.
fn fault_report(index: u32, vcpu: &VcpuFd, mem: &GuestMemory) -> Result<FaultReport, String> {
    let regs = vcpu.get_regs().map_err(|e| e.to_string())?;
    let sregs = vcpu.get_sregs().map_err(|e| e.to_string())?;
    let word = |i: u64| {
        let at = regs.rsp.checked_add(8 * i).ok_or_else(|| format!("stack pointer {:#x} overflows", regs.rsp))?;
        mem.read_obj::<u64>(at).map_err(|e| e.to_string())
    };
    Ok(FaultReport { vcpu: index, vector: word(0)?, error_code: word(1)?, rip: word(2)?, cr2: sregs.cr2 })
}

/// Stops every vCPU thread: raises the stop flag (via `ctl`) and re-sends the kick
/// signal until each thread has left `KVM_RUN`, then joins them.
pub fn stop_all(handles: Vec<JoinHandle<VcpuReport>>) -> Vec<VcpuReport> {
    use vmm_sys_util::signal::Killable;
    let mut reports = Vec::with_capacity(handles.len());
    for h in handles {
        while !h.is_finished() {
            let _ = h.kill(kick_signal());
            thread::sleep(std::time::Duration::from_micros(200));
        }
        if let Ok(r) = h.join() {
            reports.push(r);
        }
    }
    reports
}
