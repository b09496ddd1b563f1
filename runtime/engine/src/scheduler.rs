//! Continuous batching: which sequences run in the next step and how many tokens each feeds.
//!
//! Every step takes one decode token from each running sequence, then prefill chunks (a partly
//! prefilled running sequence first, then waiting ones in arrival order) until the step's token
//! budget is spent. New sequences join between steps; a finished or cancelled one gives its
//! blocks back at once. When a running sequence needs a block and none is free, the newest
//! running sequence is preempted: its blocks are freed and it goes back to the front of the
//! queue to be recomputed later (its tokens so far are kept), so running out of KV memory slows
//! things down but never fails a request.
//!
//! Admission is fair across groups (the engine's callers: deployments): the next waiting
//! sequence to start is the oldest of the group with the fewest running, so one tenant's crowd
//! of streams queues behind its own requests, not in front of everyone else's.
//!
//! Pure bookkeeping over token counts and block tables: the engine owns the tensors.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::kv_cache::BlockAllocator;

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Sequences running at once.
    pub max_running: usize,
    /// Tokens one step may feed through the network (decode tokens + prefill chunks).
    pub max_step_tokens: usize,
}

/// A sequence as the scheduler sees it, with the engine's own data in `payload`.
pub struct Entry<P> {
    pub id: u64,
    /// Who the sequence is for; admission shares the batch fairly between groups.
    pub group: Arc<str>,
    /// Prompt and generated tokens so far.
    pub tokens: Vec<u32>,
    /// How many of `tokens` have their K/V in the cache.
    pub computed: usize,
    pub blocks: Vec<u32>,
    pub payload: P,
}

/// One sequence's share of a step: feed `tokens[start..start + len]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduled {
    pub id: u64,
    pub start: usize,
    pub len: usize,
    /// The chunk reaches the last known token, so the step yields its next-token logits.
    pub sample: bool,
}

pub struct Scheduler<P> {
    config: SchedulerConfig,
    blocks: BlockAllocator,
    waiting: VecDeque<Entry<P>>,
    /// Oldest first; the last one is the first to be preempted.
    running: Vec<Entry<P>>,
    preemptions: u64,
}

impl<P> Scheduler<P> {
    pub fn new(config: SchedulerConfig, total_blocks: usize) -> Self {
        assert!(config.max_step_tokens >= config.max_running, "every running sequence must be able to decode");
        Self {
            config,
            blocks: BlockAllocator::new(total_blocks),
            waiting: VecDeque::new(),
            running: Vec::new(),
            preemptions: 0,
        }
    }

    pub fn add(&mut self, id: u64, tokens: Vec<u32>, payload: P) {
        self.add_in(Arc::from(""), id, tokens, payload);
    }

    /// Queues a sequence on behalf of `group`.
    pub fn add_in(&mut self, group: Arc<str>, id: u64, tokens: Vec<u32>, payload: P) {
        debug_assert!(!tokens.is_empty());
        self.waiting.push_back(Entry { id, group, tokens, computed: 0, blocks: Vec::new(), payload });
    }

