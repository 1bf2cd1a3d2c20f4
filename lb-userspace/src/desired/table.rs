//! A service's table as the desired state keeps it: a backend id per slot in two bytes.

use lb_common::{NO_BACKEND, limits::MAX_BACKENDS};

/// How [`NO_BACKEND`] is kept.
const NONE: u16 = u16::MAX;

// Every backend id fits in the two bytes beside the empty slot's mark.
const _: () = assert!(MAX_BACKENDS <= NONE as u32);

/// Backend id per slot ([`NO_BACKEND`] when none), two bytes a slot: backend ids are below
/// [`MAX_BACKENDS`]. A config of 1 000 Maglev services of 65 537 slots keeps 131 MB of tables
/// instead of 262 MB as `u32`s: memory an apply from scratch touches for the first time (the
/// kernel clears every fresh page), and that a reload holds twice (old and new state).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table(Vec<u16>);

impl Table {
    /// The table of these ids (an id of [`MAX_BACKENDS`] or more, which names no backend, is
    /// kept as [`NO_BACKEND`]).
    pub fn from_ids(ids: &[u32]) -> Table {
        Table(ids.iter().map(|&id| pack(id)).collect())
    }

    /// Slot `i`'s backend id ([`NO_BACKEND`] when none); `None` past the end.
    #[inline]
    pub fn get(&self, i: usize) -> Option<u32> {
        self.0.get(i).map(|&v| unpack(v))
    }

    /// Slots.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the table has no slot.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Bytes the slots take (the table's heap memory, less any spare capacity).
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(self.0.as_slice())
    }

    /// The ids slot by slot.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = u32> + Clone + '_ {
        self.0.iter().map(|&v| unpack(v))
    }

    /// Whether some slot names backend `id`.
    pub fn contains(&self, id: u32) -> bool {
        id != NO_BACKEND && id < MAX_BACKENDS && self.0.contains(&(id as u16))
    }

    /// The ids as `u32`s (`LB_RING`'s values of a table without changed slots).
    pub fn to_vec(&self) -> Vec<u32> {
        self.iter().collect()
    }
}

impl FromIterator<u32> for Table {
    fn from_iter<I: IntoIterator<Item = u32>>(ids: I) -> Table {
        Table(ids.into_iter().map(pack).collect())
    }
}

#[inline]
fn pack(id: u32) -> u16 {
    if id < MAX_BACKENDS { id as u16 } else { NONE }
}

#[inline]
fn unpack(v: u16) -> u32 {
    if v == NONE { NO_BACKEND } else { v as u32 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_none_stays_none() {
        let ids = [0, 1, MAX_BACKENDS - 1, NO_BACKEND, 7];
        let t = Table::from_ids(&ids);
        assert_eq!(t.len(), 5);
        assert_eq!(t.bytes(), 10);
        assert_eq!(t.to_vec(), ids);
        assert_eq!(t.get(3), Some(NO_BACKEND));
        assert_eq!(t.get(5), None);
        assert!(t.contains(MAX_BACKENDS - 1) && t.contains(0));
        assert!(!t.contains(NO_BACKEND) && !t.contains(2));
        assert_eq!(t, ids.iter().copied().collect::<Table>());
        // Not an id: kept as none.
        assert_eq!(Table::from_ids(&[MAX_BACKENDS]).get(0), Some(NO_BACKEND));
    }
}
