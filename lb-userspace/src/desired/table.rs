//! A service's table as the desired state keeps it: a byte per slot when it names at most 255
//! backends (every Maglev table of a service of up to 255 backends), else two.

use std::sync::Arc;

use lb_common::{NO_BACKEND, limits::MAX_BACKENDS, packed::IDS};

/// How [`NO_BACKEND`] is kept.
const NONE: u16 = u16::MAX;

// Every backend id fits in the two bytes beside the empty slot's mark.
const _: () = assert!(MAX_BACKENDS <= NONE as u32);
// A narrow table's indexes (1..IDS, 0 for none) are bytes, as the packed copy's fields.
const _: () = assert!(IDS == 256);

/// Backend id per slot ([`NO_BACKEND`] when none). A table that names at most 255 distinct
/// backends keeps a byte per slot, an index into its list of backends (0: none), and how many
/// slots hold each index: what the packed copy of the tables (`LB_RING_PACKED`) is made of, so
/// the data plane's loader packs such a table without a pass to find its backends. Others keep
/// a two-byte id per slot (backend ids are below [`MAX_BACKENDS`]). A config of 1 000 Maglev
/// services of 10 backends and 65 537 slots keeps 66 MB of tables (131 MB as two-byte ids,
/// 262 MB as `u32`s): memory an apply from scratch touches for the first time (the kernel clears
/// every fresh page), and that a reload holds twice (old and new state).
///
/// Two tables are equal when every slot names the same backend, however each is kept.
#[derive(Clone, Debug)]
pub struct Table(Repr);

#[derive(Clone, Debug)]
enum Repr {
    Narrow(Narrow),
    Wide(Vec<u16>),
}

/// A table of at most 255 distinct backends, as [`Table::narrow`] lends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Narrow {
    /// Index per slot: 0 for none, `i` for `ids[i]`. Shared by the tables of services whose
    /// Maglev tables have the same size, backend addresses and weights (each with its own ids).
    pub fields: Arc<[u8]>,
    /// Index → backend id; `ids[0]` is [`NO_BACKEND`]. At most [`IDS`] entries.
    pub ids: Vec<u32>,
    /// Index → slots holding it (as many entries as `ids`).
    pub counts: Vec<u32>,
}

impl Default for Table {
    fn default() -> Table {
        Table(Repr::Wide(Vec::new()))
    }
}

impl Table {
    /// The table of these ids (an id of [`MAX_BACKENDS`] or more, which names no backend, is
    /// kept as [`NO_BACKEND`]).
    pub fn from_ids(ids: &[u32]) -> Table {
        ids.iter().copied().collect()
    }

    /// The table whose slot `i` names `ids[fields[i] − 1]` ([`NO_BACKEND`] for a field of 0 or
    /// beyond `ids`; `ids` holds at most [`IDS`] − 1 backends): [`fields_of`] and
    /// [`Table::shared`] in one, as the tests build tables (the Maglev builds share theirs).
    #[cfg(test)]
    pub fn from_fields(fields: &[u32], ids: &[u32]) -> Table {
        let (fields, counts) = fields_of(fields, ids.len() as u32 + 1);
        Table::shared(fields, counts, ids)
    }

    /// The table whose slot `i` names `ids[fields[i] − 1]` (none for a field of 0), `counts[f]`
    /// slots holding field `f`: `fields` as a Maglev build writes them (a byte a slot), maybe
    /// shared with other tables (other ids).
    pub fn shared(fields: Arc<[u8]>, counts: Vec<u32>, ids: &[u32]) -> Table {
        debug_assert!(ids.len() < IDS, "at most 255 backends");
        debug_assert_eq!(counts.len(), ids.len() + 1, "a count per index");
        let mut list = Vec::with_capacity(ids.len() + 1);
        list.push(NO_BACKEND);
        list.extend(ids.iter().map(|&id| unpack(pack(id))));
        // An id that is none or named twice: one index per backend, as the packed copy wants.
        let mut seen = std::collections::HashSet::new();
        if list[1..]
            .iter()
            .any(|&id| id == NO_BACKEND || !seen.insert(id))
        {
            return fields.iter().map(|&f| list[f as usize]).collect();
        }
        Table(Repr::Narrow(Narrow {
            fields,
            ids: list,
            counts,
        }))
    }

    /// The table as bytes, an index per slot, when it names at most 255 distinct backends.
    pub fn narrow(&self) -> Option<&Narrow> {
        match &self.0 {
            Repr::Narrow(n) => Some(n),
            Repr::Wide(_) => None,
        }
    }

