//! Rules the data plane and the controller must agree on, defined once.
//!
//! The XDP program and the controller both call these (`#[inline(always)]`, no allocation, no
//! 128-bit arithmetic), so a change in one place changes both sides.

use core::net::IpAddr;

use crate::{FAMILY_V4, FAMILY_V6, FLOW_F_CLOSED, FLOW_F_COUNTED, FlowValue};

/// Active connections from the two counters: flows opened (minus those closed by the client,
/// stored as wrapping `u64::MAX` decrements) and flows the controller expired. Both are
/// wrapping sums; a negative difference (a close counted twice, see lb-ebpf's select.rs)
/// counts as 0.
#[inline(always)]
pub fn active_connections(opened: u64, expired: u64) -> u64 {
    let a = opened.wrapping_sub(expired) as i64;
    if a < 0 { 0 } else { a as u64 }
}

/// Connection counts are clamped to this before wlc multiplies them by a 16-bit weight, so the
/// products fit a `u64` exactly (the BPF target has no 128-bit multiply).
pub const WLC_MAX_ACTIVE: u64 = u32::MAX as u64;

/// Weighted least connections' comparison: is `active_a / weight_a` below
/// `active_b / weight_b`? Computed as `active_a·weight_b < active_b·weight_a` (no division), with
/// `active_a` clamped to [`WLC_MAX_ACTIVE`] and `active_b` to one above it (so the initial "no
/// best yet", `(u64::MAX, 1)`, loses to every real count). Weights are at most `u32::MAX`
/// (they come from `u32` fields), so the products fit a `u64` exactly.
///
/// A weight of 0 never wins, and ties keep the current best (the earlier backend): callers skip
/// weight-0 backends before comparing.
#[inline(always)]
pub fn wlc_less(active_a: u64, weight_a: u64, active_b: u64, weight_b: u64) -> bool {
    clamp_active(active_a) * weight_b < active_b.min(WLC_MAX_ACTIVE + 1) * weight_a
}

/// A connection count as wlc compares it (see [`WLC_MAX_ACTIVE`]).
#[inline(always)]
pub fn clamp_active(active: u64) -> u64 {
    active.min(WLC_MAX_ACTIVE)
}

/// A flow that is counted in its backend's active connections and not yet closed by the
/// client: leaving it (client FIN/RST, a move, an expiry) subtracts one.
#[inline(always)]
pub fn counted_and_open(flow: &FlowValue) -> bool {
    flow.flags & (FLOW_F_COUNTED | FLOW_F_CLOSED) == FLOW_F_COUNTED
}

/// An address in the 16-byte key layout (IPv4 in the first 4 bytes, rest zero) and its family.
#[inline(always)]
pub fn addr_key(addr: IpAddr) -> ([u8; 16], u8) {
    match addr {
        IpAddr::V4(a) => {
            let o = a.octets();
            let mut b = [0u8; 16];
            b[0] = o[0];
            b[1] = o[1];
            b[2] = o[2];
            b[3] = o[3];
            (b, FAMILY_V4)
        }
        IpAddr::V6(a) => (a.octets(), FAMILY_V6),
    }
}

/// The address a key's 16 bytes and family stand for (the inverse of [`addr_key`]); `None` for
/// an unknown family (0: unused).
#[inline(always)]
pub fn key_addr(bytes: &[u8; 16], family: u8) -> Option<IpAddr> {
    match family {
        FAMILY_V4 => Some(IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])),
        FAMILY_V6 => Some(IpAddr::from(*bytes)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_is_opened_minus_expired_never_negative() {
        assert_eq!(active_connections(5, 2), 3);
        assert_eq!(active_connections(2, 5), 0);
        // More closes than opens (a close counted twice): never negative.
        assert_eq!(active_connections(u64::MAX, 0), 0);
        // Wrapping decrements: +3, then −1.
        assert_eq!(active_connections(3u64.wrapping_add(u64::MAX), 0), 2);
    }

    #[test]
    fn wlc_compares_without_division() {
        // 1 conn at weight 1 vs 3 conns at weight 2: 1·2 < 3·1 → the first wins.
        assert!(wlc_less(1, 1, 3, 2));
        assert!(!wlc_less(3, 2, 1, 1));
        // Equal ratios: the current best stays.
        assert!(!wlc_less(2, 2, 1, 1));
        // Anything beats "no best yet", even with huge counts and weights.
        assert!(wlc_less(u64::MAX, 1, u64::MAX, 1));
        assert!(wlc_less(u64::MAX, 65535, u64::MAX, 1));
        assert!(wlc_less(
            u64::MAX,
            u32::MAX as u64,
            u64::MAX,
            u32::MAX as u64
        ));
    }

    #[test]
    fn counted_and_open_flows() {
        let f = |flags| FlowValue {
            flags,
            ..FlowValue::default()
        };
        assert!(counted_and_open(&f(FLOW_F_COUNTED)));
        assert!(!counted_and_open(&f(FLOW_F_COUNTED | FLOW_F_CLOSED)));
        assert!(!counted_and_open(&f(0)));
        assert!(!counted_and_open(&f(FLOW_F_CLOSED)));
    }

    #[test]
    fn address_keys() {
        let (b, f) = addr_key("10.1.2.3".parse().unwrap());
        assert_eq!(
            (&b[..4], &b[4..], f),
            (&[10, 1, 2, 3][..], &[0u8; 12][..], FAMILY_V4)
        );
        let (b, f) = addr_key("fd00::1".parse().unwrap());
        assert_eq!((b[0], b[15], f), (0xfd, 1, FAMILY_V6));
    }
}
