//! Telling systemd (`Type=notify`) what the relay is doing: ready once every accept thread is
//! accepting, reloading while a SIGHUP's configuration is put in force, stopping when the drain
//! starts. Outside systemd (no `NOTIFY_SOCKET`) every call does nothing.

use sd_notify::NotifyState;

/// Every accept thread is accepting: `systemctl start` returns, units ordered after this one
/// start.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload (SIGHUP) is being applied; [`ready`] follows once it has been, or rejected.
pub fn reloading() {
    // systemd wants the reload's start time to tell this reload from an earlier one.
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// The drain has started: the listener is closed and live connections are winding down.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}
