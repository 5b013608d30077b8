//! What the packet paths need from a hook, for XDP frames and tc skbs alike: bounds-checked
//! access, an address + port rewrite with correct checksums, and the ways out.
//!
//! The one real difference is the L4 checksum. An XDP frame carries the checksum the sender put
//! on the wire, so an incremental update (RFC 1624) is exact. An skb may carry a partial checksum
//! (CHECKSUM_PARTIAL: the sender's TX offload left only the pseudo-header sum, to be finished
//! later over the payload), which an incremental update of the full sum corrupts; tc uses the
//! kernel's bpf_l4_csum_replace, which knows the skb's checksum state and updates either form.

use core::mem::size_of;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_CSUM_LEVEL_RESET, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT,
        bpf_fib_lookup, xdp_action,
    },
    helpers::{
        bpf_csum_level, bpf_fib_lookup as fib_lookup, bpf_l3_csum_replace, bpf_l4_csum_replace,
        bpf_redirect, bpf_redirect_neigh, bpf_skb_adjust_room, bpf_skb_change_tail,
        bpf_skb_load_bytes, bpf_skb_pull_data, bpf_skb_store_bytes, bpf_xdp_adjust_head,
        bpf_xdp_adjust_tail, bpf_xdp_load_bytes,
    },
    programs::{TcContext, XdpContext},
};
use lb_common::{DSR_OPTION_LEN, IPPROTO_UDP, csum};
use network_types::eth::EthHdr;

use crate::{maps::LB_XDP_TARGETS, parse::Flow};

/// bpf_skb_adjust_room's BPF_ADJ_ROOM_NET: room right after the fixed L3 header.
const BPF_ADJ_ROOM_NET: u32 = 0;

/// A packet at one hook.
pub trait Packet: EbpfContext {
    /// Verdicts: hand to the kernel, drop.
    const PASS: u32;
    const DROP: u32;
    /// XDP runs before tc on the same interface and gives it whatever it cannot finish.
    const IS_XDP: bool;

    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Length of the whole packet (an skb may hold more than its linear part).
    fn len(&self) -> u64;
    /// The interface the packet arrived on.
    fn ifindex(&self) -> u32;

    /// Makes at least `len` bytes (or the whole packet, if shorter) directly accessible.
    /// Invalidates earlier pointers.
    fn pull(&self, len: usize);

    /// Replaces the destination (`dst`) or source address and port of `flow`, updating the IPv4
    /// header checksum and the L4 checksum (a UDP checksum of zero stays zero). Invalidates
    /// earlier pointers.
    fn rewrite(&self, flow: &Flow, dst: bool, addr: u32, port: u16) -> Result<(), ()>;

    /// Replaces the destination (`dst`) or source port alone, updating the L4 checksum.
    /// Invalidates earlier pointers.
    fn rewrite_port(&self, flow: &Flow, dst: bool, old: u16, new: u16) -> Result<(), ()>;

    /// Sends the packet out of `ifindex` (the arrival interface included).
    fn send(&self, ifindex: u32) -> u32;

    /// Can [`Packet::send`] deliver to `ifindex`? XDP frames only reach interfaces that take
    /// them (a veth whose peer has no NAPI drops them); an skb goes anywhere.
    fn can_send(&self, ifindex: u32) -> bool;

    /// The IPv4 length of the largest packet this one leaves as: itself, or (tc) the largest
    /// segment of a GSO packet.
    fn largest_segment(&self, flow: &Flow) -> u32;

    /// Sends the packet out of `ifindex` to a next hop the kernel has yet to resolve (tc:
    /// bpf_redirect_neigh fills in the MACs, resolving the neighbour if needed). A packet the
    /// node SNATed to its own address cannot go back through the kernel's forwarding: that
    /// sees its own address as source and drops it as a martian. XDP: never called (it leaves
    /// such packets to tc).
    fn send_resolving(&self, ifindex: u32) -> u32;