    /// Slot `i`'s backend id ([`NO_BACKEND`] when none); `None` past the end.
    #[inline]
    pub fn get(&self, i: usize) -> Option<u32> {
        match &self.0 {
            Repr::Narrow(n) => n.fields.get(i).map(|&f| n.ids[f as usize]),
            Repr::Wide(w) => w.get(i).map(|&v| unpack(v)),
        }
    }

    /// Slots.
    pub fn len(&self) -> usize {
        match &self.0 {
            Repr::Narrow(n) => n.fields.len(),
            Repr::Wide(w) => w.len(),
        }
    }

    /// Whether the table has no slot.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the slots take (the table's heap memory, less any spare capacity; bytes shared with
    /// other tables counted in each).
    pub fn bytes(&self) -> usize {
        match &self.0 {
            Repr::Narrow(n) => {
                n.fields.len() + std::mem::size_of_val(n.ids.as_slice()) + 4 * n.counts.len()
            }
            Repr::Wide(w) => std::mem::size_of_val(w.as_slice()),
        }
    }

    /// The ids slot by slot.
    pub fn iter(&self) -> Iter<'_> {
        match &self.0 {
            Repr::Narrow(n) => Iter::Narrow(n.fields.iter(), &n.ids),
            Repr::Wide(w) => Iter::Wide(w.iter()),
        }
    }

    /// Whether some slot names backend `id`.
    pub fn contains(&self, id: u32) -> bool {
        if id == NO_BACKEND || id >= MAX_BACKENDS {
            return false;
        }
        match &self.0 {
            Repr::Narrow(n) => n.ids.iter().zip(&n.counts).any(|(&b, &c)| b == id && c > 0),
            Repr::Wide(w) => w.contains(&(id as u16)),
        }
    }

    /// The ids as `u32`s (`LB_RING`'s values of a table without changed slots).
    pub fn to_vec(&self) -> Vec<u32> {
        self.iter().collect()
    }
}

impl PartialEq for Table {
    fn eq(&self, other: &Table) -> bool {
        match (&self.0, &other.0) {
            (Repr::Narrow(a), Repr::Narrow(b)) if a.ids == b.ids => {
                Arc::ptr_eq(&a.fields, &b.fields) || a.fields == b.fields
            }
            (Repr::Wide(a), Repr::Wide(b)) => a == b,
            _ => self.len() == other.len() && self.iter().eq(other.iter()),
        }
    }
}

impl Eq for Table {}

impl FromIterator<u32> for Table {
    /// Narrow when at most 255 distinct backends are named.
    fn from_iter<I: IntoIterator<Item = u32>>(ids: I) -> Table {
        let wide: Vec<u16> = ids.into_iter().map(pack).collect();
        // Backend id → index (0: not seen yet), while the slots are looked at.
        let mut index = vec![0u8; MAX_BACKENDS as usize];
        let mut list = vec![NO_BACKEND];
        let mut fields = Vec::with_capacity(wide.len());
        for &v in &wide {
            let f = if v == NONE {
                0
            } else {
                let slot = &mut index[v as usize];
                if *slot == 0 {
                    if list.len() == IDS {
                        return Table(Repr::Wide(wide));
                    }
                    *slot = list.len() as u8;
                    list.push(v as u32);
                }
                *slot
            };
            fields.push(f);
        }
        let mut counts = vec![0u32; list.len()];
        for &f in &fields {
            counts[f as usize] += 1;
        }
        Table(Repr::Narrow(Narrow {
            fields: fields.into(),
            ids: list,
            counts,
        }))
    }
}

/// A build's `u32` fields (indexes below `n`; others read as 0, none) as a table's bytes, and
/// how many slots hold each of the `n` indexes (the tests' tables; the Maglev builds write
/// bytes).
#[cfg(test)]
pub fn fields_of(fields: &[u32], n: u32) -> (Arc<[u8]>, Vec<u32>) {
    debug_assert!(n as usize <= IDS);
    // One pass converts (branch-free: the compiler runs it many slots at a time), another
    // tallies.
    let bytes: Vec<u8> = fields
        .iter()
        .map(|&f| if f < n { f as u8 } else { 0 })
        .collect();
    let mut counts = vec![0u32; n as usize];
    tally(&bytes, &mut counts);
    (Arc::from(bytes), counts)
}

