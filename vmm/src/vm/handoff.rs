//! A live update's vCPU states, handed from the thread that receives them to the new
//! process's vCPU threads, which restore their own in parallel and then wait, running
//! on their CPUs, for the commit.
//!
//! ```text
//!  receiving thread                     vCPU thread i (started in the prepare phase)
//!  ────────────────                     ─────────────────────────────────────────────
//!                                       take(i): sleeps
//!  arriving(): the state is coming ───► wakes, polls (the wake-up overlaps the read)
//!  set_committer(c); post(entries) ────► restores entry i, report(i, result); the
//!                                        last to report, all restored, runs c (the
//!                                        commit) and, committed, opens the gate
//!  wait_decided() (sleeps) ◄───────────  polls the gate (RunControl::hold) until the
//!                                        commit opens it
//! ```
//!
//! With no committer (protocol v1, where the commit is a message), the receiving
//! thread polls with `wait_restored` and commits itself.
//!
//! Polling yields the CPU each time, and only happens while the guest is paused and
//! the CPUs would otherwise sleep: waking a sleeping CPU costs tens of microseconds on
//! a nested host, each one guest downtime.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::run::yield_cpu;
use crate::state::format::VcpuEntry;

/// How long a vCPU thread polls for its entry once the state is arriving, and for
/// the commit once restored, before it sleeps instead.
pub const POLL_FOR: Duration = Duration::from_millis(20);

/// How often the receiving thread looks for a commit (see [`Handoff::wait_decided`]).
const DECISION_LOOK: Duration = Duration::from_millis(1);

#[derive(Debug, Default)]
struct Slots {
    /// vCPU threads waiting in `take`.
    waiting: u32,
    /// Their thread ids, as they came.
    tids: Vec<libc::pid_t>,
    arriving: bool,
    posted: bool,
    aborted: bool,
    entries: Vec<Option<VcpuEntry>>,
    captured_ns: u64,
    errors: Vec<(u32, String)>,
    /// What the committer decided: the time all were restored (CLOCK_MONOTONIC ns),
    /// or why not.
    decided: Option<Result<u64, String>>,
}

/// Run by the last vCPU thread to be restored (all of them restored): commits the
/// update, or says why not.
pub type Committer = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// What [`Handoff::take`] gives a vCPU thread.
#[derive(Debug)]
pub enum Take {
    /// Restore this entry (captured at this CLOCK_MONOTONIC ns).
    Restore(Box<VcpuEntry>, u64),
    /// No state comes (the update failed, or this vCPU has no entry): end the thread.
    Abort,
}

/// See the module docs.
pub struct Handoff {
    vcpus: u32,
    slots: Mutex<Slots>,
    cv: Condvar,
    reported: AtomicU32,
    committer: Mutex<Option<Committer>>,
}

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handoff")
            .field("vcpus", &self.vcpus)
            .field("slots", &self.slots)
            .field("reported", &self.reported)
            .finish_non_exhaustive()
    }
}

impl Handoff {
    /// A handoff for `vcpus` vCPU threads.
    pub fn new(vcpus: u32) -> Self {
        Handoff {
            vcpus,
            slots: Mutex::default(),
            cv: Condvar::new(),
            reported: AtomicU32::new(0),
            committer: Mutex::new(None),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Slots) -> R) -> Option<R> {
        let mut g = self.slots.lock().ok()?;
        let r = f(&mut g);
        self.cv.notify_all();
        Some(r)
    }