    /// Sets the packet to `len` bytes (trims or extends the tail). Invalidates earlier pointers.
    fn resize(&self, len: usize) -> Result<(), ()>;

    /// Opens [`DSR_OPTION_LEN`] bytes right after a 20-byte IPv4 header (Ethernet and IPv4
    /// headers move toward the front; the L4 header stays where it is in memory, so a partial
    /// checksum's offsets stay right). The header fields are the caller's to fix. Invalidates
    /// earlier pointers.
    fn open_after_ip_header(&self) -> Result<(), ()>;

    /// Removes the [`DSR_OPTION_LEN`] bytes right after a 20-byte IPv4 header (the reverse of
    /// [`Packet::open_after_ip_header`]). Invalidates earlier pointers.
    fn close_after_ip_header(&self) -> Result<(), ()>;

    /// After the program wrote a complete L4 checksum itself: make sure nothing finishes it again.
    fn checksum_complete(&self);

    /// Is this `lbctl trace`'s frame ([`lb_common::TRACE_MAGIC`])? Then nothing is written.
    fn tracing(&self) -> bool;

    /// Copies `len` (1..=`N`) bytes at `offset` into `buf` with a helper: unlike a direct
    /// read, it teaches the verifier nothing about the packet's length, so a variable-length
    /// read does not split every later path in as many states.
    fn load_bytes<const N: usize>(
        &self,
        offset: usize,
        buf: &mut [u8; N],
        len: usize,
    ) -> Result<(), ()>;

    fn fib(&self, params: &mut bpf_fib_lookup) -> i64 {
        unsafe { fib_lookup(self.as_ptr(), params, size_of::<bpf_fib_lookup>() as i32, 0) }
    }
}

/// A pointer to a `T` at `offset`, if the packet's directly accessible part holds it.
#[inline(always)]
pub fn ptr_at<P: Packet, T>(ctx: &P, offset: usize) -> Result<*mut T, ()> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return Err(());
    }
    Ok((start + offset) as *mut T)
}

/// Offsets of the fields a rewrite touches: (address, port, L4 checksum, old address, old port).
#[inline(always)]
fn fields(flow: &Flow, dst: bool) -> (usize, usize, usize, u32, u16) {
    let check = flow.l4 + if flow.proto == IPPROTO_UDP { 6 } else { 16 };
    if dst {
        (
            flow.l3 + 16,
            flow.l4 + 2,
            check,
            flow.dst_addr,
            flow.dst_port,
        )
    } else {
        (flow.l3 + 12, flow.l4, check, flow.src_addr, flow.src_port)
    }
}

impl Packet for XdpContext {
    const PASS: u32 = xdp_action::XDP_PASS;
    const DROP: u32 = xdp_action::XDP_DROP;
    const IS_XDP: bool = true;

    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> u64 {
        (XdpContext::data_end(self) - XdpContext::data(self)) as u64
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ingress_ifindex() as u32
    }
    #[inline(always)]
    fn pull(&self, _len: usize) {}

    #[inline(always)]
    fn rewrite(&self, flow: &Flow, dst: bool, addr: u32, port: u16) -> Result<(), ()> {
        let (addr_off, port_off, check_off, old_addr, old_port) = fields(flow, dst);
        if flow.later_fragment {
            let addr_field: *mut [u8; 4] = ptr_at(self, addr_off)?;
            let ip_check: *mut [u8; 2] = ptr_at(self, flow.l3 + 10)?;
            unsafe {
                *addr_field = addr.to_ne_bytes();
                let sum = u16::from_ne_bytes(*ip_check);
                *ip_check = csum::csum_replace4(sum, old_addr, addr).to_ne_bytes();
            }
            return Ok(());
        }
        let addr_field: *mut [u8; 4] = ptr_at(self, addr_off)?;
        let port_field: *mut [u8; 2] = ptr_at(self, port_off)?;
        let check_field: *mut [u8; 2] = ptr_at(self, check_off)?;
        let ip_check: *mut [u8; 2] = ptr_at(self, flow.l3 + 10)?;
        unsafe {
            *addr_field = addr.to_ne_bytes();
            *port_field = port.to_ne_bytes();
            let sum = u16::from_ne_bytes(*ip_check);
            *ip_check = csum::csum_replace4(sum, old_addr, addr).to_ne_bytes();
            let sum = u16::from_ne_bytes(*check_field);
            let sum = if flow.proto == IPPROTO_UDP {
                csum::udp_csum_replace2(
                    csum::udp_csum_replace4(sum, old_addr, addr),
                    old_port,
                    port,
                )
            } else {
                csum::csum_replace2(csum::csum_replace4(sum, old_addr, addr), old_port, port)
            };
            *check_field = sum.to_ne_bytes();
        }
        Ok(())
    }

