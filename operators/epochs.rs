//! `Epochs`: records held by epoch, each with a capability at its time, until the operator's
//! frontier says the epoch is complete; then released oldest first. The state of every operator
//! that acts on whole epochs (`keep`, `limit`, `write_jsonl`).

use super::Time;
use std::collections::BTreeMap;
use timely::dataflow::operators::{Capability, InputCapability};

/// Held records by epoch.
pub struct Epochs<D> {
    held: BTreeMap<Time, (Capability<Time>, Vec<D>)>,
}

impl<D> Default for Epochs<D> {
    fn default() -> Self {
        Epochs {
            held: BTreeMap::new(),
        }
    }
}

impl<D> Epochs<D> {
    /// Holds one input message: its records, and a capability for `output` at its time.
    pub fn hold<'a>(
        &mut self,
        stamp: InputCapability<Time>,
        data: impl Iterator<Item = &'a mut Vec<D>>,
        output: usize,
    ) where
        D: 'a,
    {
        let Some(&time) = stamp.least() else { return };
        let Some(cap) = stamp.retain_least(output) else {
            return;
        };
        let entry = self.held.entry(time).or_insert_with(|| (cap, Vec::new()));
        for batch in data {
            entry.1.append(batch);
        }
    }

    /// The oldest held epoch if it is complete (`open(time)` is false), with its capability.
    pub fn next_complete(
        &mut self,
        open: impl Fn(&Time) -> bool,
    ) -> Option<(Time, Capability<Time>, Vec<D>)> {
        let (&time, _) = self.held.iter().next()?;
        if open(&time) {
            return None;
        }
        let (cap, records) = self.held.remove(&time)?;
        Some((time, cap, records))
    }
}
