//! The system's tables over netlink (rtnetlink / netlink-packet-route, the rust-netlink crates).
//!
//! Why rtnetlink: it is the maintained tokio-native netlink stack (used by youki, netavark and
//! others), so the neighbour dump and the event stream share the controller's runtime; route
//! lookups are one request/response each, made on a plain blocking netlink socket so the
//! controller's core stays synchronous and testable.

use std::{
    ffi::CStr,
    net::{IpAddr, UdpSocket},
};

use futures_util::{StreamExt as _, TryStreamExt as _};
use netlink_packet_core::{NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use rtnetlink::MulticastGroup;
use tokio::sync::mpsc;

use super::{NeighEvent, Neighbour, Neighbours, Route};
use crate::config::Mac;

/// The kernel's tables in this network namespace.
pub struct SystemNeighbours;

impl Neighbours for SystemNeighbours {
    fn route(&self, addr: IpAddr) -> Result<Route, String> {
        route_get(addr).map_err(|e| format!("no route to it ({e})"))
    }

    fn probe(&self, addr: IpAddr) {
        let local = if addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        if let Ok(s) = UdpSocket::bind(local) {
            // UDP port 9 (discard): the datagram makes the kernel ARP/NDP for `addr`.
            let _ = s.send_to(b"lb neighbour probe", (addr, 9));
        }
    }
}

/// `ip route get <addr>` over netlink.
fn route_get(addr: IpAddr) -> Result<Route, String> {
    let mut msg = RouteMessage::default();
    msg.header.address_family = match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    msg.header.destination_prefix_length = if addr.is_ipv4() { 32 } else { 128 };
    msg.attributes
        .push(RouteAttribute::Destination(RouteAddress::from(addr)));
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetRoute(msg));
    req.header.flags = NLM_F_REQUEST;
    req.header.sequence_number = 1;
    req.finalize();
    let mut buf = vec![0u8; req.buffer_len()];
    req.serialize(&mut buf);

    let mut sock = Socket::new(NETLINK_ROUTE).map_err(|e| format!("netlink socket: {e}"))?;
    sock.bind_auto().map_err(|e| format!("netlink bind: {e}"))?;
    sock.connect(&SocketAddr::new(0, 0))
        .map_err(|e| format!("netlink connect: {e}"))?;
    sock.send(&buf, 0)
        .map_err(|e| format!("netlink send: {e}"))?;
    let mut rbuf = Vec::with_capacity(16384);
    let n = sock
        .recv(&mut rbuf, 0)
        .map_err(|e| format!("netlink recv: {e}"))?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rbuf[..n])
        .map_err(|e| format!("netlink reply: {e}"))?;
    match reply.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(m)) => {
            let ifindex = m
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                })
                .ok_or("route without a device")?;
            let gateway = m.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => Some(IpAddr::V4(*g)),
                RouteAttribute::Gateway(RouteAddress::Inet6(g)) => Some(IpAddr::V6(*g)),
                _ => None,
            });
            Ok(Route {
                dev: if_name(ifindex).unwrap_or_else(|| format!("if{ifindex}")),
                ifindex,
                gateway,
                local: m.header.kind == RouteType::Local,
            })
        }
        NetlinkPayload::Error(e) => Err(e.to_io().to_string()),
        other => Err(format!("unexpected netlink reply {other:?}")),
    }
}

/// The name of interface `ifindex`.
pub fn if_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success if_indextoname wrote a NUL-terminated name into `buf`.
    Some(
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// Subscribes to neighbour and route events, sends one [`NeighEvent::Resync`] followed by
/// the current neighbour table and [`NeighEvent::Synced`], then every change as it happens. Returns when the event stream
/// ends (e.g. the socket overran) or the receiver is gone; the caller starts it again.
pub async fn watch(tx: mpsc::Sender<NeighEvent>) -> Result<(), String> {
    let (conn, handle, mut messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Neigh,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
    ])
    .map_err(|e| format!("netlink: {e}"))?;
    let conn = tokio::spawn(conn);
    let result = async {
        let send = |ev| {
            let tx = tx.clone();
            async move { tx.send(ev).await.map_err(|_| "controller gone".to_owned()) }
        };
        send(NeighEvent::Resync).await?;
        let mut dump = handle.neighbours().get().execute();
        while let Some(m) = dump
            .try_next()
            .await
            .map_err(|e| format!("neighbour dump: {e}"))?
        {
            if let Some(ev) = event(&m, false) {
                send(ev).await?;
            }
        }
        send(NeighEvent::Synced).await?;
        while let Some((msg, _)) = messages.next().await {
            let ev = match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(m)) => {
                    event(&m, false)
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(m)) => {
                    event(&m, true)
                }
                NetlinkPayload::InnerMessage(
                    RouteNetlinkMessage::NewRoute(_) | RouteNetlinkMessage::DelRoute(_),
                ) => Some(NeighEvent::Routes),
                _ => None,
            };
            if let Some(ev) = ev {
                send(ev).await?;
            }
        }
        Err("netlink event stream ended".to_owned())
    }
    .await;
    conn.abort();
    result
}

/// The event of a neighbour message (IPv4/IPv6 entries only).
fn event(m: &NeighbourMessage, deleted: bool) -> Option<NeighEvent> {
    let addr = m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    })?;
    let ifindex = m.header.ifindex;
    if deleted {
        return Some(NeighEvent::Del { ifindex, addr });
    }
    let mac = m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(b) if b.len() == 6 => {
            Some(Mac([b[0], b[1], b[2], b[3], b[4], b[5]]))
        }
        _ => None,
    });
    Some(NeighEvent::New {
        ifindex,
        addr,
        neighbour: Neighbour {
            mac,
            state: m.header.state.into(),
        },
    })
}
