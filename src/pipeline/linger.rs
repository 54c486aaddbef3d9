//! Whether a worker whose batch has begun, and whose queue is empty, lingers for more (pure).
//!
//! Lingering pays when senders keep several messages in flight: the next ones arrive within
//! microseconds and share the commit. It is pure latency when they do not: a REQ client with
//! one message in flight sends nothing until its reply, so every linger of its batches comes
//! back empty. `Linger` keeps the outcome of the last few lingers and stops lingering once
//! they all came back empty, trying again now and then so a change of load is seen.

/// Lingers remembered (bits of `recent`).
const REMEMBERED: u32 = 8;

/// While lingering does not pay, one batch in this many lingers anyway (the probe).
const PROBE_EVERY: u32 = 16;

#[derive(Debug, Clone)]
pub struct Linger {
    /// The last `REMEMBERED` lingers, newest in bit 0: 1 = a message came.
    recent: u32,
    /// Lingers held known to be empty in a row, counted towards the next probe.
    skipped: u32,
}

impl Default for Linger {
    /// Starts as if lingering paid: the first batches of a busy start are not cut short.
    fn default() -> Linger {
        Linger {
            recent: (1 << REMEMBERED) - 1,
            skipped: 0,
        }
    }
}

impl Linger {
    /// Whether to linger now (the batch has messages, the queue is empty).
    pub fn wait_for_more(&mut self) -> bool {
        if self.recent != 0 {
            return true;
        }
        self.skipped += 1;
        if self.skipped >= PROBE_EVERY {
            self.skipped = 0;
            return true;
        }
        false
    }

    /// What a linger came back with.
    pub fn lingered(&mut self, caught: bool) {
        let mask = (1 << REMEMBERED) - 1;
        self.recent = ((self.recent << 1) | u32::from(caught)) & mask;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `batches` batches whose lingers catch a message when `pays` says so; how many lingered.
    fn run(l: &mut Linger, batches: usize, pays: impl Fn(usize) -> bool) -> usize {
        let mut lingered = 0;
        for i in 0..batches {
            if l.wait_for_more() {
                lingered += 1;
                l.lingered(pays(i));
            }
        }
        lingered
    }

    #[test]
    fn lingers_while_it_pays() {
        let mut l = Linger::default();
        assert_eq!(run(&mut l, 1000, |_| true), 1000);
        // One empty linger in four still pays often enough to keep lingering.
        assert_eq!(run(&mut l, 1000, |i| i % 4 != 0), 1000);
    }

    #[test]
    fn one_in_flight_senders_stop_paying_for_it_but_are_probed() {
        let mut l = Linger::default();
        let lingered = run(&mut l, 1600, |_| false);
        // The first 8 come back empty, then one probe in 16.
        assert_eq!(lingered, 8 + (1600 - 8) / 16);
        let next: Vec<bool> = (0..PROBE_EVERY).map(|_| l.wait_for_more()).collect();
        assert_eq!(
            next.iter().filter(|&&w| w).count(),
            1,
            "one probe in every {PROBE_EVERY} batches: {next:?}"
        );
    }

    #[test]
    fn a_probe_that_pays_brings_lingering_back() {
        let mut l = Linger::default();
        run(&mut l, 100, |_| false);
        let mut probes = 0;
        while !l.wait_for_more() {
            probes += 1;
            assert!(
                probes <= PROBE_EVERY,
                "a probe comes within {PROBE_EVERY} batches"
            );
        }
        l.lingered(true);
        assert!(l.wait_for_more() && l.wait_for_more(), "lingering again");
    }
}