    /// Waits (sleeping, up to `timeout`) until every vCPU thread waits for its entry:
    /// then nothing of this process competes for a CPU with the old process's vCPUs
    /// when they pause, which the old process does as soon as it hears Prepared (a
    /// vCPU thread still starting up there would lengthen the guest's gap).
    pub fn wait_all_waiting(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut g = self.slots.lock().map_err(|_| "handoff lock poisoned".to_string())?;
        while g.waiting < self.vcpus {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("{} of {} vCPU threads started in {timeout:?}", g.waiting, self.vcpus));
            }
            g = self.cv.wait_timeout(g, left).map_err(|_| "handoff lock poisoned".to_string())?.0;
        }
        Ok(())
    }

    /// The state has started to arrive: the vCPU threads wake and poll for it.
    pub fn arriving(&self) {
        crate::live::trace::mark("arriving");
        self.with(|s| s.arriving = true);
    }

    /// Hands `entries` (by vCPU index; one per vCPU) to the vCPU threads.
    pub fn post(&self, entries: Vec<VcpuEntry>, captured_ns: u64) {
        crate::live::trace::mark("posted");
        // With a committer (protocol v2) nothing else of this process needs a CPU
        // until the guest runs: the waiting threads take theirs now (see `boost`).
        let committing = self.committer.lock().map(|c| c.is_some()).unwrap_or(false);
        self.with(|s| {
            s.entries = entries.into_iter().map(Some).collect();
            s.captured_ns = captured_ns;
            s.posted = true;
            s.arriving = true;
            // Under the lock: no thread can see its entry, run and put its own
            // scheduling back before it is boosted (it would then keep the boost).
            if committing {
                s.tids.iter().copied().for_each(boost);
            }
        });
    }

    /// No state will come: every waiting vCPU thread ends.
    pub fn abort(&self) {
        self.with(|s| s.aborted = true);
    }

    /// Called by vCPU thread `index`: waits for its entry (sleeping until the state is
    /// arriving, then polling).
    pub fn take(&self, index: u32) -> Take {
        let Ok(mut g) = self.slots.lock() else { return Take::Abort };
        g.waiting += 1;
        // SAFETY: gettid has no preconditions.
        g.tids.push(unsafe { libc::gettid() });
        self.cv.notify_all();
        while !g.arriving && !g.aborted {
            g = match self.cv.wait(g) {
                Ok(g) => g,
                Err(_) => return Take::Abort,
            };
        }
        let since = Instant::now();
        let mut polls = 0;
        loop {
            if g.aborted {
                return Take::Abort;
            }
            if g.posted {
                let captured_ns = g.captured_ns;
                return match g.entries.get_mut(index as usize).and_then(Option::take) {
                    Some(e) => Take::Restore(Box::new(e), captured_ns),
                    None => Take::Abort,
                };
            }
            if since.elapsed() < POLL_FOR {
                drop(g);
                crate::run::poll_wait(&mut polls);
                g = match self.slots.lock() {
                    Ok(g) => g,
                    Err(_) => return Take::Abort,
                };
            } else {
                g = match self.cv.wait(g) {
                    Ok(g) => g,
                    Err(_) => return Take::Abort,
                };
            }
        }
    }

    /// Has the last vCPU thread to be restored commit (before [`Handoff::post`]).
    pub fn set_committer(&self, c: Committer) {
        if let Ok(mut slot) = self.committer.lock() {
            *slot = Some(c);
        }
    }

    /// vCPU thread `index` is done with its entry: restored, or why not. Returns true
    /// if this call committed the update (the caller then opens the gate).
    pub fn report(&self, index: u32, result: Result<(), String>) -> bool {
        if let Err(e) = result {
            self.with(|s| s.errors.push((index, e)));
        }
        let n = self.reported.fetch_add(1, Ordering::SeqCst) + 1;
        if n != self.vcpus {
            return false;
        }
        let Some(commit) = self.committer.lock().ok().and_then(|mut c| c.take()) else { return false };
        let restored_ns = crate::run::monotonic_ns();
        let decided = match self.first_error() {
            Some(e) => Err(e),
            None => commit().map(|()| restored_ns),
        };
        let committed = decided.is_ok();
        if committed {
            // Not notified: the receiving thread finds it at its next look (see
            // `wait_decided`), by when the vCPU threads are in KVM_RUN.
            if let Ok(mut g) = self.slots.lock() {
                g.decided = Some(decided);
            }
        } else {
            self.with(|s| s.decided = Some(decided));
        }
        committed
    }

    /// The first error (by vCPU) of those reported.
    fn first_error(&self) -> Option<String> {
        let mut errors = self.slots.lock().map(|s| s.errors.clone()).unwrap_or_default();
        errors.sort();
        errors.into_iter().next().map(|(i, e)| format!("vCPU {i}: {e}"))
    }

    /// Waits (sleeping, up to `timeout`) for the committer's decision: when every
    /// vCPU was restored and the update committed, or why not. `None` on a timeout.
    ///
    /// A failure wakes it at once (the guest is still paused); a commit does not: it
    /// looks every [`DECISION_LOOK`]. Woken by the commit, this thread took the CPU of
    /// a vCPU thread about to make its first KVM_RUN, then woke the old process
    /// (which says goodbye to its API client, at nice 19, in ~300 µs) on the same CPU:
    /// the vCPU was traced waiting 1 ms for its CPU with the guest still paused.
    pub fn wait_decided(&self, timeout: Duration) -> Option<Result<u64, String>> {
        let deadline = Instant::now() + timeout;
        let mut g = self.slots.lock().ok()?;
        loop {
            if let Some(d) = g.decided.take() {
                return Some(d);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            g = self.cv.wait_timeout(g, left.min(DECISION_LOOK)).ok()?.0;
        }
    }

    /// Polls until every vCPU thread has reported, up to `timeout`; the first error
    /// (by vCPU) if any failed.
    pub fn wait_restored(&self, timeout: Duration) -> Result<(), String> {
        let since = Instant::now();
        while self.reported.load(Ordering::SeqCst) < self.vcpus {
            if since.elapsed() > timeout {
                return Err(format!(
                    "{} of {} vCPUs were restored in {timeout:?}",
                    self.reported.load(Ordering::SeqCst),
                    self.vcpus
                ));
            }
            yield_cpu();
        }
        match self.first_error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Keeps a vCPU thread on one CPU of those it may use (vCPU i on the i-th, round
/// robin) for a while, then lets it go where the scheduler likes.
///
/// The threads of a live update's new process wait for the commit polling, each on
/// its own CPU, so each enters KVM_RUN the moment the commit comes. Left to itself,
/// the scheduler tends to stack them on one CPU (they were started by one thread and
/// have just run, so they are "cache hot" and not moved), and the second vCPU then
/// waits for the first one's time slice to end: up to milliseconds of downtime.
///
/// The old process's vCPU threads are held apart the same way while it prepares an
/// update ([`Placement::pin_thread`]): the new process's prepare threads made the
/// scheduler move one vCPU onto the other's CPU, where the two then took turns in
/// whole 4 ms ticks, for as long as 80 ms, right up to the pause.
#[derive(Debug)]
pub struct Placement {
    /// The thread (0: the one that pinned itself).
    tid: libc::pid_t,
    allowed: Option<libc::cpu_set_t>,
    /// The scheduling attributes a thread that pinned itself had: [`boost`] may change
    /// them, [`Placement::release`] puts them back.
    sched: Option<libc::sched_attr>,
    /// Pinned to a CPU no other vCPU thread of this process is pinned to.
    alone: bool,
}

impl Placement {
    /// Pins the calling thread, vCPU `index`, to its CPU. Does nothing where only one
    /// CPU is allowed.
    pub fn pin(index: u32) -> Self {
        let mut p = Self::pin_thread(0, index);
        p.sched = sched_attr_of_this_thread();
        p
    }

    /// Pins thread `tid` of this process (0: the calling one), vCPU `index`, to its
    /// CPU. Does nothing where only one CPU is allowed or the thread is gone.
    pub fn pin_thread(tid: libc::pid_t, index: u32) -> Self {
        let none = Placement { tid, allowed: None, sched: None, alone: false };
        // SAFETY: cpu_set_t is plain data; all zeros is the empty set.
        let mut allowed: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: sched_getaffinity writes at most `size` bytes into `allowed`.
        if unsafe { libc::sched_getaffinity(tid, size, &mut allowed) } != 0 {
            return none;
        }
        // SAFETY: CPU_ISSET only reads the set, for indices below CPU_SETSIZE.
        let cpus: Vec<usize> =
            (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &allowed) }).collect();
        if cpus.len() < 2 {
            return none;
        }
        // SAFETY: as above, all zeros is the empty set.
        let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: CPU_SET writes one bit of `one`, for an index below CPU_SETSIZE.
        unsafe { libc::CPU_SET(cpus[index as usize % cpus.len()], &mut one) };
        // SAFETY: sched_setaffinity reads `size` bytes of a valid cpu_set_t.
        if unsafe { libc::sched_setaffinity(tid, size, &one) } != 0 {
            return none;
        }
        Placement { tid, allowed: Some(allowed), sched: None, alone: (index as usize) < cpus.len() }
    }

    /// Whether the thread has a CPU to itself: pinned, and no other vCPU thread is
    /// pinned there.
    pub fn alone(&self) -> bool {
        self.alone
    }

    /// Puts back the scheduling attributes a thread that pinned itself had; it stays
    /// pinned.
    pub fn unboost(&mut self) {
        if let Some(attr) = self.sched.take() {
            // SAFETY: sched_setattr of the calling thread (the placement is only
            // made with `sched` for it), reading a sched_attr of the size it states.
            unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr, 0u32) };
        }
    }

    /// Gives the thread back every CPU it was allowed (it stays where it is) and, for a
    /// thread that pinned itself, the scheduling attributes it had.
    pub fn release(&mut self) {
        if let Some(allowed) = self.allowed.take() {
            // SAFETY: sched_setaffinity reads a valid cpu_set_t of the size given.
            unsafe { libc::sched_setaffinity(self.tid, std::mem::size_of::<libc::cpu_set_t>(), &allowed) };
        }
        self.unboost();
    }
}

