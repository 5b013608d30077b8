//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4), with weights, and
//! updates that move the fewest slots.
//!
//! As in the paper, each backend gets a permutation of the M slots from two hashes of its name
//! (`offset = h1 mod M`, `skip` coprime to M), and backends take turns, in name order, claiming
//! slots along it: here the first free slot at or after the permutation's next entry (a bit
//! scan), where the paper probes entries until one is free (M ln M mostly mispredicted probes
//! for a whole table). A fresh table depends only on the set of (name, weight) pairs, never on
//! input order, so every node computes the same one.
//!
//! The paper rebuilds from scratch on every change, and once M/N drops below about 1000 that
//! moves far more than the ideal 1/N of the slots (2.3/N at M=16381, N=100; 7.9/N at N=1000;
//! with the bit scan, fresh builds of neighbouring sets agree even less). [`update_table`]
//! instead starts from the table it replaces: every backend first gets its
//! exact target share (M·w/W rounded, the remainder going to backends that already hold the
//! extra slot), keeps as many of its old slots as that allows, and only slots of removed
//! backends or above-target backends are handed, by the same permutation turns, to backends
//! below target. Balance stays within one slot of the exact share, and the slots moved are the
//! minimum any balanced table can move.

use alloc::{vec, vec::Vec};

use crate::hash::hash_bytes;

const SEED_OFFSET: u64 = 0x6d61_676c_6576_3031; // "maglev01"
const SEED_SKIP: u64 = 0x6d61_676c_6576_3032; // "maglev02"

/// Table sizes the builder accepts: the primes Cilium offers and powers of two.
pub const TABLE_SIZES: [u32; 11] = [
    251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 65537, 131071,
];
pub const MIN_TABLE_SIZE: u32 = 251;
pub const MAX_TABLE_SIZE: u32 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MaglevError {
    /// M is neither prime nor a power of two, or outside 251..=2^20.
    BadTableSize(u32),
    /// Two backends share a name; the table would depend on input order.
    DuplicateBackend(usize, usize),
    /// More backends than a table slot can name (65535).
    TooManyBackends(usize),
}

impl core::fmt::Display for MaglevError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            MaglevError::BadTableSize(m) => write!(
                f,
                "maglev table size {m} must be a prime or a power of two between {MIN_TABLE_SIZE} and {MAX_TABLE_SIZE} (for example {TABLE_SIZES:?}, 1024, 16384, 65536)"
            ),
            MaglevError::DuplicateBackend(a, b) => {
                write!(f, "backends {a} and {b} have the same name")
            }
            MaglevError::TooManyBackends(n) => {
                write!(f, "{n} backends; a table holds at most 65535")
            }
        }
    }
}

fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}

pub fn validate_table_size(m: u32) -> Result<(), MaglevError> {
    if (MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&m) && (m.is_power_of_two() || is_prime(m)) {
        Ok(())
    } else {
        Err(MaglevError::BadTableSize(m))
    }
}

/// Automatic table sizes: powers of two, so a table that grows keeps every flow where it was
/// (`h mod 2M mod M = h mod M`), from 256 to 65536 slots.
pub const AUTO_MIN_SIZE: u32 = 256;
pub const AUTO_MAX_SIZE: u32 = 65536;

/// Table size for a service of `n` backends whose table has `current` slots: `current` while it
/// keeps between 50 and 800 slots a backend (so a table resizes only when its backend count
/// doubles or drops to an eighth), else the power of two nearest above 100 slots a backend.
/// 100 slots a backend keep every backend within 1% of its share (balance is ±1 slot).
pub fn auto_table_size(current: Option<u32>, n: usize) -> u32 {
    let n = n.max(1) as u64;
    if let Some(m) = current
        && m.is_power_of_two()
        && (AUTO_MIN_SIZE..=AUTO_MAX_SIZE).contains(&m)
    {
        let grow = (m as u64) < 50 * n && m < AUTO_MAX_SIZE;
        let shrink = (m as u64) > 800 * n && m > AUTO_MIN_SIZE;
        if !grow && !shrink {
            return m;
        }
    }
    (100 * n)
        .next_power_of_two()
        .clamp(AUTO_MIN_SIZE as u64, AUTO_MAX_SIZE as u64) as u32
}

/// A previous table carried over to `m` slots for [`update_table`]: unchanged when sizes match;
/// when `m` is a multiple of the old size, slot `s` inherits old slot `s mod old` (every flow
/// keeps its backend, since `h mod m mod old = h mod old`); when it is a divisor, the first `m`
/// slots are kept; otherwise nothing carries over.
pub fn resize(previous: &[u32], m: u32) -> Vec<u32> {
    let (old, m) = (previous.len(), m as usize);
    if old == 0 {
        Vec::new()
    } else if m % old == 0 {
        (0..m).map(|s| previous[s % old]).collect()
    } else if old % m == 0 {
        previous[..m].to_vec()
    } else {
        Vec::new()
    }
}

