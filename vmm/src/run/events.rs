//! The main thread's event loop (event-manager): it sleeps until a vCPU decides the
//! outcome or SIGINT/SIGTERM arrives, then the run is torn down.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::vm::control::{Outcome, RunControl};

static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);
static SIGNAL_NUM: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    SIGNAL_NUM.store(num, Ordering::SeqCst);
    let fd = SIGNAL_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: write(2) is async-signal-safe; `one` is a valid 8-byte buffer and
        // `fd` is the eventfd the run owns for its whole duration.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Wakes on the run's exit eventfd and on stop signals.
struct Watcher {
    ctl: Arc<RunControl>,
    signal_evt: EventFd,
    done: bool,
}

impl MutEventSubscriber for Watcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.signal_evt.as_raw_fd() {
            let _ = self.signal_evt.read();
            self.ctl.finish(Outcome::Signal(SIGNAL_NUM.load(Ordering::SeqCst)));
        } else {
            let _ = self.ctl.exit_evt().read();
        }
        self.done = self.ctl.stopping();
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(self.ctl.exit_evt(), EventSet::IN));
        let _ = ops.add(Events::new(&self.signal_evt, EventSet::IN));
    }
}

/// Runs the event loop until the run stops, or `deadline` passes (then the run
/// ends with a timeout error), serving the API socket if there is one (its socket
/// file is removed when the loop ends).
pub fn wait_for_stop(
    ctl: &Arc<RunControl>,
    deadline: Option<Duration>,
    api: Option<crate::api::ApiServer>,
) -> io::Result<()> {
    let until = deadline.map(|d| Instant::now() + d);
    let signal_evt = EventFd::new(libc::EFD_NONBLOCK)?;
    SIGNAL_FD.store(signal_evt.as_raw_fd(), Ordering::SeqCst);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        vmm_sys_util::signal::register_signal_handler(sig, on_stop_signal)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    }
    let to_io = |e: event_manager::Error| io::Error::other(format!("{e:?}"));
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().map_err(to_io)?;
    let w = Arc::new(Mutex::new(Watcher { ctl: ctl.clone(), signal_evt, done: false }));
    em.add_subscriber(w.clone());
    if let Some(api) = api {
        em.add_subscriber(Arc::new(Mutex::new(api)));
    }
    while !ctl.stopping() && !w.lock().map(|w| w.done).unwrap_or(true) {
        let wait_ms = match until {
            Some(t) => {
                let left = t.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    let message = format!("timed out after {} ms", deadline.unwrap_or_default().as_millis());
                    ctl.finish(Outcome::Error { vcpu: 0, message });
                    break;
                }
                left.as_millis().clamp(1, 1000) as i32
            }
            None => 1000,
        };
        em.run_with_timeout(wait_ms).map_err(to_io)?;
    }
    SIGNAL_FD.store(-1, Ordering::SeqCst);
    Ok(())
}
