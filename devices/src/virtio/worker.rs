//! The device thread: an `event-manager` loop that owns a device's backend and queues.
//!
//! The transport (vCPU thread) talks to the worker through a [`WorkerHandle`]: activation
//! moves the queues in, reset takes them away and waits (bounded) until the worker has
//! dropped them. The guest's queue notifications arrive on the worker's epoll as the
//! ioeventfds the VMM registered, so no vCPU ever waits on device I/O.
//!
//! Epoll data tokens: queue `i`'s notifier uses `i`, the command wake-up uses
//! [`WAKE_TOKEN`]; fds a worker registers itself must use tokens from
//! [`WORKER_TOKEN_BASE`] up.

use std::io;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, Interrupt, QueuePosition};

/// Epoll token of the command wake-up eventfd.
pub const WAKE_TOKEN: u32 = u32::MAX;
/// First epoll token a worker may use for its own fds (sockets, taps).
pub const WORKER_TOKEN_BASE: u32 = 0x1_0000;

/// A message from the transport to the worker.
#[derive(Debug)]
pub enum WorkerCommand {
    /// The driver set DRIVER_OK: take the queues.
    Activate(Activation),
    /// The driver reset the device: drop the queues, then answer on the sender.
    Reset(mpsc::SyncSender<()>),
    /// The VMM is shutting down: leave the loop.
    Stop,
    /// A snapshot: answer with the queues' positions, then wait (serving nothing, so
    /// guest memory and the backend stay as they are) for [`WorkerCommand::Resume`] or
    /// [`WorkerCommand::Stop`].
    Pause(mpsc::SyncSender<Vec<QueuePosition>>),
    /// Go on after a pause.
    Resume,
    /// A restored VM's driver is live already: take the queues (at their saved
    /// positions), then do what a restore asks of the device
    /// ([`QueueWorker::after_restore`]).
    ActivateRestored(Activation),
}