    #[inline(always)]
    fn rewrite_port(&self, flow: &Flow, dst: bool, old: u16, new: u16) -> Result<(), ()> {
        if flow.later_fragment {
            return Ok(());
        }
        let (_, port_off, check_off, _, _) = fields(flow, dst);
        let port_field: *mut [u8; 2] = ptr_at(self, port_off)?;
        let check_field: *mut [u8; 2] = ptr_at(self, check_off)?;
        unsafe {
            *port_field = new.to_ne_bytes();
            let sum = u16::from_ne_bytes(*check_field);
            let sum = if flow.proto == IPPROTO_UDP {
                csum::udp_csum_replace2(sum, old, new)
            } else {
                csum::csum_replace2(sum, old, new)
            };
            *check_field = sum.to_ne_bytes();
        }
        Ok(())
    }

    #[inline(always)]
    fn send(&self, ifindex: u32) -> u32 {
        if ifindex == self.ingress_ifindex() as u32 {
            xdp_action::XDP_TX
        } else {
            unsafe { bpf_redirect(ifindex, 0) as u32 }
        }
    }

    #[inline(always)]
    fn can_send(&self, ifindex: u32) -> bool {
        LB_XDP_TARGETS.get(ifindex).is_some()
    }

    #[inline(always)]
    fn send_resolving(&self, _ifindex: u32) -> u32 {
        xdp_action::XDP_PASS
    }

    #[inline(always)]
    fn largest_segment(&self, flow: &Flow) -> u32 {
        (self.len() as usize - flow.l3) as u32
    }

    #[inline(always)]
    fn resize(&self, len: usize) -> Result<(), ()> {
        let delta = len as i32 - self.len() as i32;
        if delta != 0 && unsafe { bpf_xdp_adjust_tail(self.as_ptr() as *mut _, delta) } != 0 {
            return Err(());
        }
        Ok(())
    }

    #[inline(always)]
    fn checksum_complete(&self) {}

    #[inline(always)]
    fn tracing(&self) -> bool {
        let meta = unsafe { (*self.ctx).data_meta } as usize;
        if meta + 16 > self.data() {
            return false;
        }
        let words = meta as *const [u32; 4];
        unsafe { *words == lb_common::TRACE_MAGIC }
    }

    #[inline(always)]
    fn load_bytes<const N: usize>(
        &self,
        offset: usize,
        buf: &mut [u8; N],
        len: usize,
    ) -> Result<(), ()> {
        if len == 0 || len > N {
            return Err(());
        }
        let r = unsafe {
            bpf_xdp_load_bytes(self.ctx, offset as u32, buf.as_mut_ptr().cast(), len as u32)
        };
        if r == 0 { Ok(()) } else { Err(()) }
    }

