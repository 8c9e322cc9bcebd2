//! A gateway's block of the cluster's client slots: rows of `client_slots` that the database
//! says are this gateway's, handed to its connections and taken back from them without a round
//! trip. Only this bookkeeping lives here (no I/O, time passed in), so that what is held, what
//! is spare and what goes back is decided in one place and tested on tokio's paused clock;
//! [`super::PgPresence`] does the fetching and giving back.
//!
//! The limit stays exact because a slot is handed out only while its row is this gateway's:
//! rows come in by a fetch that took them from the free ones, go out by a give-back, and all of
//! them at once when the gateway leaves or joins again (`reset`), after which a connection of
//! the earlier epoch giving its slot back is ignored. A give-back that failed leaves rows the
//! block no longer lists; the next renewal frees every such row (see [`SlotBlock::held`]).

use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

/// Slots fetched beyond those asked for, and kept after departures, at most: a storm of
/// connections costs one fetch per this many, and a storm of departures one give-back per
/// this many.
pub(super) const SPARE: usize = 64;

/// The spare is at most this share of the cluster's slots: with the default limit of 50, one
/// gateway's spare would otherwise be every slot there is.
const SPARE_SHARE: usize = 16;

#[derive(Debug, Default)]
pub(super) struct SlotBlock {
    /// Slots of this gateway's that no connection holds.
    free: Vec<u32>,
    /// The slot each connection holds.
    in_use: HashMap<u64, u32>,
    /// Until when the cluster counts as short of free slots: a gateway then keeps no spare, so
    /// that one that needs a slot is not refused while another sits on a spare one.
    tight_until: Option<Instant>,
    /// Until when the lease surely runs (its last renewal's start plus the lease): past it,
    /// other gateways may free this block's rows, so none is handed out.
    valid_until: Option<Instant>,
    /// Whether a connection took a slot since the last renewal: an idle gateway gives back
    /// every spare slot.
    taken_since_renewal: bool,
    /// Counts resets and renewals. A fetch begun before a reset brought rows that the reset
    /// freed; a give-back of slots taken out before a renewal is skipped, because the renewal
    /// freed every row the block did not list (and this gateway may have fetched one of them
    /// again since, which the give-back would free under its connection).
    epoch: u64,
    /// Slots fetched beyond those asked for; twice as many are kept before the surplus goes.
    spare: usize,
}

/// Slots to give back, taken out of the block already, and the epoch they belong to.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Surplus {
    pub slots: Vec<u32>,
    pub epoch: u64,
}

impl Surplus {
    /// Adds `other` to what waits to be given back. Slots of an earlier epoch than the newest
    /// are dropped: joining again or a renewal has freed their rows already, and the block may
    /// hold some of them again.
    pub(super) fn merge(&mut self, other: Surplus) {
        if other.epoch > self.epoch {
            *self = other;
        } else if other.epoch == self.epoch {
            self.slots.extend(other.slots);
        }
    }
}

impl SlotBlock {
    pub(super) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Sizes the spare for a cluster of `max_clients` slots.
    pub(super) fn size_for(&mut self, max_clients: u32) {
        let max = usize::try_from(max_clients).unwrap_or(usize::MAX);
        self.spare = (max / SPARE_SHARE).min(SPARE);
    }

    /// Whether slots may be handed out now, as far as the lease goes.
    pub(super) fn lease_runs(&self, now: Instant) -> bool {
        self.valid_until.is_some_and(|until| now < until)
    }

    fn tight(&self, now: Instant) -> bool {
        self.tight_until.is_some_and(|until| now < until)
    }

    /// A slot of the block for connection `conn`, if one is free and the lease runs.
    pub(super) fn take(&mut self, conn: u64, now: Instant) -> Option<u32> {
        if !self.lease_runs(now) {
            return None;
        }
        let slot = self.free.pop()?;
        self.in_use.insert(conn, slot);
        self.taken_since_renewal = true;
        Some(slot)
    }

    /// How many slots to fetch for `waiting` connections.
    pub(super) fn wanted(&self, waiting: usize, now: Instant) -> usize {
        if self.tight(now) {
            waiting
        } else {
            waiting + self.spare
        }
    }

    /// Takes in the slots a fetch of `asked` brought, if the block is still of `epoch`. Fewer
    /// than asked means the cluster is short: no spare is kept for `lease`.
    pub(super) fn fill(
        &mut self,
        epoch: u64,
        slots: Vec<u32>,
        asked: usize,
        now: Instant,
        lease: Duration,
    ) {
        if epoch != self.epoch {
            return;
        }
        if slots.len() < asked {
            self.tight_until = Some(now + lease);
        }
        self.free.extend(slots);
    }