    /// The waiting sequence to start next: the oldest of the group with the fewest running.
    fn next_waiting(&self, running_per_group: &HashMap<Arc<str>, usize>) -> Option<usize> {
        let mut seen: Vec<&Arc<str>> = Vec::new();
        let mut best: Option<(usize, usize)> = None; // (running in its group, index)
        for (i, e) in self.waiting.iter().enumerate() {
            if seen.contains(&&e.group) {
                continue;
            }
            seen.push(&e.group);
            let running = running_per_group.get(&e.group).copied().unwrap_or(0);
            if best.is_none_or(|(r, _)| running < r) {
                best = Some((running, i));
            }
            if running == 0 {
                break;
            }
        }
        best.map(|(_, i)| i)
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn blocks(&self) -> &BlockAllocator {
        &self.blocks
    }

    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    pub fn get(&self, id: u64) -> Option<&Entry<P>> {
        self.running.iter().find(|e| e.id == id).or_else(|| self.waiting.iter().find(|e| e.id == id))
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut Entry<P>> {
        match self.running.iter().position(|e| e.id == id) {
            Some(i) => Some(&mut self.running[i]),
            None => self.waiting.iter_mut().find(|e| e.id == id),
        }
    }

    /// Removes a sequence wherever it is and frees its blocks.
    pub fn remove(&mut self, id: u64) -> Option<Entry<P>> {
        let mut entry = match self.running.iter().position(|e| e.id == id) {
            Some(i) => self.running.remove(i),
            None => {
                let i = self.waiting.iter().position(|e| e.id == id)?;
                self.waiting.remove(i)?
            }
        };
        self.blocks.release(&mut entry.blocks);
        Some(entry)
    }

    /// Removes (and frees) every sequence `gone` says is no longer wanted.
    pub fn remove_where(&mut self, mut gone: impl FnMut(&P) -> bool) -> Vec<Entry<P>> {
        let ids: Vec<u64> =
            self.running.iter().chain(self.waiting.iter()).filter(|e| gone(&e.payload)).map(|e| e.id).collect();
        ids.into_iter().filter_map(|id| self.remove(id)).collect()
    }

    /// Every sequence, running and waiting.
    pub fn entries(&self) -> impl Iterator<Item = &Entry<P>> {
        self.running.iter().chain(self.waiting.iter())
    }

    fn preempt_newest(&mut self) -> u64 {
        let mut victim = self.running.pop().expect("a running sequence to preempt");
        self.blocks.release(&mut victim.blocks);
        victim.computed = 0;
        self.preemptions += 1;
        let id = victim.id;
        self.waiting.push_front(victim);
        id
    }

    /// Plans the next step, allocating the blocks it needs. Empty only when nothing is left to do.
    pub fn schedule(&mut self) -> Vec<Scheduled> {
        let mut plan = Vec::new();
        let mut budget = self.config.max_step_tokens;
        let mut i = 0;
        while i < self.running.len() {
            let e = &self.running[i];
            let pending = e.tokens.len() - e.computed;
            let len = pending.min(budget);
            if len == 0 {
                i += 1;
                continue;
            }
            let e = &mut self.running[i];
            if self.blocks.grow(&mut e.blocks, e.computed + len) {
                plan.push(Scheduled { id: e.id, start: e.computed, len, sample: len == pending });
                budget -= len;
                i += 1;
            } else {
                // Retry the same index; if this sequence was the newest, it is gone and the loop ends.
                self.preempt_newest();
            }
        }
        let mut running_per_group: HashMap<Arc<str>, usize> = HashMap::new();
        for e in &self.running {
            *running_per_group.entry(e.group.clone()).or_default() += 1;
        }
        while budget > 0 && self.running.len() < self.config.max_running {
            let Some(next) = self.next_waiting(&running_per_group) else { break };
            let candidate = &mut self.waiting[next];
            let len = (candidate.tokens.len() - candidate.computed).min(budget);
            if !self.blocks.grow(&mut candidate.blocks, candidate.computed + len) {
                break;
            }
            let entry = self.waiting.remove(next).expect("index is in range");
            *running_per_group.entry(entry.group.clone()).or_default() += 1;
            plan.push(Scheduled {
                id: entry.id,
                start: entry.computed,
                len,
                sample: len == entry.tokens.len() - entry.computed,
            });
            budget -= len;
            self.running.push(entry);
        }
        plan
    }

    /// Records that a step fed `len` tokens of `id`.
    pub fn advance(&mut self, id: u64, len: usize) {
        if let Some(e) = self.get_mut(id) {
            e.computed += len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::BLOCK_SIZE;

    fn sched(max_running: usize, max_step_tokens: usize, blocks: usize) -> Scheduler<()> {
        Scheduler::new(SchedulerConfig { max_running, max_step_tokens }, blocks)
    }

    /// Runs a step as the engine would: feed, then append one sampled token where asked.
    fn step(s: &mut Scheduler<()>) -> Vec<Scheduled> {
        let plan = s.schedule();
        for p in &plan {
            s.advance(p.id, p.len);
            if p.sample {
                s.get_mut(p.id).unwrap().tokens.push(7);
            }
        }
        plan
    }

    #[test]
    fn admission_alternates_between_groups_whatever_the_arrival_order() {
        let mut s = sched(4, 64, 64);
        let (crowd, other): (Arc<str>, Arc<str>) = (Arc::from("crowd"), Arc::from("other"));
        for id in 0..6 {
            s.add_in(crowd.clone(), id, vec![1; 2], ());
        }
        s.add_in(other.clone(), 10, vec![1; 2], ());
        s.add_in(other.clone(), 11, vec![1; 2], ());
        let started: Vec<u64> = step(&mut s).iter().map(|p| p.id).collect();
        // Two slots each, oldest first within a group, though the crowd arrived first.
        assert_eq!(started, [0, 10, 1, 11]);
    }

    #[test]
    fn decodes_go_first_and_prefill_is_chunked_under_the_budget() {
        let mut s = sched(8, 10, 64);
        s.add(1, vec![1; 4], ());
        assert_eq!(step(&mut s), [Scheduled { id: 1, start: 0, len: 4, sample: true }]);
        s.add(2, vec![1; 25], ());
        assert_eq!(
            step(&mut s),
            [Scheduled { id: 1, start: 4, len: 1, sample: true }, Scheduled { id: 2, start: 0, len: 9, sample: false }]
        );
        assert_eq!(step(&mut s)[1], Scheduled { id: 2, start: 9, len: 9, sample: false });
        assert_eq!(step(&mut s)[1], Scheduled { id: 2, start: 18, len: 7, sample: true });
        assert_eq!(step(&mut s).len(), 2, "both decode now");
    }

    #[test]
    fn no_more_than_max_running_sequences_run() {
        let mut s = sched(2, 100, 64);
        for id in 0..3 {
            s.add(id, vec![1; 3], ());
        }
        assert_eq!(step(&mut s).len(), 2);
        assert_eq!((s.running(), s.waiting()), (2, 1));
        s.remove(0).unwrap();
        assert_eq!(step(&mut s).len(), 2, "the waiting one joins when a slot frees");
    }

    #[test]
    fn running_out_of_blocks_preempts_the_newest_and_it_resumes_later() {
        // Two blocks in all: each sequence fills one block with its prompt.
        let mut s = sched(4, 64, 2);
        s.add(1, vec![1; BLOCK_SIZE], ());
        s.add(2, vec![1; BLOCK_SIZE], ());
        assert_eq!(step(&mut s).len(), 2);
        // 1 needs a second block for its next token: 2 is preempted, its blocks freed.
        let plan = step(&mut s);
        assert_eq!(plan, [Scheduled { id: 1, start: BLOCK_SIZE, len: 1, sample: true }]);
        assert_eq!((s.preemptions(), s.running(), s.waiting()), (1, 1, 1));
        let preempted = s.get(2).unwrap();
        assert_eq!((preempted.computed, preempted.tokens.len(), preempted.blocks.len()), (0, BLOCK_SIZE + 1, 0));
        s.remove(1).unwrap();
        // It is recomputed from scratch: prompt and the token it had generated.
        assert_eq!(step(&mut s), [Scheduled { id: 2, start: 0, len: BLOCK_SIZE + 1, sample: true }]);
    }

    #[test]
    fn removing_a_sequence_frees_its_blocks_wherever_it_is() {
        let mut s = sched(1, 64, 8);
        s.add(1, vec![1; 20], ());
        s.add(2, vec![1; 20], ());
        step(&mut s);
        assert_eq!(s.blocks().used(), 2);
        let gone = s.remove_where(|_| true);
        assert_eq!(gone.len(), 2);
        assert!(s.is_idle() && s.blocks().used() == 0);
        assert!(s.schedule().is_empty());
    }
}