/// The calling thread's scheduling attributes.
pub(crate) fn sched_attr_of_this_thread() -> Option<libc::sched_attr> {
    // SAFETY: sched_attr is plain data; all zeros is valid.
    let mut attr: libc::sched_attr = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::sched_attr>() as u32;
    // SAFETY: sched_getattr of the calling thread into a sched_attr of the size we state.
    let r = unsafe { libc::syscall(libc::SYS_sched_getattr, 0, &mut attr, size, 0u32) };
    (r == 0).then_some(attr)
}

/// Gives thread `tid` of this process real-time priority (`SCHED_FIFO` 1) until it
/// puts back what it had ([`Placement::unboost`], once its guest has run for a while:
/// see [`Deboost`]): for the new process's vCPU threads from the moment their states
/// are posted.
///
/// They poll, yielding, through the pause, and each `sched_yield` pushes a thread's
/// EEVDF deadline back; a poller that had yielded to another task (a handed-over
/// process releasing its pages, the operator's shell) was then traced waiting,
/// runnable, up to 2.8 ms for its CPU while the guest stayed paused. Made real-time,
/// it takes its CPU at once and keeps it for the ~100 µs of its restore and the
/// commit; nothing else of this process needs a CPU then (the receiving thread sleeps
/// until the decision). Where the kernel refuses (no CAP_SYS_NICE), nothing changes.
fn boost(tid: libc::pid_t) {
    let attr = libc::sched_attr {
        size: std::mem::size_of::<libc::sched_attr>() as u32,
        sched_policy: libc::SCHED_FIFO as u32,
        sched_flags: 0,
        sched_nice: 0,
        sched_priority: 1,
        sched_runtime: 0,
        sched_deadline: 0,
        sched_period: 0,
    };
    // SAFETY: sched_setattr on a thread of this process, reading a valid sched_attr of
    // the size it states.
    unsafe { libc::syscall(libc::SYS_sched_setattr, tid, &attr, 0u32) };
}

