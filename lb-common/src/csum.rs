//! Incremental Internet checksum updates (RFC 1624, eqn. 3: `HC' = ~(~HC + ~m + m')`).
//!
//! All values are raw wire words read as native integers (`from_ne_bytes`); one's complement
//! arithmetic is byte-order independent as long as checksum and data are read the same way.

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Checksum after one 32-bit word changed from `old` to `new`.
#[inline(always)]
pub fn csum_replace4(check: u16, old: u32, new: u32) -> u16 {
    let not_old = !old;
    let sum = (!check as u32 & 0xffff)
        + (not_old >> 16)
        + (not_old & 0xffff)
        + (new >> 16)
        + (new & 0xffff);
    fold(sum)
}

/// Checksum after one 16-bit word changed from `old` to `new`.
#[inline(always)]
pub fn csum_replace2(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check as u32 & 0xffff) + (!old as u32 & 0xffff) + new as u32;
    fold(sum)
}

/// UDP over IPv4: a zero checksum means "none" and must stay zero; a computed zero is sent as
/// 0xffff (RFC 768).
#[inline(always)]
pub fn udp_csum_replace4(check: u16, old: u32, new: u32) -> u16 {
    if check == 0 {
        return 0;
    }
    match csum_replace4(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

#[inline(always)]
pub fn udp_csum_replace2(check: u16, old: u16, new: u16) -> u16 {
    if check == 0 {
        return 0;
    }
    match csum_replace2(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Full checksum over 16-bit native words, for checking the incremental versions.
    fn full(words: &[u16]) -> u16 {
        let mut sum: u32 = 0;
        for w in words {
            sum += *w as u32;
        }
        fold(sum)
    }

    #[test]
    fn replace4_matches_full_recompute() {
        let mut words = [
            0x4500u16, 0x0054, 0x1c46, 0x4000, 0x4006, 0, 0xac10, 0x0a63, 0xac10, 0x0a0c,
        ];
        let check = full(&words);
        let old = (words[8] as u32) | ((words[9] as u32) << 16);
        words[8] = 0x0a00;
        words[9] = 0x0005;
        let new = (words[8] as u32) | ((words[9] as u32) << 16);
        assert_eq!(csum_replace4(check, old, new), full(&words));
    }

    #[test]
    fn replace2_matches_full_recompute() {
        let mut words = [0x1234u16, 0xabcd, 0x0050, 0xffff];
        let check = full(&words);
        words[2] = 0x1f90;
        assert_eq!(csum_replace2(check, 0x0050, 0x1f90), full(&words));
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        assert_eq!(udp_csum_replace4(0, 0x0100000a, 0x0200000a), 0);
        assert_eq!(udp_csum_replace2(0, 80, 8080), 0);
    }

    proptest::proptest! {
        #[test]
        fn incremental_equals_recompute(words in proptest::collection::vec(proptest::num::u16::ANY, 4..32),
                                        idx in 0usize..1000, new_lo in proptest::num::u16::ANY, new_hi in proptest::num::u16::ANY) {
            let mut words = words;
            let i = idx % (words.len() - 1);
            let check = full(&words);
            let old = words[i] as u32 | ((words[i + 1] as u32) << 16);
            words[i] = new_lo;
            words[i + 1] = new_hi;
            let new = new_lo as u32 | ((new_hi as u32) << 16);
            let inc = csum_replace4(check, old, new);
            let rec = full(&words);
            // One's complement has two zeros; both verify.
            proptest::prop_assert!(inc == rec || (inc == 0xffff && rec == 0) || (inc == 0 && rec == 0xffff));
        }
    }
}
