//! Global counters of the data plane: one per verdict and one per reason.
//!
//! Each is a slot of the per-CPU array [`crate::names::STATS`]; the controller sums the CPUs.

macro_rules! stats {
    ($($(#[doc = $doc:literal])* $variant:ident = $name:literal,)*) => {
        /// Index into the global counter array.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u32)]
        pub enum Stat {
            $($(#[doc = $doc])* $variant,)*
        }

        impl Stat {
            /// Every counter, in index order.
            pub const ALL: &'static [Stat] = &[$(Stat::$variant,)*];

            /// Stable, snake_case name (used in `lb` output and metrics).
            pub const fn name(self) -> &'static str {
                match self {
                    $(Stat::$variant => $name,)*
                }
            }
        }
    };
}

stats! {
    /// Verdict XDP_TX (forwarded out of the ingress interface).
    VerdictTx = "verdict_tx",
    /// Verdict XDP_REDIRECT (forwarded out of another interface).
    VerdictRedirect = "verdict_redirect",
    /// Verdict XDP_PASS (handed to the kernel stack unchanged).
    VerdictPass = "verdict_pass",
    /// Verdict XDP_DROP.
    VerdictDrop = "verdict_drop",
    /// Verdict XDP_ABORTED (a bug: should stay 0).
    VerdictAborted = "verdict_aborted",
    /// PASS: not IPv4/IPv6 (ARP, LLDP, ...).
    PassNotIp = "pass_not_ip",
    /// PASS: IP but not TCP/UDP (ICMP, ...).
    PassNotTcpUdp = "pass_not_tcp_udp",
    /// PASS: TCP/UDP not addressed to a service.
    PassNoService = "pass_no_service",
    /// PASS: malformed or truncated frame not addressed to a VIP (bad version, bad IHL,
    /// truncated header, more IPv6 extension headers than we walk).
    PassMalformed = "pass_malformed",
    /// PASS: fragment not addressed to a VIP.
    PassFragment = "pass_fragment",
    /// DROP: service has no usable backend.
    DropNoBackend = "drop_no_backend",
    /// DROP: a later IP fragment to a VIP whose datagram was not seen, and the VIP has no
    /// fragment service for its protocol (several services and no all-ports one), or no
    /// usable backend there.
    DropFragment = "drop_fragment",
    /// DROP: malformed or truncated TCP/UDP header addressed to a VIP.
    DropMalformed = "drop_malformed",
    /// DROP: redirect to an egress interface failed (devmap slot empty).
    DropTxPort = "drop_tx_port",
    /// New flow: backend chosen and recorded in the connection table.
    FlowNew = "flow_new",
    /// Known flow: backend taken from the connection table.
    FlowHit = "flow_hit",
    /// Known flow whose backend was removed or marked down: chosen again.
    FlowRescheduled = "flow_rescheduled",
    /// Connection table insert failed (forwarded anyway; next packet chooses again).
    FlowInsertFailed = "flow_insert_failed",
    /// An ICMP error (destination unreachable, fragmentation needed, packet too big) quoting a
    /// VIP flow, forwarded to the backend that owns the flow.
    FlowIcmpError = "flow_icmp_error",
    /// A fragment forwarded where its datagram's first-arriving fragment went (`LB_FRAGS`).
    FlowFragment = "flow_fragment",
    /// A fragment whose datagram was not seen yet and has no ports: the backend chosen by a
    /// hash of the addresses over the VIP's fragment service, then recorded.
    FlowFragmentHashed = "flow_fragment_hashed",
    /// PASS: ICMP/ICMPv6 not forwarded: echo and other types, or an error for a VIP flow that
    /// has no owner (not in the connection table, and an rr/wrr/lc/wlc service).
    PassIcmp = "pass_icmp",
    /// Flow sharing: a new connection-table entry reported to the controller (`LB_SYNC`).
    FlowSyncReported = "flow_sync_reported",
    /// Flow sharing: a new entry not reported (the per-CPU rate limit, or the ring was full).
    FlowSyncSuppressed = "flow_sync_suppressed",
    /// PASS: a unicast frame to another host's MAC (flooded by a bridge, or seen in
    /// promiscuous mode): never forwarded.
    PassOtherHost = "pass_other_host",
    /// Established TCP (or UDP) packet of a maglev/sh service whose table slot never changed:
    /// forwarded by the slot alone, the connection table not consulted (UDP: not recorded).
    FlowStateless = "flow_stateless",
}

/// Number of global counters (size of the [`crate::names::STATS`] array).
pub const STATS_LEN: u32 = Stat::ALL.len() as u32;

/// The commonest packets' two global counters in one: an index into the per-CPU array
/// [`crate::names::STATS_FAST`], whose slot stands for the two [`Stat`]s of
/// [`FastStat::stats`] at once (the single pass of `lb_xdp` updates one counter where it would
/// update two). What `lb status`, the metrics and the report show for a [`Stat`] is its
/// [`crate::names::STATS`] slot plus the [`FastStat`] slots that name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum FastStat {
    /// A TCP/UDP packet to no VIP, passed: `pass_no_service` and `verdict_pass`.
    NoServicePass,
    /// An established packet of an unchanged maglev/sh slot sent back out (XDP_TX):
    /// `flow_stateless` and `verdict_tx`.
    StatelessTx,
}

impl FastStat {
    /// Every fast counter, in index order.
    pub const ALL: [FastStat; 2] = [FastStat::NoServicePass, FastStat::StatelessTx];

    /// The two counters this one stands for.
    pub const fn stats(self) -> [Stat; 2] {
        match self {
            FastStat::NoServicePass => [Stat::PassNoService, Stat::VerdictPass],
            FastStat::StatelessTx => [Stat::FlowStateless, Stat::VerdictTx],
        }
    }
}

/// Number of fast counters (size of the [`crate::names::STATS_FAST`] array).
pub const FAST_STATS_LEN: u32 = FastStat::ALL.len() as u32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_counters_are_dense_and_each_stands_for_a_reason_and_its_verdict() {
        for (i, f) in FastStat::ALL.iter().enumerate() {
            assert_eq!(*f as usize, i, "index order");
            let [reason, verdict] = f.stats();
            assert_ne!(reason, verdict);
            assert!(reason.name().starts_with("pass_") || reason.name().starts_with("flow_"));
            assert!(verdict.name().starts_with("verdict_"));
        }
        assert_eq!(FAST_STATS_LEN, 2);
    }
}
