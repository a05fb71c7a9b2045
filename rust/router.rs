//! Affinity policy: which 1-based cores a weight may run on, and the least-loaded choice.
//!
//! Core numbers are 1-based "virtual" cores; the runtime maps virtual core `i` onto
//! `allowed_cpus[(i - 1) % allowed_cpus.len()]`.
//!
//! - heavy  → cores 1..=N, preferring 1 (ties go to the lowest core)
//! - medium → cores 2..=N, never core 1
//! - light  → cores 3..=N, never cores 1–2
//!
//! With two cores: heavy [1, 2], medium [2], light [2]. With one core everything runs on core 1.

use std::ops::RangeInclusive;

#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Weight {
    Heavy = 0,
    Medium = 1,
    Light = 2,
}

impl Weight {
    pub const ALL: [Weight; 3] = [Weight::Heavy, Weight::Medium, Weight::Light];

    pub fn from_index(i: u8) -> Option<Weight> {
        Weight::ALL.get(i as usize).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            Weight::Heavy => "heavy",
            Weight::Medium => "medium",
            Weight::Light => "light",
        }
    }
}

/// Priority lanes inside the pool and each mailbox; FIFO within a lane.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    High = 0,
    Normal = 1,
    Low = 2,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    pub fn from_index(i: u8) -> Option<Priority> {
        Priority::ALL.get(i as usize).copied()
    }
}

/// The 1-based cores `weight` may run on when routing over `n` cores (`n >= 1`).
pub fn allowed_cores(weight: Weight, n: usize) -> RangeInclusive<usize> {
    assert!(n >= 1, "at least one core");
    let first = match weight {
        Weight::Heavy => 1,
        Weight::Medium => 2,
        Weight::Light => 3,
    };
    // Fewer cores than the weight's first core: it shares the highest core there is.
    first.min(n)..=n
}

/// Whether 1-based `core` may run tokens of `weight` with `n` cores.
pub fn core_allows(core: usize, weight: Weight, n: usize) -> bool {
    allowed_cores(weight, n).contains(&core)
}

/// The weights 1-based `core` accepts, indexed by `Weight as usize`.
pub fn weights_for_core(core: usize, n: usize) -> [bool; 3] {
    Weight::ALL.map(|w| core_allows(core, w, n))
}

/// Least-loaded allowed core for `weight`; ties go to the lowest core number (so an idle
/// machine runs heavy work on core 1). `load(core)` takes a 1-based core.
pub fn pick_core(weight: Weight, n: usize, mut load: impl FnMut(usize) -> usize) -> usize {
    let mut best = 0;
    let mut best_load = usize::MAX;
    for core in allowed_cores(weight, n) {
        let l = load(core);
        if l < best_load {
            best = core;
            best_load = l;
            if l == 0 {
                break;
            }
        }
    }
    best
}

/// Least-loaded index among `loads` whose value is below `cap`; ties go to the lowest index.
pub fn pick_least_loaded(loads: impl Iterator<Item = usize>, cap: usize) -> Option<usize> {
    let mut best = None;
    let mut best_load = usize::MAX;
    for (i, l) in loads.enumerate() {
        if l < cap && l < best_load {
            best = Some(i);
            best_load = l;
            if l == 0 {
                break;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cores(w: Weight, n: usize) -> Vec<usize> {
        allowed_cores(w, n).collect()
    }

    #[test]
    fn seed_rules() {
        assert_eq!(cores(Weight::Heavy, 1), vec![1]);
        assert_eq!(cores(Weight::Medium, 1), vec![1]);
        assert_eq!(cores(Weight::Light, 1), vec![1]);
        assert_eq!(cores(Weight::Heavy, 2), vec![1, 2]);
        assert_eq!(cores(Weight::Medium, 2), vec![2]);
        assert_eq!(cores(Weight::Light, 2), vec![2]);
        assert_eq!(cores(Weight::Heavy, 3), vec![1, 2, 3]);
        assert_eq!(cores(Weight::Medium, 3), vec![2, 3]);
        assert_eq!(cores(Weight::Light, 3), vec![3]);
        assert_eq!(cores(Weight::Heavy, 8), (1..=8).collect::<Vec<_>>());
        assert_eq!(cores(Weight::Medium, 8), (2..=8).collect::<Vec<_>>());
        assert_eq!(cores(Weight::Light, 8), (3..=8).collect::<Vec<_>>());
    }

    #[test]
    fn heavy_prefers_core_one_when_idle() {
        assert_eq!(pick_core(Weight::Heavy, 8, |_| 0), 1);
        assert_eq!(
            pick_core(Weight::Heavy, 8, |c| if c == 1 { 3 } else { 1 }),
            2
        );
    }

    #[test]
    fn least_loaded_core_wins() {
        let loads = [0, 5, 2, 1, 7];
        assert_eq!(pick_core(Weight::Medium, 4, |c| loads[c]), 3);
        assert_eq!(pick_core(Weight::Light, 4, |c| loads[c]), 3);
    }

    #[test]
    fn least_loaded_worker_respects_capacity() {
        assert_eq!(pick_least_loaded([3, 1, 1].into_iter(), 4), Some(1));
        assert_eq!(pick_least_loaded([4, 4].into_iter(), 4), None);
        assert_eq!(pick_least_loaded([4, 2].into_iter(), 4), Some(1));
    }

    proptest! {
        #[test]
        fn pick_core_is_allowed_and_minimal(n in 1usize..16, w in 0u8..3, loads in prop::collection::vec(0usize..50, 16)) {
            let w = Weight::from_index(w).unwrap();
            let c = pick_core(w, n, |c| loads[c - 1]);
            prop_assert!(core_allows(c, w, n));
            for other in allowed_cores(w, n) {
                prop_assert!(loads[c - 1] <= loads[other - 1]);
                if loads[other - 1] == loads[c - 1] { prop_assert!(c <= other); }
            }
            // Core 1 never takes medium or light work unless it is the only core.
            if n >= 2 && w != Weight::Heavy { prop_assert!(c >= 2); }
            if n >= 3 && w == Weight::Light { prop_assert!(c >= 3); }
        }

        #[test]
        fn weights_for_core_agrees_with_allowed(n in 1usize..16, core_off in 0usize..16) {
            let core = core_off % n + 1;
            let ws = weights_for_core(core, n);
            for w in Weight::ALL {
                prop_assert_eq!(ws[w as usize], allowed_cores(w, n).contains(&core));
            }
            // every core accepts heavy work
            prop_assert!(ws[Weight::Heavy as usize]);
        }
    }
}
