//! Telling systemd (`Type=notify`) what the relay is doing: ready once every accept thread is
//! accepting, reloading while a SIGHUP's configuration is put in force, stopping when the drain
//! starts. Outside systemd (no `NOTIFY_SOCKET`) nothing is sent.

use std::sync::Mutex;

use sd_notify::NotifyState;

/// One relay's notifications, in an order systemd can trust: RELOADING=1 only after the first
/// READY=1, and once STOPPING=1 has gone out neither READY=1 nor RELOADING=1 (a reload that
/// finishes during the drain would otherwise tell systemd the service is up again).
#[derive(Default)]
pub struct Notifier {
    /// Held while a notification is sent, so none overtakes another.
    phase: Mutex<Phase>,
}

#[derive(Default, PartialEq, Eq)]
enum Phase {
    #[default]
    Starting,
    Ready,
    Stopping,
}

impl Notifier {
    /// Every accept thread is accepting (or a reload is done): `systemctl start` returns, units
    /// ordered after this one start. Returns false, sending nothing, once the drain has started.
    pub fn ready(&self, status: &str) -> bool {
        let mut phase = self.phase.lock().unwrap();
        if *phase == Phase::Stopping {
            return false;
        }
        send(&[NotifyState::Ready, NotifyState::Status(status)]);
        *phase = Phase::Ready;
        true
    }

    /// A reload (SIGHUP) is being applied; [`Notifier::ready`] follows once it has been, or
    /// rejected. Returns false, sending nothing, before the first READY=1 or once the drain has
    /// started.
    pub fn reloading(&self) -> bool {
        let phase = self.phase.lock().unwrap();
        if *phase != Phase::Ready {
            return false;
        }
        // systemd wants the reload's start time to tell this reload from an earlier one.
        match NotifyState::monotonic_usec_now() {
            Ok(now) => send(&[NotifyState::Reloading, now]),
            Err(_) => send(&[NotifyState::Reloading]),
        }
        true
    }

    /// The drain has started: the listener is closed and live connections are winding down.
    pub fn stopping(&self, status: &str) {
        let mut phase = self.phase.lock().unwrap();
        *phase = Phase::Stopping;
        send(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reloading_only_between_ready_and_stopping() {
        let n = Notifier::default();
        assert!(!n.reloading(), "not before the first READY=1");
        assert!(n.ready("accepting"));
        assert!(n.reloading());
        assert!(n.ready("configuration reloaded"));
        n.stopping("draining");
        assert!(!n.reloading());
        assert!(!n.ready("configuration reloaded"));
    }
}
