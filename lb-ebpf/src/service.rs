//! Frontend (vip, port, proto) → policies (source ranges, ClientIP affinity) → Maglev slot →
//! backend. Shared by every hook that balances.

use aya_ebpf::maps::lpm_trie::Key;
use lb_common::{
    AffinityEntry, AffinityKey, Backend, Frontend, FrontendKey, SourceRange, backend_state,
    frontend_flags, hash::flow_hash,
};

use crate::maps::{LB_AFFINITY, LB_BACKENDS, LB_FRONTENDS, LB_MAGLEV, LB_SOURCE_RANGES};

/// The backend chosen for a new flow.
pub struct Pick {
    pub backend_id: u32,
    pub backend: Backend,
    pub frontend_id: u32,
}

/// Why no backend was chosen.
pub enum NoPick {
    /// Not a frontend: the packet is not ours.
    NotService,
    /// loadBalancerSourceRanges keeps this client out.
    SourceDenied,
    /// The service has no usable endpoint.
    NoEndpoint,
    /// Tables in flux (an empty slot, a backend just removed): leave the packet to the kernel.
    Unavailable,
}

#[inline(always)]
pub fn frontend(addr: u32, port: u16, proto: u8) -> Option<Frontend> {
    let key = FrontendKey {
        addr,
        port,
        proto,
        _pad: 0,
    };
    unsafe { LB_FRONTENDS.get(&key) }.copied()
}

/// Chooses the backend for a new flow `src:sport → dst:dport/proto` of frontend `frontend`.
#[inline(always)]
pub fn pick(
    frontend: &Frontend,
    (src_addr, src_port): (u32, u16),
    (dst_addr, dst_port): (u32, u16),
    proto: u8,
    now: u64,
) -> Result<Pick, NoPick> {
    if frontend.flags & frontend_flags::SOURCE_RANGES != 0 {
        let key = Key::new(
            64,
            SourceRange {
                service_id_be: frontend.service_id.to_be(),
                addr: src_addr,
            },
        );
        if LB_SOURCE_RANGES.get(&key).is_none() {
            return Err(NoPick::SourceDenied);
        }
    }
    if frontend.backend_count == 0 {
        return Err(NoPick::NoEndpoint);
    }
    let affinity = frontend.flags & frontend_flags::AFFINITY != 0;
    let affinity_key = AffinityKey {
        service_id: frontend.service_id,
        client: src_addr,
    };
    let mut backend_id = 0;
    if affinity {
        if let Some(a) = unsafe { LB_AFFINITY.get(&affinity_key) } {
            let timeout_ns = frontend.affinity_timeout_s as u64 * 1_000_000_000;
            if now.wrapping_sub(a.last_seen_ns) < timeout_ns && backend_is_active(a.backend_id) {
                backend_id = a.backend_id;
            }
        }
    }
    if backend_id == 0 {
        if frontend.maglev_size == 0 {
            return Err(NoPick::Unavailable);
        }
        let slot = flow_hash(src_addr, dst_addr, src_port, dst_port, proto) % frontend.maglev_size;
        backend_id = match LB_MAGLEV.get(frontend.maglev_offset + slot) {
            Some(id) if *id != 0 => *id,
            _ => return Err(NoPick::Unavailable),
        };
    }
    let backend = match LB_BACKENDS.get(backend_id) {
        Some(b) if b.state == backend_state::ACTIVE => *b,
        _ => return Err(NoPick::Unavailable),
    };
    if affinity {
        let entry = AffinityEntry {
            backend_id,
            _pad: 0,
            last_seen_ns: now,
        };
        let _ = LB_AFFINITY.insert(&affinity_key, &entry, 0);
    }
    Ok(Pick {
        backend_id,
        backend,
        frontend_id: frontend.frontend_id,
    })
}

#[inline(always)]
fn backend_is_active(id: u32) -> bool {
    matches!(LB_BACKENDS.get(id), Some(b) if b.state == backend_state::ACTIVE)
}

/// Is backend `id` still configured, active, and the same address (ids are reused)?
#[inline(always)]
pub fn backend_is(id: u32, addr: u32, port: u16) -> bool {
    match LB_BACKENDS.get(id) {
        Some(b) => b.state == backend_state::ACTIVE && b.addr == addr && b.port == port,
        None => false,
    }
}