/// A vCPU thread's real-time boost kept into its first guest run, for [`DEBOOST_AFTER`]:
/// a one-shot timer then sends the thread `signal` (the kick: KVM_RUN returns EINTR),
/// and the thread puts its scheduling back at that exit, or an earlier one once
/// [`Deboost::due`].
///
/// Putting it back just before the first KVM_RUN made the thread a normal task again
/// at the worst moment: with its lag from the polling, the scheduler was traced
/// giving its CPU to a handed-over process releasing memory (~800 µs) while the guest
/// was still paused. Kept real-time through the guest's first 2 ms, the vCPU runs at
/// once, and whatever waits for its CPU runs later, as a separate, short stall.
/// Only for a thread with a CPU to itself ([`Placement::alone`]): two real-time vCPU
/// threads on one CPU would have one wait for the other's boost to end.
#[derive(Debug)]
pub struct Deboost {
    at: Instant,
    timer: libc::timer_t,
}

/// How long a vCPU thread stays real-time into the guest's run (see [`Deboost`]).
pub const DEBOOST_AFTER: Duration = Duration::from_millis(2);

impl Deboost {
    /// Arms the timer for the calling thread; `None` if it cannot be (then put the
    /// scheduling back at once).
    pub fn arm(signal: i32) -> Option<Self> {
        // SAFETY: sigevent is plain data; all zeros is valid.
        let mut ev: libc::sigevent = unsafe { std::mem::zeroed() };
        ev.sigev_notify = libc::SIGEV_THREAD_ID;
        ev.sigev_signo = signal;
        // SAFETY: gettid has no preconditions.
        ev.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut timer: libc::timer_t = std::ptr::null_mut();
        // SAFETY: timer_create reads the sigevent and writes the new timer's id.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut ev, &mut timer) } != 0 {
            return None;
        }
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec { tv_sec: 0, tv_nsec: DEBOOST_AFTER.as_nanos() as libc::c_long },
        };
        let d = Deboost { at: Instant::now() + DEBOOST_AFTER, timer };
        // SAFETY: timer_settime on the timer just created, reading a valid itimerspec.
        if unsafe { libc::timer_settime(timer, 0, &spec, std::ptr::null_mut()) } != 0 {
            return None; // dropped: the timer is deleted
        }
        Some(d)
    }

    /// Whether the boost has run its time.
    pub fn due(&self) -> bool {
        Instant::now() >= self.at
    }
}

