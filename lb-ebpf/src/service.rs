//! Frontend (vip, port, proto) → policies (source ranges, ClientIP affinity) → Maglev slot →
//! backend. Shared by every hook that balances.

use aya_ebpf::maps::lpm_trie::Key;
use lb_common::{
    AffinityEntry, AffinityKey, Backend, Frontend, FrontendKey, SourceRange, backend_state,
    frontend_flags,
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

/// Does loadBalancerSourceRanges let `src_addr` in?
#[inline(always)]
pub fn source_allowed(frontend: &Frontend, src_addr: u32) -> bool {
    if frontend.flags & frontend_flags::SOURCE_RANGES == 0 {
        return true;
    }
    let key = Key::new(
        64,
        SourceRange {
            service_id_be: frontend.service_id.to_be(),
            addr: src_addr,
        },
    );
    LB_SOURCE_RANGES.get(&key).is_some()
}

/// Chooses the backend for a new flow of `frontend`: the client's backend under ClientIP
/// affinity (`client` is its address, or what stands for it), else the Maglev slot of `hash`.
#[inline(always)]
/// With `trace` (`lbctl trace`), the affinity entry is neither made nor refreshed.
pub fn pick(
    frontend: &Frontend,
    hash: u32,
    client: u32,
    now: u64,
    trace: bool,
) -> Result<Pick, NoPick> {
    if frontend.backend_count == 0 {
        return Err(NoPick::NoEndpoint);
    }
    let affinity = frontend.flags & frontend_flags::AFFINITY != 0;
    let affinity_key = AffinityKey {
        service_id: frontend.service_id,
        client,
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
        let slot = hash % frontend.maglev_size;
        backend_id = match LB_MAGLEV.get(frontend.maglev_offset + slot) {
            Some(id) if *id != 0 => *id,
            _ => return Err(NoPick::Unavailable),
        };
    }
    let backend = match LB_BACKENDS.get(backend_id) {
        Some(b) if b.state == backend_state::ACTIVE => *b,
        _ => return Err(NoPick::Unavailable),
    };
    if affinity && !trace {
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