/// Why the transport could not reach its worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The worker thread is gone (it exited or panicked).
    #[error("device worker thread is gone")]
    Disconnected,
    /// The worker did not confirm a reset in time (it is stuck in a slow backend call).
    #[error("device worker did not confirm the reset within {0:?}")]
    ResetTimeout(Duration),
    /// The worker did not pause in time.
    #[error("device worker did not pause within {0:?}")]
    PauseTimeout(Duration),
    /// The wake-up eventfd could not be written.
    #[error("cannot wake the device worker: {0}")]
    Wake(#[source] io::Error),
    /// epoll or thread setup failed.
    #[error("device thread setup: {0}")]
    Setup(#[source] io::Error),
    /// The event loop failed.
    #[error("device event loop: {0:?}")]
    EventLoop(event_manager::Error),
    /// The code run before the loop (the seccomp filter) refused to start it.
    #[error("device thread {name}: before-run step failed: {reason}")]
    BeforeRun {
        /// Thread name.
        name: String,
        /// What failed.
        reason: String,
    },
}

/// The transport's end of the channel to a device worker.
#[derive(Debug)]
pub struct WorkerHandle {
    tx: mpsc::Sender<WorkerCommand>,
    wake: EventFd,
}

/// The worker's end of the channel.
#[derive(Debug)]
pub struct WorkerInbox {
    rx: mpsc::Receiver<WorkerCommand>,
    wake: EventFd,
}

/// A connected handle/inbox pair.
pub fn channel() -> io::Result<(WorkerHandle, WorkerInbox)> {
    let wake = EventFd::new(libc::EFD_NONBLOCK)?;
    let (tx, rx) = mpsc::channel();
    Ok((
        WorkerHandle {
            tx,
            wake: wake.try_clone()?,
        },
        WorkerInbox { rx, wake },
    ))
}

impl WorkerHandle {
    fn send(&self, command: WorkerCommand) -> Result<(), WorkerError> {
        self.tx
            .send(command)
            .map_err(|_| WorkerError::Disconnected)?;
        self.wake.write(1).map_err(WorkerError::Wake)
    }

    /// Hands the queues to the worker. Returns once the message is queued; the worker
    /// picks it up before it looks at any queue notification.
    pub fn activate(&self, activation: Activation) -> Result<(), WorkerError> {
        self.send(WorkerCommand::Activate(activation))
    }

    /// Takes the queues back and waits up to `timeout` for the worker to confirm.
    pub fn reset(&self, timeout: Duration) -> Result<(), WorkerError> {
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        self.send(WorkerCommand::Reset(ack_tx))?;
        match ack_rx.recv_timeout(timeout) {
            Ok(()) => Ok(()),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(WorkerError::ResetTimeout(timeout)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(WorkerError::Disconnected),
        }
    }

    /// Pauses the worker (it finishes what it is doing first) and returns its queues'
    /// positions, waiting up to `timeout`.
    pub fn pause(&self, timeout: Duration) -> Result<Vec<QueuePosition>, WorkerError> {
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        self.send(WorkerCommand::Pause(ack_tx))?;
        match ack_rx.recv_timeout(timeout) {
            Ok(positions) => Ok(positions),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(WorkerError::PauseTimeout(timeout)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(WorkerError::Disconnected),
        }
    }

    /// Lets a paused worker go on.
    pub fn resume(&self) -> Result<(), WorkerError> {
        self.send(WorkerCommand::Resume)
    }

    /// Hands a restored VM's live queues to the worker.
    pub fn activate_restored(&self, activation: Activation) -> Result<(), WorkerError> {
        self.send(WorkerCommand::ActivateRestored(activation))
    }

    /// Asks the worker thread to leave its loop.
    pub fn stop(&self) -> Result<(), WorkerError> {
        self.send(WorkerCommand::Stop)
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        // The worker may already be gone; nothing to do about it then.
        let _ = self.stop();
    }
}

/// What a device does on its own thread.
///
/// Callbacks get the device's [`Interrupt`] to signal used buffers or to mark the device
/// NEEDS_RESET, and the loop's [`EventOps`] to register fds of their own.
pub trait QueueWorker: Send {
    /// A short name for logs ("virtio-blk").
    fn name(&self) -> &'static str;

    /// Called once on the device thread before the loop starts: register backend fds here
    /// (tokens from [`WORKER_TOKEN_BASE`]).
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops;
    }

    /// The driver set DRIVER_OK. The worker owns `activation` until [`QueueWorker::reset`].
    fn activate(&mut self, activation: Activation, interrupt: &Interrupt, ops: &mut EventOps);

    /// Queue `index` was notified (its eventfd is already drained). Only called while
    /// active and not NEEDS_RESET.
    fn process_queue(&mut self, index: usize, interrupt: &Interrupt, ops: &mut EventOps);

    /// The device was reset: drop the queues and guest memory, keep the backend.
    fn reset(&mut self, ops: &mut EventOps);

    /// Where each queue stands (in queue order), for a snapshot; called only while
    /// active, between two events, so nothing is half-served.
    fn queue_positions(&self) -> Vec<QueuePosition>;

    /// Called right after [`QueueWorker::activate`] when the VM was restored from a
    /// snapshot: what the device must tell the driver about state that did not survive
    /// (vsock: its connections are gone). Nothing by default.
    fn after_restore(&mut self, interrupt: &Interrupt, ops: &mut EventOps) {
        let _ = (interrupt, ops);
    }

    /// An event on an fd the worker registered itself.
    fn process_event(&mut self, events: Events, interrupt: &Interrupt, ops: &mut EventOps) {
        let _ = (events, interrupt, ops);
    }
}

/// The `event-manager` subscriber that drives a [`QueueWorker`].
#[derive(Debug)]
pub struct WorkerLoop<W> {
    worker: W,
    inbox: WorkerInbox,
    notifiers: Vec<EventFd>,
    interrupt: Interrupt,
    active: bool,
    stopped: bool,
    /// Resets handled so far: a kick read before a reset was handled belongs to the queues
    /// that reset took away.
    resets: u64,
}

impl<W: QueueWorker> WorkerLoop<W> {
    /// A loop for `worker`, woken by `inbox` and by the queue `notifiers` (in queue order,
    /// the same eventfds the VMM registered with `KVM_IOEVENTFD`).
    pub fn new(
        worker: W,
        inbox: WorkerInbox,
        notifiers: Vec<EventFd>,
        interrupt: Interrupt,
    ) -> Self {
        Self {
            worker,
            inbox,
            notifiers,
            interrupt,
            active: false,
            stopped: false,
            resets: 0,
        }
    }

    /// The worker, for tests and metrics.
    pub fn worker(&self) -> &W {
        &self.worker
    }

    /// Whether the loop was asked to stop (or its transport is gone).
    #[must_use]
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Handles every queued command. Called on a wake-up, and before a queue notification
    /// is judged, so an activation sent just before the guest's first kick is never missed.
    fn drain_commands(&mut self, ops: &mut EventOps) {
        // The count only keeps the wake-up eventfd from staying readable.
        let _ = self.inbox.wake.read();
        loop {
            match self.inbox.rx.try_recv() {
                Ok(WorkerCommand::Activate(activation)) => {
                    if self.active {
                        self.worker.reset(ops);
                    }
                    self.active = true;
                    self.worker.activate(activation, &self.interrupt, ops);
                }
                Ok(WorkerCommand::Reset(ack)) => {
                    if self.active {
                        self.worker.reset(ops);
                        self.active = false;
                    }
                    // Kicks the guest made before it reset the device are for the queues
                    // just dropped. Consume them here, so a kick still pending in this
                    // epoll round is not judged later as one made before DRIVER_OK (which
                    // would mark a freshly reset device NEEDS_RESET). The guest's kick and
                    // its Status write come from one vCPU in that order, so every such
                    // kick is already counted in its eventfd.
                    for fd in &self.notifiers {
                        let _ = fd.read();
                    }
                    self.resets = self.resets.wrapping_add(1);
                    // The transport may have given up waiting; that is its business.
                    let _ = ack.send(());
                }
                Ok(WorkerCommand::ActivateRestored(activation)) => {
                    if self.active {
                        self.worker.reset(ops);
                    }
                    self.active = true;
                    self.worker.activate(activation, &self.interrupt, ops);
                    self.worker.after_restore(&self.interrupt, ops);
                }
                Ok(WorkerCommand::Pause(ack)) => {
                    let positions = if self.active {
                        self.worker.queue_positions()
                    } else {
                        Vec::new()
                    };
                    // The VMM may have given up waiting; then it resumes or stops us.
                    let _ = ack.send(positions);
                    if !self.wait_paused() {
                        self.stopped = true;
                        return;
                    }
                }
                // A resume without a pause (one that timed out): nothing to do.
                Ok(WorkerCommand::Resume) => {}
                Ok(WorkerCommand::Stop) | Err(mpsc::TryRecvError::Disconnected) => {
                    self.stopped = true;
                    return;
                }
                Err(mpsc::TryRecvError::Empty) => return,
            }
        }
    }

    /// Blocks on the command channel until a resume (true) or a stop (false). The vCPUs
    /// are paused meanwhile, so no reset or activation can come; one that did would be a
    /// VMM bug, and is dropped with a warning.
    fn wait_paused(&mut self) -> bool {
        loop {
            match self.inbox.rx.recv() {
                Ok(WorkerCommand::Resume) => return true,
                Ok(WorkerCommand::Stop) | Err(_) => return false,
                Ok(other) => {
                    tracing::warn!(
                        device = self.worker.name(),
                        ?other,
                        "command while paused, dropped"
                    );
                }
            }
        }
    }

    fn queue_notified(&mut self, index: usize, ops: &mut EventOps) {
        // Coalesced kicks: one pass over the queue serves them all. An empty eventfd means
        // a reset consumed the kick (see `drain_commands`): nothing to judge.
        let kicked = self.notifiers.get(index).map(EventFd::read);
        if matches!(kicked, Some(Err(_))) {
            return;
        }
        if !self.active {
            let resets_before = self.resets;
            self.drain_commands(ops);
            if self.resets != resets_before {
                // The kick was read before a reset this drain handled: it was for the
                // queues that reset dropped.
                return;
            }
        }
        if self.interrupt.needs_reset() {
            return;
        }
        if !self.active {
            self.interrupt.mark_needs_reset(
                self.worker.name(),
                &format!("queue {index} notified before DRIVER_OK"),
            );
            return;
        }
        self.worker.process_queue(index, &self.interrupt, ops);
    }
}

impl<W: QueueWorker> MutEventSubscriber for WorkerLoop<W> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let token = events.data();
        if token == WAKE_TOKEN {
            self.drain_commands(ops);
        } else if token < WORKER_TOKEN_BASE {
            match usize::try_from(token) {
                Ok(index) => self.queue_notified(index, ops),
                Err(_) => tracing::warn!(token, "queue token does not fit usize"),
            }
        } else {
            self.worker.process_event(events, &self.interrupt, ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.inbox.wake,
            WAKE_TOKEN,
            EventSet::IN,
        )) {
            tracing::error!(device = self.worker.name(), error = ?e, "cannot watch the wake-up eventfd");
            self.stopped = true;
        }
        for (index, fd) in self.notifiers.iter().enumerate() {
            let registered = u32::try_from(index)
                .ok()
                .filter(|token| *token < WORKER_TOKEN_BASE)
                .map(|token| ops.add(Events::with_data(fd, token, EventSet::IN)));
            if !matches!(registered, Some(Ok(()))) {
                tracing::error!(
                    device = self.worker.name(),
                    index,
                    "cannot watch a queue notifier"
                );
                self.stopped = true;
            }
        }
        self.worker.init(ops);
    }
}

