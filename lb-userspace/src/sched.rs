//! Pure scheduler logic: the round-robin sequences the data plane walks, and the
//! least-connection choice the data plane makes (mirrored in `lb-ebpf/src/select.rs`, checked
//! against this by the BPF tests).

/// Smooth weighted round robin (nginx's algorithm): every turn each backend gains its weight,
/// the richest is picked and pays the total. Weights 5:1:1 give `a a b a c a a`, never five `a`
/// in a row. Returns indexes into `weights`; one full cycle of Σw/gcd picks, scaled down to at
/// most `max_len` picks (proportions kept, every non-zero weight at least once). Zero weights
/// never appear; all zero gives an empty sequence.
pub fn wrr_sequence(weights: &[u32], max_len: usize) -> Vec<usize> {
    let g = weights
        .iter()
        .copied()
        .filter(|w| *w > 0)
        .fold(0u64, |g, w| gcd(g, w as u64));
    if g == 0 {
        return Vec::new();
    }
    let mut w: Vec<u64> = weights.iter().map(|x| *x as u64 / g).collect();
    let nonzero = w.iter().filter(|x| **x > 0).count() as u64;
    let total: u64 = w.iter().sum();
    if total > max_len as u64 {
        // Scale into the room left after giving every backend its one pick.
        let room = (max_len as u64).saturating_sub(nonzero).max(1);
        for x in w.iter_mut().filter(|x| **x > 0) {
            *x = 1 + *x * room / total;
        }
        let g = w.iter().copied().filter(|x| *x > 0).fold(0, gcd);
        w.iter_mut().for_each(|x| *x /= g);
    }
    let total: u64 = w.iter().sum();
    let mut current = vec![0i64; w.len()];
    let mut seq = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = usize::MAX;
        for (i, wi) in w.iter().enumerate() {
            if *wi == 0 {
                continue;
            }
            current[i] += *wi as i64;
            if best == usize::MAX || current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total as i64;
        seq.push(best);
    }
    seq
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The least-connection choice over `(active, weight)`: the backend with the fewest active
/// connections, or (weighted) the smallest active/weight, compared without division as
/// `a_i·w_j < a_j·w_i`. Weight 0 never wins; ties go to the earlier backend.
pub fn least_connections(candidates: &[(u64, u32)], weighted: bool) -> Option<usize> {
    use lb_common::rules::{clamp_active, wlc_less};
    let mut best = None;
    let (mut best_active, mut best_weight) = (u64::MAX, 1u64);
    for (i, (a, w)) in candidates.iter().enumerate() {
        let w = *w as u64;
        let better = if weighted {
            wlc_less(*a, w, best_active, best_weight)
        } else {
            *a < best_active
        };
        if w != 0 && better {
            best = Some(i);
            (best_active, best_weight) = (clamp_active(*a), w);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn rr_is_a_plain_cycle() {
        assert_eq!(wrr_sequence(&[1, 1, 1], 100), vec![0, 1, 2]);
        assert_eq!(
            wrr_sequence(&[7, 7], 100),
            vec![0, 1],
            "common factors cancel"
        );
    }

    #[test]
    fn wrr_5_1_1_interleaves() {
        let s = wrr_sequence(&[5, 1, 1], 100);
        assert_eq!(
            s,
            vec![0, 0, 1, 0, 2, 0, 0],
            "nginx's smooth sequence for 5:1:1"
        );
        // Never five of the first in a row, even across cycle boundaries.
        let twice: Vec<usize> = s.iter().chain(&s).copied().collect();
        assert!(twice.windows(5).all(|w| w.iter().any(|x| *x != 0)));
    }

    #[test]
    fn wrr_skips_zero_weights_and_handles_all_zero() {
        assert_eq!(wrr_sequence(&[0, 2, 0, 1], 100), vec![1, 3, 1]);
        assert!(wrr_sequence(&[0, 0], 100).is_empty());
        assert!(wrr_sequence(&[], 100).is_empty());
    }

    #[test]
    fn wrr_long_cycles_are_scaled_to_fit() {
        let s = wrr_sequence(&[65535, 1, 30000], 1000);
        assert!(s.len() <= 1000, "{}", s.len());
        assert!(s.contains(&1), "every backend keeps a turn");
        let a = s.iter().filter(|x| **x == 0).count() as f64;
        let c = s.iter().filter(|x| **x == 2).count() as f64;
        assert!((a / c - 65535.0 / 30000.0).abs() < 0.05, "{a} / {c}");
    }

    #[test]
    fn lc_picks_fewest_and_wlc_compares_without_division() {
        assert_eq!(
            least_connections(&[(5, 1), (3, 1), (3, 1)], false),
            Some(1),
            "ties to the earlier"
        );
        assert_eq!(
            least_connections(&[(0, 0), (9, 1)], false),
            Some(1),
            "weight 0 never wins"
        );
        assert_eq!(least_connections(&[], false), None);
        // wlc: 10/4 = 2.5 < 3/1 = 3.
        assert_eq!(least_connections(&[(3, 1), (10, 4)], true), Some(1));
        assert_eq!(least_connections(&[(3, 1), (10, 4)], false), Some(0));
        // Huge counts do not overflow: like the data plane (`lb_common::rules`), counts are
        // compared clamped to u32::MAX, so these two tie and the earlier wins.
        assert_eq!(
            least_connections(&[(u64::MAX, 65535), (u64::MAX - 1, 65535)], true),
            Some(0)
        );
        let big = u32::MAX as u64;
        assert_eq!(
            least_connections(&[(big - 1, 65535), (big - 2, 65535)], true),
            Some(1)
        );
    }

    /// A simulated stream of flows: lc keeps the backends within one connection of each other.
    #[test]
    fn lc_simulation_stays_balanced() {
        let mut active = [0u64; 4];
        for _ in 0..1000 {
            let c: Vec<(u64, u32)> = active.iter().map(|a| (*a, 1)).collect();
            active[least_connections(&c, false).unwrap()] += 1;
        }
        assert_eq!(active, [250; 4]);
        // wlc with weights 1:3: active follows the weights.
        let mut active = [0u64; 2];
        for _ in 0..400 {
            let c = [(active[0], 1), (active[1], 3)];
            active[least_connections(&c, true).unwrap()] += 1;
        }
        assert_eq!(active, [100, 300]);
    }

    /// The seed's worked example: servers 1–4 with weights 1:2:2:2.
    #[test]
    fn seed_worked_example_1_2_2_2() {
        let weights = [1u32, 2, 2, 2];
        // wrr: servers 2–4 get twice as many new connections as server 1, in every cycle.
        let seq = wrr_sequence(&weights, 65537);
        let count = |s: &[usize], i| s.iter().filter(|x| **x == i).count();
        assert_eq!(seq.len(), 7);
        assert_eq!(
            (0..4).map(|i| count(&seq, i)).collect::<Vec<_>>(),
            [1, 2, 2, 2]
        );
        let ten: Vec<usize> = seq.iter().cycle().take(70).copied().collect();
        assert_eq!(
            (0..4).map(|i| count(&ten, i)).collect::<Vec<_>>(),
            [10, 20, 20, 20]
        );
        // lc: the server with the fewest connections, whatever the weights.
        let c = [(4, 1), (3, 2), (5, 2), (3, 2)];
        assert_eq!(
            least_connections(&c, false),
            Some(1),
            "fewest; ties to the earlier"
        );
        // wlc: connections in the ratio of the weights (k, 2k, 2k, 2k): the next four new
        // connections go one to each server, so the ratio holds and all four share evenly.
        for k in [1u64, 5, 1000] {
            let mut active = [k, 2 * k, 2 * k, 2 * k];
            let mut picks = Vec::new();
            for _ in 0..4 {
                let c: Vec<(u64, u32)> = active.iter().zip(weights).map(|(a, w)| (*a, w)).collect();
                let i = least_connections(&c, true).unwrap();
                picks.push(i);
                active[i] += 1;
            }
            picks.sort();
            assert_eq!(picks, [0, 1, 2, 3], "k = {k}");
            // And over a longer run the counts keep the 1:2:2:2 ratio (to within one).
            for _ in 0..700 {
                let c: Vec<(u64, u32)> = active.iter().zip(weights).map(|(a, w)| (*a, w)).collect();
                active[least_connections(&c, true).unwrap()] += 1;
            }
            let unit = active[0] as f64;
            for a in &active[1..] {
                assert!((*a as f64 - 2.0 * unit).abs() <= 2.0, "{active:?}");
            }
        }
    }

    proptest! {
        #[test]
        fn wrr_cycle_has_exact_proportions(weights in prop::collection::vec(0u32..20, 1..8)) {
            let s = wrr_sequence(&weights, 1_000_000);
            let g = weights.iter().copied().filter(|w| *w > 0).fold(0u64, |g, w| gcd(g, w as u64));
            for (i, w) in weights.iter().enumerate() {
                let n = s.iter().filter(|x| **x == i).count() as u64;
                prop_assert_eq!(n, (*w as u64).checked_div(g).unwrap_or(0));
            }
        }

        #[test]
        fn wrr_never_sends_a_whole_share_in_a_row(weights in prop::collection::vec(1u32..10, 2..6)) {
            // The "no bursts": with other backends present, a backend never gets all its
            // picks of a cycle in a row. (Across the wrap runs join, unavoidably for 2:1; and
            // nginx's algorithm is not optimal spacing: 1:1:8 gives three in a row in a cycle.)
            let s = wrr_sequence(&weights, 1_000_000);
            let total = s.len();
            for i in 0..weights.len() {
                let n = s.iter().filter(|x| **x == i).count();
                if n < 2 || n == total { continue; }
                let mut run = 0;
                for x in &s {
                    if *x == i { run += 1; prop_assert!(run < n, "{s:?}: {run} of {n} in a row"); } else { run = 0; }
                }
            }
        }
    }
}