    #[inline(always)]
    fn open_after_ip_header(&self) -> Result<(), ()> {
        const HEAD: usize = EthHdr::LEN + 20;
        if unsafe { bpf_xdp_adjust_head(self.as_ptr() as *mut _, -(DSR_OPTION_LEN as i32)) } != 0 {
            return Err(());
        }
        let p: *mut [u8; DSR_OPTION_LEN + HEAD] = ptr_at(self, 0)?;
        unsafe {
            let head: [u8; HEAD] = *((*p).as_ptr().add(DSR_OPTION_LEN) as *const [u8; HEAD]);
            *((*p).as_mut_ptr() as *mut [u8; HEAD]) = head;
        }
        Ok(())
    }

    #[inline(always)]
    fn close_after_ip_header(&self) -> Result<(), ()> {
        const HEAD: usize = EthHdr::LEN + 20;
        let p: *mut [u8; DSR_OPTION_LEN + HEAD] = ptr_at(self, 0)?;
        unsafe {
            let head: [u8; HEAD] = *((*p).as_ptr() as *const [u8; HEAD]);
            *((*p).as_mut_ptr().add(DSR_OPTION_LEN) as *mut [u8; HEAD]) = head;
        }
        if unsafe { bpf_xdp_adjust_head(self.as_ptr() as *mut _, DSR_OPTION_LEN as i32) } != 0 {
            return Err(());
        }
        Ok(())
    }
}

impl Packet for TcContext {
    const PASS: u32 = TC_ACT_OK as u32;
    const DROP: u32 = TC_ACT_SHOT as u32;
    const IS_XDP: bool = false;

    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> u64 {
        TcContext::len(self) as u64
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        unsafe { (*self.skb.skb).ifindex }
    }
    #[inline(always)]
    fn pull(&self, len: usize) {
        let have = TcContext::data_end(self) - TcContext::data(self);
        let total = TcContext::len(self) as usize;
        if have < len && have < total {
            let want = if total < len { total } else { len };
            unsafe { bpf_skb_pull_data(self.skb.skb, want as u32) };
        }
    }

    #[inline(always)]
    fn rewrite(&self, flow: &Flow, dst: bool, addr: u32, port: u16) -> Result<(), ()> {
        let (addr_off, port_off, check_off, old_addr, old_port) = fields(flow, dst);
        let skb = self.skb.skb;
        if flow.later_fragment {
            let ok = unsafe {
                bpf_skb_store_bytes(skb, addr_off as u32, &addr as *const u32 as *const _, 4, 0)
                    == 0
                    && bpf_l3_csum_replace(
                        skb,
                        (flow.l3 + 10) as u32,
                        old_addr as u64,
                        addr as u64,
                        4,
                    ) == 0
            };
            return if ok { Ok(()) } else { Err(()) };
        }
        let l4_flags = if flow.proto == IPPROTO_UDP {
            BPF_F_MARK_MANGLED_0 as u64
        } else {
            0
        };
        let ok = unsafe {
            bpf_skb_store_bytes(skb, addr_off as u32, &addr as *const u32 as *const _, 4, 0) == 0
                && bpf_l3_csum_replace(skb, (flow.l3 + 10) as u32, old_addr as u64, addr as u64, 4)
                    == 0
                && bpf_l4_csum_replace(
                    skb,
                    check_off as u32,
                    old_addr as u64,
                    addr as u64,
                    BPF_F_PSEUDO_HDR as u64 | l4_flags | 4,
                ) == 0
                && bpf_skb_store_bytes(skb, port_off as u32, &port as *const u16 as *const _, 2, 0)
                    == 0
                && bpf_l4_csum_replace(
                    skb,
                    check_off as u32,
                    old_port as u64,
                    port as u64,
                    l4_flags | 2,
                ) == 0
        };
        if ok { Ok(()) } else { Err(()) }
    }