/// Starts the device thread named `name`. On the new thread, the epoll set is created and
/// every fd registered, then `before_run` runs (install the thread's seccomp filter there),
/// then the loop runs until [`WorkerHandle::stop`] or the handle is dropped.
pub fn spawn<W, F>(
    name: &str,
    worker_loop: WorkerLoop<W>,
    before_run: F,
) -> Result<JoinHandle<Result<(), WorkerError>>, WorkerError>
where
    W: QueueWorker + 'static,
    F: FnOnce() -> Result<(), String> + Send + 'static,
{
    let thread_name = name.to_owned();
    crate::thread::builder(name)
        .spawn(move || run(thread_name, worker_loop, before_run))
        .map_err(WorkerError::Setup)
}

fn run<W, F>(name: String, worker_loop: WorkerLoop<W>, before_run: F) -> Result<(), WorkerError>
where
    W: QueueWorker,
    F: FnOnce() -> Result<(), String>,
{
    let mut manager: EventManager<WorkerLoop<W>> =
        EventManager::new().map_err(WorkerError::EventLoop)?;
    let id = manager.add_subscriber(worker_loop);
    before_run().map_err(|reason| WorkerError::BeforeRun {
        name: name.clone(),
        reason,
    })?;
    tracing::debug!(thread = %name, "device thread running");
    loop {
        if manager
            .subscriber_mut(id)
            .map_err(WorkerError::EventLoop)?
            .stopped()
        {
            tracing::debug!(thread = %name, "device thread stopping");
            return Ok(());
        }
        manager.run().map_err(WorkerError::EventLoop)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Log(Arc<Mutex<Vec<String>>>);

    impl QueueWorker for Log {
        fn queue_positions(&self) -> Vec<QueuePosition> {
            Vec::new()
        }
        fn name(&self) -> &'static str {
            "log"
        }
        fn activate(&mut self, a: Activation, _: &Interrupt, _: &mut EventOps) {
            self.0
                .lock()
                .unwrap()
                .push(format!("activate {}", a.queues.len()));
        }
        fn process_queue(&mut self, index: usize, irq: &Interrupt, _: &mut EventOps) {
            self.0.lock().unwrap().push(format!("queue {index}"));
            irq.signal_used_queue().unwrap();
        }
        fn reset(&mut self, _: &mut EventOps) {
            self.0.lock().unwrap().push("reset".into());
        }
    }

    fn wait_for(log: &Arc<Mutex<Vec<String>>>, n: usize) {
        for _ in 0..500 {
            if log.lock().unwrap().len() >= n {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("worker did not log {n} entries: {:?}", log.lock().unwrap());
    }

    #[test]
    fn activate_notify_reset_stop_on_a_real_thread() {
        let (handle, inbox) = channel().unwrap();
        let notifier = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let kick = notifier.try_clone().unwrap();
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = Interrupt::new(irqfd.try_clone().unwrap());
        let log = Log::default();
        let seen = Arc::clone(&log.0);
        let thread = spawn(
            "test-dev",
            WorkerLoop::new(log, inbox, vec![notifier], irq.clone()),
            || Ok(()),
        )
        .unwrap();

        let mem = GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 0x1000)]).unwrap();
        handle
            .activate(Activation {
                mem,
                queues: vec![],
                acked_features: 0,
            })
            .unwrap();
        kick.write(1).unwrap();
        wait_for(&seen, 2);
        assert_eq!(irqfd.read().unwrap(), 1);
        handle.reset(Duration::from_secs(5)).unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            vec!["activate 0", "queue 0", "reset"]
        );
        assert!(!irq.needs_reset());
        drop(handle);
        thread.join().unwrap().unwrap();
    }

    /// A worker whose `activate` waits for the test's go-ahead, so commands and kicks can
    /// pile up behind it in a known order.
    struct Gated {
        log: Log,
        gate: mpsc::Receiver<()>,
    }

    impl QueueWorker for Gated {
        fn queue_positions(&self) -> Vec<QueuePosition> {
            Vec::new()
        }
        fn name(&self) -> &'static str {
            "gated"
        }
        fn activate(&mut self, a: Activation, irq: &Interrupt, ops: &mut EventOps) {
            let _ = self.gate.recv_timeout(Duration::from_secs(5));
            self.log.activate(a, irq, ops);
        }
        fn process_queue(&mut self, index: usize, irq: &Interrupt, ops: &mut EventOps) {
            self.log.process_queue(index, irq, ops);
        }
        fn reset(&mut self, ops: &mut EventOps) {
            self.log.reset(ops);
        }
    }

    #[test]
    fn a_kick_made_before_a_reset_does_not_brick_the_next_activation() {
        let (handle, inbox) = channel().unwrap();
        let notifier = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let kick = notifier.try_clone().unwrap();
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let (go, gate) = mpsc::channel();
        let log = Log::default();
        let seen = Arc::clone(&log.0);
        let thread = spawn(
            "test-dev",
            WorkerLoop::new(Gated { log, gate }, inbox, vec![notifier], irq.clone()),
            || Ok(()),
        )
        .unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 0x1000)]).unwrap();
        let activation = || Activation {
            mem: mem.clone(),
            queues: vec![],
            acked_features: 0,
        };
        // The worker is held inside activate; the guest kicks and then resets the device.
        handle.activate(activation()).unwrap();
        kick.write(1).unwrap();
        let handle = Arc::new(handle);
        let resetter = {
            let handle = Arc::clone(&handle);
            std::thread::spawn(move || handle.reset(Duration::from_secs(5)))
        };
        std::thread::sleep(Duration::from_millis(20));
        go.send(()).unwrap();
        resetter.join().unwrap().unwrap();
        // The stale kick must not have marked the freshly reset device.
        assert!(
            !irq.needs_reset(),
            "a kick from before the reset marked NEEDS_RESET"
        );
        // And the device comes back: a new activation and kick are served.
        go.send(()).unwrap();
        handle.activate(activation()).unwrap();
        kick.write(1).unwrap();
        wait_for(&seen, 4);
        assert_eq!(
            *seen.lock().unwrap(),
            vec!["activate 0", "reset", "activate 0", "queue 0"]
        );
        assert!(!irq.needs_reset());
        handle.stop().unwrap();
        thread.join().unwrap().unwrap();
    }

    #[test]
    fn notify_before_activation_marks_needs_reset() {
        let (handle, inbox) = channel().unwrap();
        let notifier = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let kick = notifier.try_clone().unwrap();
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let log = Log::default();
        let seen = Arc::clone(&log.0);
        let thread = spawn(
            "test-dev",
            WorkerLoop::new(log, inbox, vec![notifier], irq.clone()),
            || Ok(()),
        )
        .unwrap();
        kick.write(1).unwrap();
        for _ in 0..500 {
            if irq.needs_reset() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(irq.needs_reset());
        assert!(seen.lock().unwrap().is_empty());
        handle.stop().unwrap();
        thread.join().unwrap().unwrap();
    }

    #[test]
    fn before_run_failure_ends_the_thread_with_the_reason() {
        let (_handle, inbox) = channel().unwrap();
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let thread = spawn(
            "test-dev",
            WorkerLoop::new(Log::default(), inbox, vec![], irq),
            || Err("no filter".into()),
        )
        .unwrap();
        let err = thread.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("no filter"), "{err}");
    }

    use crate::virtio::GuestMemoryMmap;
}
