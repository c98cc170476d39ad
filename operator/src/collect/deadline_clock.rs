//! The clock of window deadlines, which stops while reports cannot be
//! verified. Pure, no I/O, unit-tested.
//!
//! A window is final when every node that runs its observation sent its
//! part, or at its deadline. While the API server cannot review agents'
//! tokens (an outage), an agent whose token is not cached is answered 503
//! and holds its windows; were the deadlines to run on, those windows would
//! be finalized without its parts, and its parts, arriving after the outage,
//! dropped as late. So the deadline clock stands still from the first
//! report that could not be verified until [`QUIET_MS`] after the last one
//! (time for the agents to resend), and never falls more than
//! [`MAX_PAUSE_MS`] behind: past that, windows are finalized with what
//! arrived (and the agents' buffers would be running out anyway).

/// How long after the last unverifiable report the clock runs again.
pub(crate) const QUIET_MS: i64 = 30_000;
/// The longest the clock stands still.
pub(crate) const MAX_PAUSE_MS: i64 = 15 * 60_000;

#[derive(Clone, Debug, Default)]
pub(crate) struct DeadlineClock {
    /// The first and the last unverifiable report of the current pause.
    pause: Option<(i64, i64)>,
}

impl DeadlineClock {
    /// A report could not be verified at `now_ms` (the API server could
    /// not be asked).
    pub(crate) fn unverifiable(&mut self, now_ms: i64) {
        self.pause = match self.pause {
            Some((since, last)) if now_ms.saturating_sub(last) <= QUIET_MS => {
                Some((since, last.max(now_ms)))
            }
            _ => Some((now_ms, now_ms)),
        };
    }

    /// The time deadlines are measured against at `now_ms`.
    pub(crate) fn now(&self, now_ms: i64) -> i64 {
        match self.pause {
            Some((since, last)) if now_ms.saturating_sub(last) <= QUIET_MS => {
                since.max(now_ms.saturating_sub(MAX_PAUSE_MS))
            }
            _ => now_ms,
        }
    }

    /// Whether the clock stands still at `now_ms` (a metric).
    pub(crate) fn paused(&self, now_ms: i64) -> bool {
        self.now(now_ms) < now_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_until_a_report_cannot_be_verified() {
        let c = DeadlineClock::default();
        assert_eq!(c.now(1_000), 1_000);
        assert!(!c.paused(1_000));
    }

    #[test]
    fn stands_still_during_an_outage_and_runs_again_after() {
        let mut c = DeadlineClock::default();
        c.unverifiable(10_000);
        assert_eq!(c.now(10_000), 10_000);
        assert_eq!(c.now(20_000), 10_000);
        c.unverifiable(35_000);
        c.unverifiable(60_000);
        assert_eq!(c.now(80_000), 10_000, "still within QUIET_MS of the last");
        assert!(c.paused(80_000));
        assert_eq!(c.now(60_000 + QUIET_MS + 1), 60_000 + QUIET_MS + 1);
        // A later outage pauses it again, from its own start.
        c.unverifiable(200_000);
        assert_eq!(c.now(210_000), 200_000);
    }

    #[test]
    fn never_falls_more_than_the_bound_behind() {
        let mut c = DeadlineClock::default();
        let mut t = 0;
        while t < 2 * MAX_PAUSE_MS {
            c.unverifiable(t);
            t += 10_000;
        }
        assert_eq!(c.now(t), t - MAX_PAUSE_MS);
    }
}