/// How many of `fields` hold each index below `counts.len()` (at most [`IDS`]; added to
/// `counts`): four tallies side by side, so that a run of slots of one backend does not wait
/// on its own increments (a store forwarded to the next load of the same counter), added up.
pub fn tally(fields: &[u8], counts: &mut [u32]) {
    let mut t = [[0u32; IDS]; 4];
    let mut quads = fields.chunks_exact(4);
    for q in &mut quads {
        t[0][q[0] as usize] += 1;
        t[1][q[1] as usize] += 1;
        t[2][q[2] as usize] += 1;
        t[3][q[3] as usize] += 1;
    }
    for f in quads.remainder() {
        t[0][*f as usize] += 1;
    }
    for (f, c) in counts.iter_mut().enumerate() {
        *c += t.iter().map(|t| t[f]).sum::<u32>();
    }
}

/// [`Table::iter`].
#[derive(Clone, Debug)]
pub enum Iter<'a> {
    Narrow(std::slice::Iter<'a, u8>, &'a [u32]),
    Wide(std::slice::Iter<'a, u16>),
}

impl Iterator for Iter<'_> {
    type Item = u32;

    #[inline]
    fn next(&mut self) -> Option<u32> {
        match self {
            Iter::Narrow(f, ids) => f.next().map(|&f| ids[f as usize]),
            Iter::Wide(w) => w.next().map(|&v| unpack(v)),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.len();
        (n, Some(n))
    }
}

impl ExactSizeIterator for Iter<'_> {
    fn len(&self) -> usize {
        match self {
            Iter::Narrow(f, _) => f.len(),
            Iter::Wide(w) => w.len(),
        }
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
        let n = t.narrow().expect("few backends: a byte a slot");
        assert_eq!(*n.fields, [1, 2, 3, 0, 4]);
        assert_eq!(n.ids, [NO_BACKEND, 0, 1, MAX_BACKENDS - 1, 7]);
        assert_eq!(n.counts, [1, 1, 1, 1, 1]);
        assert_eq!(t.bytes(), 5 + 5 * 4 + 5 * 4);
        assert_eq!(t.to_vec(), ids);
        assert_eq!(t.iter().len(), 5);
        assert_eq!(t.get(3), Some(NO_BACKEND));
        assert_eq!(t.get(5), None);
        assert!(t.contains(MAX_BACKENDS - 1) && t.contains(0));
        assert!(!t.contains(NO_BACKEND) && !t.contains(2));
        assert_eq!(t, ids.iter().copied().collect::<Table>());
        // Not an id: kept as none.
        assert_eq!(Table::from_ids(&[MAX_BACKENDS]).get(0), Some(NO_BACKEND));
        assert!(Table::default().is_empty() && Table::from_ids(&[]).is_empty());
    }

    #[test]
    fn more_than_255_backends_take_two_bytes_a_slot() {
        let ids: Vec<u32> = (0..600).map(|i| i % 256).collect();
        let t = Table::from_ids(&ids);
        assert!(t.narrow().is_none());
        assert_eq!(t.bytes(), 1200);
        assert_eq!(t.to_vec(), ids);
        assert!(t.contains(255) && !t.contains(256));
        // 255 backends and empty slots: still a byte a slot.
        let mut ids: Vec<u32> = (0..255).collect();
        ids.push(NO_BACKEND);
        let t = Table::from_ids(&ids);
        assert_eq!(t.narrow().map(|n| n.ids.len()), Some(256));
        assert_eq!(t.to_vec(), ids);
    }

    #[test]
    fn from_fields_and_equality_by_content() {
        // Fields as a Maglev build gives them: 1-based indexes into the service's backends.
        let t = Table::from_fields(&[2, 1, 2, 0, 9], &[40, 30]);
        assert_eq!(t.to_vec(), [30, 40, 30, NO_BACKEND, NO_BACKEND]);
        let n = t.narrow().unwrap();
        assert_eq!(n.counts, [2, 1, 2]);
        // The same slots found by id: other indexes, equal tables.
        let u = Table::from_ids(&t.to_vec());
        assert_ne!(u.narrow().unwrap().ids, n.ids);
        assert_eq!(t, u);
        let wide = Table(Repr::Wide(t.iter().map(pack).collect()));
        assert_eq!(t, wide);
        assert_ne!(t, Table::from_ids(&[30, 40, 30, NO_BACKEND, 30]));
        assert_ne!(t, Table::from_ids(&[30, 40, 30, NO_BACKEND]));
        // A backend without a slot is not in the table.
        let t = Table::from_fields(&[1, 1], &[5, 6]);
        assert!(t.contains(5) && !t.contains(6));
        // Ids named twice (or none): kept by id.
        let t = Table::from_fields(&[1, 2], &[5, 5]);
        assert_eq!(t.to_vec(), [5, 5]);
        assert_eq!(t.narrow().unwrap().ids, [NO_BACKEND, 5]);
    }
}