    #[inline(always)]
    fn rewrite_port(&self, flow: &Flow, dst: bool, old: u16, new: u16) -> Result<(), ()> {
        if flow.later_fragment {
            return Ok(());
        }
        let (_, port_off, check_off, _, _) = fields(flow, dst);
        let skb = self.skb.skb;
        let l4_flags = if flow.proto == IPPROTO_UDP {
            BPF_F_MARK_MANGLED_0 as u64
        } else {
            0
        };
        let ok = unsafe {
            bpf_skb_store_bytes(skb, port_off as u32, &new as *const u16 as *const _, 2, 0) == 0
                && bpf_l4_csum_replace(skb, check_off as u32, old as u64, new as u64, l4_flags | 2)
                    == 0
        };
        if ok { Ok(()) } else { Err(()) }
    }

    #[inline(always)]
    fn send(&self, ifindex: u32) -> u32 {
        unsafe { bpf_redirect(ifindex, 0) as u32 }
    }

    #[inline(always)]
    fn can_send(&self, _ifindex: u32) -> bool {
        true
    }

    #[inline(always)]
    fn send_resolving(&self, ifindex: u32) -> u32 {
        unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as u32 }
    }

    #[inline(always)]
    fn largest_segment(&self, flow: &Flow) -> u32 {
        let gso_size = unsafe { (*self.skb.skb).gso_size };
        if gso_size == 0 {
            return (TcContext::len(self) as usize - flow.l3) as u32;
        }
        // Headers of each segment: IPv4 and TCP (its data offset) or UDP.
        let l4_header = if flow.proto == IPPROTO_UDP {
            8
        } else {
            match ptr_at::<Self, [u8; 13]>(self, flow.l4) {
                Ok(t) => ((unsafe { (*t)[12] } >> 4) as u32) * 4,
                Err(()) => 60,
            }
        };
        (flow.l4 - flow.l3) as u32 + l4_header + gso_size
    }

    #[inline(always)]
    fn resize(&self, len: usize) -> Result<(), ()> {
        if unsafe { bpf_skb_change_tail(self.skb.skb, len as u32, 0) } != 0 {
            return Err(());
        }
        Ok(())
    }

    #[inline(always)]
    fn checksum_complete(&self) {
        unsafe { bpf_csum_level(self.skb.skb, BPF_CSUM_LEVEL_RESET as u64) };
    }

    #[inline(always)]
    fn tracing(&self) -> bool {
        let cb = unsafe { (*self.skb.skb).cb };
        cb[0] == lb_common::TRACE_MAGIC[0]
            && cb[1] == lb_common::TRACE_MAGIC[1]
            && cb[2] == lb_common::TRACE_MAGIC[2]
            && cb[3] == lb_common::TRACE_MAGIC[3]
    }

    #[inline(always)]
    fn load_bytes<const N: usize>(
        &self,
        offset: usize,
        buf: &mut [u8; N],
        len: usize,
    ) -> Result<(), ()> {
        if len == 0 || len > N {
            return Err(());
        }
        let r = unsafe {
            bpf_skb_load_bytes(
                self.skb.skb as *const _,
                offset as u32,
                buf.as_mut_ptr().cast(),
                len as u32,
            )
        };
        if r == 0 { Ok(()) } else { Err(()) }
    }

    #[inline(always)]
    fn open_after_ip_header(&self) -> Result<(), ()> {
        // BPF_ADJ_ROOM_NET opens (or closes) room right after the 20-byte IPv4 header: the
        // Ethernet and IPv4 headers move, the rest stays.
        let r = unsafe {
            bpf_skb_adjust_room(self.skb.skb, DSR_OPTION_LEN as i32, BPF_ADJ_ROOM_NET, 0)
        };
        if r != 0 {
            return Err(());
        }
        self.pull(EthHdr::LEN + 20 + DSR_OPTION_LEN);
        Ok(())
    }

    #[inline(always)]
    fn close_after_ip_header(&self) -> Result<(), ()> {
        let r = unsafe {
            bpf_skb_adjust_room(self.skb.skb, -(DSR_OPTION_LEN as i32), BPF_ADJ_ROOM_NET, 0)
        };
        if r != 0 {
            return Err(());
        }
        Ok(())
    }
}