/// One backend as the table builder sees it: a stable name (e.g. "10.0.0.5:8080") and a weight
/// (0 = never picked).
#[derive(Debug, Clone, Copy)]
pub struct MaglevBackend<'a> {
    pub name: &'a [u8],
    pub weight: u32,
}

/// Builds a fresh table of `m` slots. Slot values are `index + 1` into `backends`, 0 = empty
/// (only when no backend has a weight above zero).
pub fn build_table(backends: &[MaglevBackend<'_>], m: u32) -> Result<Vec<u32>, MaglevError> {
    update_table(backends, &[], m)
}

/// The permutation of one backend: where it starts and how far it steps (coprime to `m`, so it
/// visits every slot).
fn permutation(name: &[u8], m: u32) -> (u32, u32) {
    let m64 = m as u64;
    let offset = (hash_bytes(SEED_OFFSET, name) % m64) as u32;
    let h = hash_bytes(SEED_SKIP, name);
    let skip = if m.is_power_of_two() {
        // Any odd step generates all of Z/2^k.
        ((h % (m64 / 2)) * 2 + 1) as u32
    } else {
        (h % (m64 - 1) + 1) as u32
    };
    (offset, skip)
}

/// Replaces `previous` (a table of the same size whose values are already `index + 1` into
/// `backends`, 0 where the slot's backend is gone; or empty for a fresh build) with a balanced
/// table that keeps every slot it can. See the module documentation.
pub fn update_table(
    backends: &[MaglevBackend<'_>],
    previous: &[u32],
    m: u32,
) -> Result<Vec<u32>, MaglevError> {
    validate_table_size(m)?;
    // Built as u16 (half the cache footprint of the random writes), widened at the end.
    let mut table = vec![0u16; m as usize];
    let mut order: Vec<usize> = (0..backends.len())
        .filter(|&i| backends[i].weight > 0)
        .collect();
    order.sort_by(|&a, &b| backends[a].name.cmp(backends[b].name));
    for pair in order.windows(2) {
        if backends[pair[0]].name == backends[pair[1]].name {
            return Err(MaglevError::DuplicateBackend(pair[0], pair[1]));
        }
    }
    if order.is_empty() {
        return Ok(vec![0u32; m as usize]);
    }
    if backends.len() > u16::MAX as usize {
        return Err(MaglevError::TooManyBackends(backends.len()));
    }
    // rank[i] = position of backend i in `order` + 1 (0: not in the table).
    let mut rank = vec![0u32; backends.len()];
    for (k, &i) in order.iter().enumerate() {
        rank[i] = k as u32 + 1;
    }
    let previous = if previous.len() == m as usize {
        previous
    } else {
        &[][..]
    };
    let mut held = vec![0u32; order.len()];
    for &v in previous {
        if let Some(&r) = rank.get((v as usize).wrapping_sub(1))
            && r != 0
        {
            held[r as usize - 1] += 1;
        }
    }

    // Exact targets: floor(M·w/W), the remainder to backends already holding more than that
    // (fewest moves), then to the largest fractions, then in name order.
    let total: u64 = order.iter().map(|&i| backends[i].weight as u64).sum();
    let mut target = Vec::with_capacity(order.len());
    let mut fraction = Vec::with_capacity(order.len());
    for &i in &order {
        let exact = m as u64 * backends[i].weight as u64;
        target.push((exact / total) as u32);
        fraction.push(exact % total);
    }
    let remainder = m - target.iter().sum::<u32>();
    let mut by_claim: Vec<usize> = (0..order.len()).collect();
    by_claim.sort_by(|&a, &b| {
        (held[b] > target[b])
            .cmp(&(held[a] > target[a]))
            .then(fraction[b].cmp(&fraction[a]))
            .then(a.cmp(&b))
    });
    for &k in by_claim.iter().take(remainder as usize) {
        target[k] += 1;
    }

    // Keep old slots up to each target; everything else is free (bit set). Each word's bits
    // are gathered in a register: setting them one by one in memory chains 64 dependent
    // read-modify-writes per word.
    let mut free = vec![0u64; (m as usize).div_ceil(64)];
    let mut kept = vec![0u32; order.len()];
    for (w, word) in free.iter_mut().enumerate() {
        let slots = w * 64..((w + 1) * 64).min(m as usize);
        if previous.is_empty() {
            *word = !0u64 >> (64 - slots.len());
            continue;
        }
        let mut bits = 0u64;
        for s in slots {
            let v = previous[s];
            if let Some(&r) = rank.get((v as usize).wrapping_sub(1))
                && r != 0
                && kept[r as usize - 1] < target[r as usize - 1]
            {
                kept[r as usize - 1] += 1;
                table[s] = v as u16;
            } else {
                bits |= 1 << (s % 64);
            }
        }
        *word = bits;
    }

    // Backends below target take turns, each taking the first free slot at or after the next
    // entry of its permutation. The paper probes entries until it meets a free slot, which
    // costs M ln M mispredicted probes for a whole table and M/free probes a slot for an
    // update that frees few slots; a bit scan finds the same region's free slot at once.
    // Second level: bit w of summary[w / 64] is set while free[w] has a free slot, so the scan
    // skips full regions 4096 slots at a time (late in a build free slots are rare and cluster).
    let words = free.len();
    let mut summary = vec![0u64; words.div_ceil(64)];
    for (w, bits) in free.iter().enumerate() {
        if *bits != 0 {
            summary[w / 64] |= 1 << (w % 64);
        }
    }
    let next_free = |free: &[u64], summary: &[u64], start: usize| -> usize {
        let w = start / 64;
        let bits = free[w] & (!0u64 << (start % 64));
        if bits != 0 {
            return w * 64 + bits.trailing_zeros() as usize;
        }
        // The next word with a free slot after w, wrapping around once at most.
        let mut sw = (w + 1) / 64;
        let mut sbits = if w + 1 < words {
            summary[sw] & (!0u64 << ((w + 1) % 64))
        } else {
            sw = 0;
            summary[0]
        };
        while sbits == 0 {
            sw = if sw + 1 == summary.len() { 0 } else { sw + 1 };
            sbits = summary[sw];
        }
        let w = sw * 64 + sbits.trailing_zeros() as usize;
        w * 64 + free[w].trailing_zeros() as usize
    };
    let mut claimers: Vec<(usize, u32, u32)> = (0..order.len())
        .filter(|&k| kept[k] < target[k])
        .map(|k| {
            let (offset, skip) = permutation(backends[order[k]].name, m);
            (k, offset, skip)
        })
        .collect();
    // Rounds of turns, in order; a backend that reached its target leaves (kept in order, as
    // `retain` would, but in a plain loop the compiler keeps the tables in registers).
    let mut live = claimers.len();
    while live > 0 {
        let mut next = 0;
        for i in 0..live {
            let (k, mut position, skip) = claimers[i];
            let start = position as usize;
            // position < m and skip < m, so one subtraction replaces the (slow) modulo.
            position += skip;
            if position >= m {
                position -= m;
            }
            // A free slot exists while any backend is below target.
            let s = next_free(&free, &summary, start);
            let w = s / 64;
            free[w] &= !(1 << (s % 64));
            if free[w] == 0 {
                summary[w / 64] &= !(1 << (w % 64));
            }
            table[s] = order[k] as u16 + 1;
            kept[k] += 1;
            if kept[k] < target[k] {
                claimers[next] = (k, position, skip);
                next += 1;
            }
        }
        live = next;
    }
    Ok(table.into_iter().map(u32::from).collect())
}

/// How many slots of `new` point to a different backend than in `old` (same length, values
/// already mapped to comparable backend ids).
pub fn slots_moved(old: &[u32], new: &[u32]) -> usize {
    old.iter().zip(new).filter(|(a, b)| a != b).count()
}

#[cfg(test)]
mod tests {
    use alloc::{format, string::String};

    use super::*;

    fn names(n: usize, salt: &str) -> Vec<String> {
        (0..n)
            .map(|i| {
                format!(
                    "10.{}.{}.{}:8080{salt}",
                    i / 65536 % 256,
                    i / 256 % 256,
                    i % 256
                )
            })
            .collect()
    }

    fn backends(names: &[String]) -> Vec<MaglevBackend<'_>> {
        names
            .iter()
            .map(|n| MaglevBackend {
                name: n.as_bytes(),
                weight: 1,
            })
            .collect()
    }

    fn shares(table: &[u32], n: usize) -> Vec<usize> {
        let mut count = vec![0usize; n];
        for &s in table {
            count[s as usize - 1] += 1;
        }
        count
    }

    /// The table with slot values mapped to backend names, so tables built from different
    /// backend lists can be compared.
    fn by_name<'a>(table: &[u32], names: &'a [String]) -> Vec<&'a str> {
        table
            .iter()
            .map(|&s| names[s as usize - 1].as_str())
            .collect()
    }

    #[test]
    fn rejects_non_prime_or_out_of_range_sizes() {
        for m in [0, 1, 250, 16380, 65535, 1 << 21, 2_000_003] {
            assert_eq!(
                validate_table_size(m),
                Err(MaglevError::BadTableSize(m)),
                "{m}"
            );
        }
        for m in TABLE_SIZES.into_iter().chain([256, 1024, 65536, 1 << 20]) {
            assert_eq!(validate_table_size(m), Ok(()));
        }
    }

    #[test]
    fn empty_backend_set_gives_empty_table() {
        let t = build_table(&[], 251).unwrap();
        assert!(t.iter().all(|&s| s == 0));
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let b = [
            MaglevBackend {
                name: b"a",
                weight: 1,
            },
            MaglevBackend {
                name: b"a",
                weight: 1,
            },
        ];
        assert!(matches!(
            build_table(&b, 251),
            Err(MaglevError::DuplicateBackend(_, _))
        ));
    }

    #[test]
    fn weights_change_shares_proportionally() {
        let n = names(3, "");
        let b = [
            MaglevBackend {
                name: n[0].as_bytes(),
                weight: 1,
            },
            MaglevBackend {
                name: n[1].as_bytes(),
                weight: 2,
            },
            MaglevBackend {
                name: n[2].as_bytes(),
                weight: 0,
            },
        ];
        let t = build_table(&b, 16381).unwrap();
        let s = shares(&t, 3);
        assert_eq!(s[2], 0, "weight 0 gets no slot");
        let ratio = s[1] as f64 / s[0] as f64;
        assert!((ratio - 2.0).abs() < 0.01, "shares {s:?}");
    }

    /// `from` (a table over `old` names) expressed as indices + 1 into `new`, as the agent
    /// hands a previous table to [`update_table`].
    fn carry(from: &[u32], old: &[String], new: &[String]) -> Vec<u32> {
        from.iter()
            .map(|&v| {
                new.iter()
                    .position(|n| *n == old[v as usize - 1])
                    .map_or(0, |i| i as u32 + 1)
            })
            .collect()
    }

    fn moved_by_name(a: &[u32], a_names: &[String], b: &[u32], b_names: &[String]) -> usize {
        by_name(a, a_names)
            .iter()
            .zip(by_name(b, b_names))
            .filter(|(x, y)| **x != *y)
            .count()
    }

    /// Slots moved as a multiple of the ideal when one of `n` backends is removed (worst of the
    /// first, middle and last by name; ideal 1/N) or one is added (ideal 1/(N+1)), with a fresh
    /// build (`incremental` false) or [`update_table`] from the previous table.
    fn disruption(m: u32, n: usize, incremental: bool) -> (f64, f64) {
        let all = names(n, "");
        let full = build_table(&backends(&all), m).unwrap();
        let rebuild = |list: &[String]| {
            let previous = if incremental {
                carry(&full, &all, list)
            } else {
                Vec::new()
            };
            update_table(&backends(list), &previous, m).unwrap()
        };
        let mut worst_remove = 0.0f64;
        for removed in [0, n / 2, n - 1] {
            let mut rest = all.clone();
            rest.remove(removed);
            let smaller = rebuild(&rest);
            let moved = moved_by_name(&full, &all, &smaller, &rest);
            worst_remove = worst_remove.max(moved as f64 / m as f64 * n as f64);
        }
        let mut more = all.clone();
        more.push("10.255.255.254:8080".into());
        let larger = rebuild(&more);
        let moved = moved_by_name(&full, &all, &larger, &more);
        (worst_remove, moved as f64 / m as f64 * (n + 1) as f64)
    }

    /// The incremental update moves at most one slot more than the removed backend held (or the
    /// joining backend takes) at every M/N, where a rebuild from scratch moves several times that.
    #[test]
    fn incremental_update_moves_only_what_it_must() {
        for (m, n) in [
            (251u32, 10usize),
            (16381, 10),
            (16381, 100),
            (16381, 1000),
            (65537, 1000),
            (65536, 1000),
            (1024, 10),
        ] {
            let (remove, add) = disruption(m, n, true);
            let (fresh_remove, _) = disruption(m, n, false);
            std::println!(
                "maglev M={m} N={n}: remove 1 moves {remove:.4}/N (fresh rebuild {fresh_remove:.4}/N), add 1 moves {add:.4}/(N+1)"
            );
            // One slot of rounding either way.
            let slack = 1.0 + n as f64 / m as f64;
            assert!(
                remove <= slack + 1e-9,
                "M={m} N={n}: removal moved {remove}/N"
            );
            assert!(
                add <= slack + 1e-9,
                "M={m} N={n}: addition moved {add}/(N+1)"
            );
            assert!(fresh_remove > 1.2 * remove, "a fresh rebuild moves more");
        }
    }

    #[test]
    fn auto_size_has_hysteresis_and_growth_moves_nothing() {
        assert_eq!(auto_table_size(None, 1), 256);
        assert_eq!(auto_table_size(None, 10), 1024);
        assert_eq!(auto_table_size(None, 100), 16384);
        assert_eq!(auto_table_size(None, 5000), 65536);
        // 1024 holds from 2 to 20 backends.
        assert_eq!(auto_table_size(Some(1024), 2), 1024);
        assert_eq!(auto_table_size(Some(1024), 20), 1024);
        assert_eq!(auto_table_size(Some(1024), 21), 4096);
        assert_eq!(auto_table_size(Some(1024), 1), 256);
        // A fixed prime from an earlier run is replaced.
        assert_eq!(auto_table_size(Some(16381), 10), 1024);

        // Growing 1024 → 4096 with 20 → 21 backends: only the new backend's share moves.
        let all = names(21, "");
        let before = build_table(&backends(&all[..20]), 1024).unwrap();
        let carried = resize(&carry(&before, &all[..20], &all), 4096);
        let after = update_table(&backends(&all), &carried, 4096).unwrap();
        let moved = (0..4096)
            .filter(|&s| all[after[s] as usize - 1] != all[..20][before[s % 1024] as usize - 1])
            .count();
        assert!(moved <= 4096 / 21 + 1, "moved {moved}");
    }

    #[test]
    fn unchanged_backends_keep_the_table_and_fresh_equals_empty_previous() {
        let all = names(37, "x");
        let t = build_table(&backends(&all), 4093).unwrap();
        assert_eq!(update_table(&backends(&all), &t, 4093).unwrap(), t);
        // A previous table of another size is ignored: the result is the fresh build.
        assert_eq!(update_table(&backends(&all), &t[..251], 4093).unwrap(), t);
    }

    extern crate std;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        #[test]
        fn every_slot_filled_and_balanced(n in 1usize..60, salt in "[a-z]{0,4}", m_idx in 0usize..7) {
            let m = [251, 509, 1021, 2039, 4093, 256, 2048][m_idx];
            let all = names(n, &salt);
            let t = build_table(&backends(&all), m).unwrap();
            proptest::prop_assert!(t.iter().all(|&s| s >= 1 && s as usize <= n));
            let s = shares(&t, n);
            let (min, max) = (*s.iter().min().unwrap(), *s.iter().max().unwrap());
            proptest::prop_assert!(max - min <= 1, "shares differ by {}", max - min);
        }

        /// A chain of random removals and additions keeps every table full and within one slot
        /// of balance, and each step moves no more than the backends that changed force.
        #[test]
        fn updates_stay_balanced(start in 2usize..40, steps in proptest::collection::vec((0usize..64, proptest::bool::ANY), 1..12)) {
            let m = 1021;
            let mut list = names(start, "");
            let mut table = build_table(&backends(&list), m).unwrap();
            let mut next = start;
            for (pick, add) in steps {
                let mut changed = list.clone();
                if add || changed.len() == 1 {
                    changed.push(names(next + 1, "")[next].clone());
                    next += 1;
                } else {
                    changed.remove(pick % changed.len());
                }
                let updated = update_table(&backends(&changed), &carry(&table, &list, &changed), m).unwrap();
                proptest::prop_assert!(updated.iter().all(|&s| s >= 1 && s as usize <= changed.len()));
                let s = shares(&updated, changed.len());
                let (min, max) = (*s.iter().min().unwrap(), *s.iter().max().unwrap());
                proptest::prop_assert!(max - min <= 1, "shares differ by {}", max - min);
                let moved = moved_by_name(&table, &list, &updated, &changed);
                let bound = (m as usize).div_ceil(list.len().min(changed.len())) + 1;
                proptest::prop_assert!(moved <= bound, "moved {moved} > {bound}");
                list = changed;
                table = updated;
            }
        }

        #[test]
        fn order_does_not_matter(n in 2usize..40, rot in 0usize..40) {
            let all = names(n, "");
            let mut rotated = all.clone();
            rotated.rotate_left(rot % n);
            let a = build_table(&backends(&all), 1021).unwrap();
            let b = build_table(&backends(&rotated), 1021).unwrap();
            proptest::prop_assert_eq!(by_name(&a, &all), by_name(&b, &rotated));
        }
    }
}
