//! Timers at millisecond resolution for the TCP checker: a ring of buckets, one per
//! millisecond. With 10 000 backends checked every second, a binary heap's pops (14 levels of
//! 32-byte entries each) were the checker thread's largest user-space cost; here a timer is a
//! push onto its bucket's vector and firing is a walk over the buckets passed since the last
//! call. A timer never fires early, and at most a millisecond late (the thread's tick).

use std::time::{Duration, Instant};

/// Buckets in the ring (a power of two): timers further out than this many milliseconds stay
/// in their bucket for more than one turn.
const SLOTS: u64 = 4096;

pub struct Wheel<T> {
    origin: Instant,
    /// (due millisecond since `origin`, item), by due millisecond modulo [`SLOTS`].
    buckets: Vec<Vec<(u64, T)>>,
    /// The first millisecond whose timers have not fired yet.
    next: u64,
    len: usize,
}

impl<T> Wheel<T> {
    pub fn new(origin: Instant) -> Wheel<T> {
        Wheel {
            origin,
            buckets: (0..SLOTS).map(|_| Vec::new()).collect(),
            next: 0,
            len: 0,
        }
    }

    /// Milliseconds since the origin, rounded up (a timer fires when that millisecond has
    /// passed, never before its time).
    fn ms_ceil(&self, t: Instant) -> u64 {
        let d = t.saturating_duration_since(self.origin);
        d.as_millis() as u64 + u64::from(!d.subsec_nanos().is_multiple_of(1_000_000))
    }

    /// Fires `item` at `due` (in the next millisecond not yet expired, if `due` is past).
    pub fn push(&mut self, due: Instant, item: T) {
        let ms = self.ms_ceil(due).max(self.next);
        self.buckets[(ms % SLOTS) as usize].push((ms, item));
        self.len += 1;
    }

    /// Moves every timer due by `now` into `out` (in no particular order within a
    /// millisecond).
    pub fn expire(&mut self, now: Instant, out: &mut Vec<T>) {
        let until = now.saturating_duration_since(self.origin).as_millis() as u64;
        if until < self.next {
            return;
        }
        if self.len == 0 {
            self.next = until + 1;
            return;
        }
        // Past a whole turn, every bucket is visited once.
        let last = until.min(self.next + SLOTS - 1);
        for ms in self.next..=last {
            let bucket = &mut self.buckets[(ms % SLOTS) as usize];
            if bucket.is_empty() {
                continue;
            }
            let before = bucket.len();
            let mut i = 0;
            while i < bucket.len() {
                if bucket[i].0 <= until {
                    out.push(bucket.swap_remove(i).1);
                } else {
                    i += 1;
                }
            }
            self.len -= before - bucket.len();
        }
        self.next = until + 1;
    }

    /// When the earliest timer may be due (no later than that; `None`: no timers).
    pub fn next_due(&self) -> Option<Instant> {
        if self.len == 0 {
            return None;
        }
        (self.next..self.next + SLOTS)
            .find(|ms| !self.buckets[(ms % SLOTS) as usize].is_empty())
            .map(|ms| self.origin + Duration::from_millis(ms))
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_in_time_never_early_and_keeps_later_turns() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut w = Wheel::new(t0);
        let mut out = Vec::new();
        w.push(ms(5), "a");
        w.push(ms(5) + Duration::from_micros(300), "b"); // due in millisecond 6
        w.push(ms(5 + SLOTS), "c"); // same bucket as "a", next turn
        w.push(ms(3 * SLOTS + 7), "d"); // several turns out
        assert_eq!(w.next_due(), Some(ms(5)));
        w.expire(ms(4), &mut out);
        assert!(out.is_empty());
        w.expire(ms(5), &mut out);
        assert_eq!(out, ["a"]);
        w.expire(ms(5) + Duration::from_micros(900), &mut out);
        assert_eq!(out, ["a"], "b is due at 5.3 ms: fires at 6 ms, not before");
        w.expire(ms(6), &mut out);
        assert_eq!(out, ["a", "b"]);
        w.expire(ms(SLOTS), &mut out);
        assert_eq!(out, ["a", "b"], "c waits for its turn");
        w.expire(ms(SLOTS + 5), &mut out);
        assert_eq!(out, ["a", "b", "c"]);
        // A long gap (more than a turn) fires what is due and keeps the rest.
        w.push(ms(3 * SLOTS + 8), "e");
        w.expire(ms(3 * SLOTS + 7), &mut out);
        assert_eq!(out, ["a", "b", "c", "d"]);
        assert!(!w.is_empty());
        w.expire(ms(3 * SLOTS + 8), &mut out);
        assert_eq!(out, ["a", "b", "c", "d", "e"]);
        assert!(w.is_empty() && w.next_due().is_none());
        // A timer in the past fires in the next millisecond.
        w.push(ms(1), "f");
        w.expire(ms(3 * SLOTS + 9), &mut out);
        assert_eq!(out.last(), Some(&"f"));
    }
}