    /// Connection `conn` gives back `slot`; returns what the block no longer needs. A slot of an
    /// earlier epoch (the gateway has joined again since), or one `conn` does not hold, is
    /// ignored.
    pub(super) fn release(&mut self, conn: u64, slot: u32, now: Instant) -> Surplus {
        if self.in_use.get(&conn) != Some(&slot) {
            return Surplus::default();
        }
        self.in_use.remove(&conn);
        self.free.push(slot);
        let keep = if self.tight(now) {
            0
        } else if self.free.len() > 2 * self.spare {
            self.spare
        } else {
            return Surplus::default();
        };
        self.surplus(keep)
    }

    /// The lease was renewed at `at` (when the renewal began); `short` says whether any gateway
    /// was short of slots lately. Returns the spare slots to give back: all of them if the
    /// cluster is short or nothing was taken since the last renewal, else those past the spare.
    pub(super) fn renewed(
        &mut self,
        at: Instant,
        lease: Duration,
        short: bool,
        now: Instant,
    ) -> Surplus {
        self.epoch += 1;
        self.valid_until = Some(at + lease);
        if short {
            self.tight_until = Some(now + lease);
        }
        let keep = if self.tight(now) || !self.taken_since_renewal {
            0
        } else {
            self.spare
        };
        self.taken_since_renewal = false;
        self.surplus(keep)
    }

    /// Every slot this gateway holds, spare or in use, for the renewal to free any other row
    /// of its own.
    pub(super) fn held(&self) -> Vec<u32> {
        self.free
            .iter()
            .chain(self.in_use.values())
            .copied()
            .collect()
    }

    /// The gateway left or joins again: its rows are freed in the database, so the block is
    /// empty, and slots its connections still hold count no more. `lease_from` starts a new
    /// lease (joining), `None` ends it (leaving).
    pub(super) fn reset(&mut self, lease_from: Option<(Instant, Duration)>) {
        self.free.clear();
        self.in_use.clear();
        self.taken_since_renewal = false;
        self.epoch += 1;
        self.valid_until = lease_from.map(|(at, lease)| at + lease);
    }

    fn surplus(&mut self, keep: usize) -> Surplus {
        let give = self.free.len().saturating_sub(keep);
        // The highest slots go back: a taker elsewhere fetches the lowest free ones, so the
        // rows in use stay packed at the low end.
        self.free.sort_unstable();
        let slots = self.free.split_off(self.free.len() - give);
        Surplus {
            slots,
            epoch: self.epoch,
        }
    }

