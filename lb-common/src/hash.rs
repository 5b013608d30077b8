//! Hashes shared by the datapath and the agent: the per-packet flow hash that picks a Maglev
//! slot, and the backend-name hashes that place backends in the Maglev table.

const FLOW_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// MurmurHash3's 64-bit finaliser: cheap, and every input bit reaches every output bit.
#[inline(always)]
pub const fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// Hash of a flow's 5-tuple (values as on the wire).
#[inline(always)]
pub const fn flow_hash(
    src_addr: u32,
    dst_addr: u32,
    src_port: u16,
    dst_port: u16,
    proto: u8,
) -> u32 {
    let addrs = ((src_addr as u64) << 32) | dst_addr as u64;
    let rest = ((src_port as u64) << 32) | ((dst_port as u64) << 16) | proto as u64;
    let h = fmix64(addrs ^ fmix64(rest ^ FLOW_SEED));
    (h ^ (h >> 32)) as u32
}

/// Seeded 64-bit hash of a byte string (FNV-1a, then the Murmur finaliser for avalanche).
pub const fn hash_bytes(seed: u64, bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    fmix64(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_hash_depends_on_every_field() {
        let base = flow_hash(1, 2, 3, 4, 6);
        assert_ne!(base, flow_hash(9, 2, 3, 4, 6));
        assert_ne!(base, flow_hash(1, 9, 3, 4, 6));
        assert_ne!(base, flow_hash(1, 2, 9, 4, 6));
        assert_ne!(base, flow_hash(1, 2, 3, 9, 6));
        assert_ne!(base, flow_hash(1, 2, 3, 4, 17));
    }

    #[test]
    fn hash_bytes_is_seeded() {
        assert_ne!(hash_bytes(1, b"10.0.0.1:80"), hash_bytes(2, b"10.0.0.1:80"));
        assert_eq!(hash_bytes(1, b"10.0.0.1:80"), hash_bytes(1, b"10.0.0.1:80"));
    }
}
