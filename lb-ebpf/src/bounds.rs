//! The one bounds-check helper: every packet access goes through it.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;

/// Pointer to a `T` at byte `offset` of the packet, or `None` if it would reach past the end.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    ptr_at_mut::<T>(ctx, offset).map(|p| p.cast_const())
}

/// Mutable variant of [`ptr_at`].
#[inline(always)]
pub fn ptr_at_mut<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}