    /// Slots of the block that no connection holds.
    #[cfg(test)]
    pub(super) fn unheld(&self) -> usize {
        self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(10);

    fn joined(now: Instant) -> SlotBlock {
        let mut block = SlotBlock::default();
        block.size_for(u32::MAX);
        block.reset(Some((now, LEASE)));
        block
    }

    /// A block just joined that fetched `slots`, as many as it asked for.
    fn holding(now: Instant, slots: Vec<u32>) -> SlotBlock {
        let mut block = joined(now);
        let asked = slots.len();
        block.fill(block.epoch(), slots, asked, now, LEASE);
        block
    }

    #[test]
    fn surpluses_waiting_together_keep_only_the_newest_epoch() {
        let mut waiting = Surplus::default();
        waiting.merge(Surplus {
            slots: vec![7, 8],
            epoch: 1,
        });
        waiting.merge(Surplus {
            slots: vec![9],
            epoch: 1,
        });
        assert_eq!(waiting.slots, [7, 8, 9]);
        // A renewal in between freed the rows of epoch 1 already.
        waiting.merge(Surplus {
            slots: vec![3],
            epoch: 2,
        });
        waiting.merge(Surplus {
            slots: vec![4],
            epoch: 1,
        });
        assert_eq!(
            waiting,
            Surplus {
                slots: vec![3],
                epoch: 2
            }
        );
    }

    #[test]
    fn the_spare_is_a_small_share_of_a_small_cluster() {
        let mut block = SlotBlock::default();
        let now = Instant::now();
        block.size_for(50);
        assert_eq!(block.wanted(1, now), 1 + 3);
        block.size_for(3);
        assert_eq!(block.wanted(1, now), 1, "a tiny cluster keeps no spare");
        block.size_for(100_000);
        assert_eq!(block.wanted(1, now), 1 + SPARE);
    }

    #[tokio::test(start_paused = true)]
    async fn slots_are_handed_out_only_while_the_lease_runs() {
        let now = Instant::now();
        let mut block = holding(now, vec![1, 2, 3]);
        assert!(block.take(7, now).is_some());
        tokio::time::advance(LEASE).await;
        assert_eq!(
            block.take(8, Instant::now()),
            None,
            "past the lease the rows may be another's"
        );
        let renewed_at = Instant::now();
        let _ = block.renewed(renewed_at, LEASE, false, renewed_at);
        assert!(block.take(8, Instant::now()).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_fetch_brings_spare_slots_and_a_short_one_stops_keeping_them() {
        let now = Instant::now();
        let mut block = joined(now);
        assert_eq!(block.wanted(3, now), 3 + SPARE);
        let epoch = block.epoch();
        // Asked for 3 + SPARE, the cluster had 5 left.
        block.fill(epoch, vec![1, 2, 3, 4, 5], 3 + SPARE, now, LEASE);
        assert_eq!(block.wanted(3, now), 3, "short: no spare is fetched");
        let slot = block.take(1, now).expect("a slot");
        let back = block.release(1, slot, now);
        assert_eq!(
            back.slots.len(),
            5,
            "short: a departure gives back every spare slot at once"
        );
        tokio::time::advance(LEASE).await;
        assert_eq!(
            block.wanted(3, Instant::now()),
            3 + SPARE,
            "no longer short a lease later"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn departures_give_back_the_surplus_beyond_twice_the_spare() {
        let now = Instant::now();
        let count = 3 * SPARE;
        let mut block = holding(now, (1..=u32::try_from(count).expect("small")).collect());
        let held: Vec<(u64, u32)> = (0..count as u64)
            .map(|conn| (conn, block.take(conn, now).expect("a slot")))
            .collect();
        let mut given: Vec<u32> = Vec::new();
        for (conn, slot) in held {
            given.extend(block.release(conn, slot, now).slots);
        }
        assert_eq!(
            given.len() + block.unheld(),
            count,
            "every slot is somewhere"
        );
        assert!(block.unheld() <= 2 * SPARE, "spare {}", block.unheld());
        assert!(given.len() >= count - 2 * SPARE);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_gateway_gives_back_every_spare_slot_at_its_renewal() {
        let now = Instant::now();
        let mut block = holding(now, (1..=10).collect());
        let slot = block.take(1, now).expect("a slot");
        tokio::time::advance(Duration::from_secs(3)).await;
        let first = block.renewed(Instant::now(), LEASE, false, Instant::now());
        assert!(first.slots.is_empty(), "taken lately: the spares are kept");
        tokio::time::advance(Duration::from_secs(3)).await;
        let second = block.renewed(Instant::now(), LEASE, false, Instant::now());
        assert_eq!(second.slots.len(), 9, "idle: every spare slot goes back");
        assert_eq!(block.held(), vec![slot], "the one in use stays");
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_cluster_makes_every_gateway_give_back_its_spares_at_renewal() {
        let now = Instant::now();
        let mut block = holding(now, (1..=10).collect());
        block.take(1, now).expect("a slot");
        let back = block.renewed(now, LEASE, true, now);
        assert_eq!(back.slots.len(), 9);
        assert_eq!(block.wanted(1, now), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn after_joining_again_nothing_of_the_earlier_epoch_counts() {
        let now = Instant::now();
        let mut block = joined(now);
        let old = block.epoch();
        block.fill(old, vec![1, 2], 2, now, LEASE);
        let slot = block.take(1, now).expect("a slot");
        block.reset(Some((now, LEASE)));
        assert_eq!(block.release(1, slot, now), Surplus::default());
        block.fill(old, vec![3], 1, now, LEASE);
        assert!(
            block.held().is_empty(),
            "freed by the join: {:?}",
            block.held()
        );
        assert_eq!(block.take(2, now), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_give_back_from_before_a_renewal_is_of_another_epoch() {
        let now = Instant::now();
        let mut block = holding(now, vec![1]);
        let before = block.surplus(0);
        assert_eq!(before.slots, vec![1]);
        let _ = block.renewed(now, LEASE, false, now);
        assert_ne!(before.epoch, block.epoch(), "the renewal freed it already");
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_holder_gives_a_slot_back() {
        let now = Instant::now();
        let mut block = holding(now, vec![1, 2]);
        let slot = block.take(1, now).expect("a slot");
        let _ = block.release(2, slot, now);
        assert!(block.held().contains(&slot));
        assert_eq!(block.unheld(), 1, "still in use by connection 1");
        let _ = block.release(1, slot, now);
        assert_eq!(block.unheld(), 2);
        let _ = block.release(1, slot, now);
        assert_eq!(block.unheld(), 2, "a second give-back finds nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn a_left_gateway_hands_out_nothing() {
        let now = Instant::now();
        let mut block = holding(now, vec![1]);
        block.reset(None);
        assert!(!block.lease_runs(now));
        assert_eq!(block.take(1, now), None);
    }
}