impl Drop for Deboost {
    fn drop(&mut self) {
        // SAFETY: deletes the timer this value created, once.
        unsafe { libc::timer_delete(self.timer) };
    }
}

/// After a live update, in the new process: keeps the vCPU threads `tids` on the CPUs
/// they were pinned to until the old process `old_pid` has exited (at most
/// [`UNPIN_AFTER`]), then gives them every CPU this process may use, from a thread of
/// its own. The handed-over process releases its pages and exits at low priority,
/// often for seconds; while it ran on one CPU, the scheduler was seen stacking both
/// vCPU threads on the other, where they took turns in whole 4 ms ticks for 30 ms.
/// Where the old process cannot be watched (no pidfd), they are let go at once.
pub fn unpin_when_gone(old_pid: Option<libc::pid_t>, tids: Vec<libc::pid_t>) {
    // SAFETY: cpu_set_t is plain data; all zeros is the empty set.
    let mut allowed: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: sched_getaffinity of the calling thread (never pinned: the receiving
    // thread) writes at most `size` bytes into `allowed`.
    if unsafe { libc::sched_getaffinity(0, size, &mut allowed) } != 0 {
        return;
    }
    let unpin = move || {
        for &tid in tids.iter().filter(|&&t| t > 0) {
            // SAFETY: sched_setaffinity on a thread of this process, reading a valid
            // cpu_set_t of the size given; a thread that has ended gives ESRCH.
            unsafe { libc::sched_setaffinity(tid, size, &allowed) };
        }
    };
    let unpin_now = unpin.clone();
    // SAFETY: pidfd_open takes a pid and flags; the result is checked.
    let pidfd = old_pid.map_or(-1, |pid| unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32);
    if pidfd < 0 {
        unpin();
        return;
    }
    // SAFETY: pidfd_open returned this fd and nothing else owns it.
    let pidfd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(pidfd) };
    let watch = move || {
        let mut pfd = libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&pidfd), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll on one valid pollfd; a pidfd becomes readable when the process
        // exits.
        unsafe { libc::poll(&mut pfd, 1, UNPIN_AFTER.as_millis() as libc::c_int) };
        unpin();
    };
    if std::thread::Builder::new().name("unpin".into()).spawn(watch).is_err() {
        unpin_now();
    }
}

/// See [`unpin_when_gone`].
pub const UNPIN_AFTER: Duration = Duration::from_secs(120);

/// vCPU threads of this process held apart, one per CPU ([`Placement::pin_thread`]),
/// until dropped.
#[derive(Debug)]
pub struct Spread(Vec<Placement>);

impl Spread {
    /// Pins the threads `tids` (vCPU order; 0 for a thread not started, skipped).
    pub fn pin(tids: &[libc::pid_t]) -> Self {
        Spread(
            tids.iter()
                .zip(0u32..)
                .filter(|(&tid, _)| tid > 0)
                .map(|(&tid, index)| Placement::pin_thread(tid, index))
                .collect(),
        )
    }
}

impl Drop for Spread {
    fn drop(&mut self) {
        self.0.iter_mut().for_each(Placement::release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn entry(tsc: u64) -> VcpuEntry {
        VcpuEntry { kvm: None, ports: Default::default(), tsc_offset: Some(tsc) }
    }

    #[test]
    fn each_thread_takes_its_own_entry_and_reports() {
        let h = Arc::new(Handoff::new(2));
        assert!(h.wait_all_waiting(Duration::from_millis(10)).unwrap_err().contains("0 of 2"));
        let threads: Vec<_> = (0..2u32)
            .map(|i| {
                let h = h.clone();
                std::thread::spawn(move || match h.take(i) {
                    Take::Restore(e, ns) => {
                        assert_eq!((e.tsc_offset, ns), (Some(u64::from(i) + 10), 77));
                        h.report(i, if i == 1 { Err("refused".into()) } else { Ok(()) });
                    }
                    Take::Abort => panic!("aborted"),
                })
            })
            .collect();
        h.wait_all_waiting(Duration::from_secs(5)).unwrap();
        h.arriving();
        h.post(vec![entry(10), entry(11)], 77);
        assert_eq!(h.wait_restored(Duration::from_secs(5)), Err("vCPU 1: refused".into()));
        threads.into_iter().for_each(|t| t.join().unwrap());
    }

    /// The CPUs thread `tid` of this process may run on.
    fn cpus_of(tid: libc::pid_t) -> Vec<usize> {
        // SAFETY: all zeros is the empty set; sched_getaffinity writes into it.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above, for a thread of this process, with the size of the set.
        assert_eq!(unsafe { libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) }, 0);
        // SAFETY: CPU_ISSET reads the set, for indices below CPU_SETSIZE.
        (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect()
    }

    fn allowed_cpus() -> Vec<usize> {
        cpus_of(0)
    }

    #[test]
    fn placement_pins_round_robin_and_release_restores_the_mask() {
        std::thread::spawn(|| {
            let all = allowed_cpus();
            let mut p = Placement::pin(3);
            if all.len() < 2 {
                assert!(p.allowed.is_none());
                return;
            }
            assert_eq!(allowed_cpus(), vec![all[3 % all.len()]]);
            p.release();
            assert_eq!(allowed_cpus(), all);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn spread_pins_other_threads_apart_and_lets_them_go_when_dropped() {
        let all = allowed_cpus();
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let done_rx = Arc::new(std::sync::Mutex::new(done_rx));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (tx, done_rx) = (tx.clone(), done_rx.clone());
                std::thread::spawn(move || {
                    // SAFETY: gettid has no preconditions.
                    tx.send(unsafe { libc::gettid() }).unwrap();
                    let _ = done_rx.lock().unwrap().recv();
                })
            })
            .collect();
        let tids: Vec<libc::pid_t> = (0..2).map(|_| rx.recv().unwrap()).collect();
        {
            let _spread = Spread::pin(&[tids[0], 0, tids[1]]);
            if all.len() >= 2 {
                assert_eq!(cpus_of(tids[0]), vec![all[0]]);
                assert_eq!(cpus_of(tids[1]), vec![all[2 % all.len()]]);
            }
        }
        assert_eq!(cpus_of(tids[0]), all);
        assert_eq!(cpus_of(tids[1]), all);
        drop(done_tx);
        threads.into_iter().for_each(|t| t.join().unwrap());
    }

    #[test]
    fn pinned_threads_are_let_go_once_the_old_process_has_exited() {
        let all = allowed_cpus();
        if all.len() < 2 {
            return;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let pinned = std::thread::spawn(move || {
            let _p = Placement::pin(1);
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() }).unwrap();
            let _ = done_rx.recv();
        });
        let tid = rx.recv().unwrap();
        let mut old = std::process::Command::new("sleep").arg("0.3").spawn().unwrap();
        unpin_when_gone(Some(old.id() as libc::pid_t), vec![tid, 0]);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(cpus_of(tid), vec![all[1]], "let go while the old process lives");
        old.wait().unwrap();
        let since = Instant::now();
        while cpus_of(tid) != all {
            assert!(since.elapsed() < Duration::from_secs(5), "still pinned after the old process exited");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Not known: let go at once.
        let _p = Placement::pin_thread(tid, 0);
        unpin_when_gone(None, vec![tid]);
        assert_eq!(cpus_of(tid), all);
        drop(done_tx);
        pinned.join().unwrap();
    }

    #[test]
    fn a_kept_boost_ends_with_a_kick_to_its_own_thread() {
        crate::vm::vcpu::install_kick_handler().unwrap();
        std::thread::spawn(|| {
            let d = Deboost::arm(crate::vm::vcpu::kick_signal()).expect("timer");
            assert!(!d.due());
            let started = Instant::now();
            let t = libc::timespec { tv_sec: 5, tv_nsec: 0 };
            // SAFETY: nanosleep reads the timespec we pass; no remainder is asked for.
            let r = unsafe { libc::nanosleep(&t, std::ptr::null_mut()) };
            let woke = started.elapsed();
            assert_eq!((r, std::io::Error::last_os_error().raw_os_error()), (-1, Some(libc::EINTR)));
            assert!(woke >= DEBOOST_AFTER && woke < Duration::from_secs(4), "{woke:?}");
            assert!(d.due());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn abort_releases_waiting_threads_and_a_missing_report_times_out() {
        let h = Arc::new(Handoff::new(1));
        let t = {
            let h = h.clone();
            std::thread::spawn(move || matches!(h.take(0), Take::Abort))
        };
        h.abort();
        assert!(t.join().unwrap());
        let e = Handoff::new(1).wait_restored(Duration::from_millis(10)).unwrap_err();
        assert!(e.contains("0 of 1 vCPUs"), "{e}");
    }

    #[test]
    fn the_last_thread_restored_commits_unless_one_failed() {
        use std::sync::atomic::AtomicBool;
        for fail in [false, true] {
            let h = Arc::new(Handoff::new(2));
            let ran = Arc::new(AtomicBool::new(false));
            let r = ran.clone();
            h.set_committer(Box::new(move || {
                r.store(true, Ordering::SeqCst);
                Ok(())
            }));
            let threads: Vec<_> = (0..2u32)
                .map(|i| {
                    let h = h.clone();
                    std::thread::spawn(move || match h.take(i) {
                        Take::Restore(..) => h.report(i, if fail && i == 0 { Err("refused".into()) } else { Ok(()) }),
                        Take::Abort => panic!("aborted"),
                    })
                })
                .collect();
            h.wait_all_waiting(Duration::from_secs(5)).unwrap();
            h.post(vec![entry(1), entry(2)], 5);
            let committed: Vec<bool> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            let decided = h.wait_decided(Duration::from_secs(5)).expect("decided");
            if fail {
                assert_eq!(decided.unwrap_err(), "vCPU 0: refused");
                assert!(!ran.load(Ordering::SeqCst));
                assert_eq!(committed, [false, false]);
            } else {
                assert!(decided.unwrap() > 0);
                assert!(ran.load(Ordering::SeqCst));
                assert_eq!(committed.iter().filter(|&&c| c).count(), 1, "exactly one thread commits");
            }
        }
        // Nothing reported: no decision.
        assert!(Handoff::new(1).wait_decided(Duration::from_millis(10)).is_none());
    }

    fn policy() -> u32 {
        sched_attr_of_this_thread().expect("sched_getattr").sched_policy
    }

    /// Whether this process may make threads real-time (root, CAP_SYS_NICE).
    fn may_boost() -> bool {
        std::thread::spawn(|| {
            // SAFETY: gettid has no preconditions.
            boost(unsafe { libc::gettid() });
            policy() == libc::SCHED_FIFO as u32
        })
        .join()
        .unwrap()
    }

    #[test]
    fn posted_threads_run_real_time_until_they_put_their_scheduling_back() {
        for committing in [true, false] {
            let h = Arc::new(Handoff::new(2));
            if committing {
                h.set_committer(Box::new(|| Ok(())));
            }
            let threads: Vec<_> = (0..2u32)
                .map(|i| {
                    let h = h.clone();
                    std::thread::spawn(move || {
                        let mut p = Placement::pin(i);
                        let before = policy();
                        let Take::Restore(..) = h.take(i) else { panic!("aborted") };
                        let during = policy();
                        h.report(i, Ok(()));
                        p.release();
                        (before, during, policy())
                    })
                })
                .collect();
            h.wait_all_waiting(Duration::from_secs(5)).unwrap();
            h.post(vec![entry(1), entry(2)], 5);
            let other = libc::SCHED_OTHER as u32;
            // v2 (a committer) boosts where the kernel lets it; v1 never does.
            let boosted = if committing && may_boost() { libc::SCHED_FIFO as u32 } else { other };
            for t in threads {
                assert_eq!(t.join().unwrap(), (other, boosted, other), "committing {committing}");
            }
        }
    }
}
