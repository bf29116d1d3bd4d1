//! Admission: which queued requests of one model version enter which of its running batches
//! before a decode step, and which start batches of their own.
//!
//! A version runs up to [`ServerConfig::max_running_batches`](super::ServerConfig) batches at
//! once, one per shared prompt prefix, all stepped in one forward pass. One version often
//! serves prompts of several kinds (in a loop given one model for both steps, instruction
//! prompts behind the backward template and rating prompts behind the ~450-token rating
//! template); in one batch they share no long prefix, so each kind's template would be
//! prefilled for every row. Here a request joins the running batch whose prefix it should use
//! ([`Generator::should_join`](crate::model::generate::Generator::should_join)); the others are
//! grouped by the prompt head they share ([`Limits::min_shared_prefix`] tokens or more) into
//! new batches, each of which computes its shared prefix once; prompts that share no long head
//! with any other go together in one batch, as they would alone.
//!
//! Requests are taken in their order within the step's limits: rows, KV budget, the prompt
//! tokens prefilled while other rows wait ([`Limits::max_join_tokens`]). A request that needs a
//! batch of its own when no more can run closes the open batches to newcomers, so one drains
//! and it starts next: no request is starved by batches that are always being refilled.
//!
//! The plan is computed on plain facts ([`OpenBatch`], [`Fit`] and a kept-prefix length per
//! request) so it is tested without a model.

use crate::model::generate::{common_len, steps_of, KvProjection, Request};

/// A running batch as admission sees it.
#[derive(Debug, Clone, Copy)]
pub(super) struct OpenBatch {
    /// Tokens of the prefix its rows share.
    pub prefix_len: usize,
    /// Its rows as they stand, projected to their longest.
    pub projection: KvProjection,
    /// Its rows.
    pub rows: usize,
    /// Whether it is closed to newcomers until it drains.
    pub closed: bool,
}

/// How a queued request fits a running batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fit {
    /// It should join (it uses the batch's prefix and has no longer one to gain elsewhere).
    Join,
    /// It could join, but shares a longer prefix with other prompts: a batch of its own
    /// computes that prefix once.
    Own,
    /// It cannot join (it does not start with the batch's prefix).
    No,
}

/// The bounds of one step's admission for one version.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// Most rows over all the version's batches.
    pub max_rows: usize,
    /// Most batches the version runs at once.
    pub max_batches: usize,
    /// Most prompt tokens (past the prefix) prefilled this step while other rows wait; the
    /// first request taken always goes.
    pub max_join_tokens: usize,
    /// KV slots the version's batches may come to hold; its first row always runs.
    pub kv_tokens: usize,
    /// Shortest head two prompts must share to go in one batch for it.
    pub min_shared_prefix: usize,
    /// Whether the KV cache is paged ([`KvProjection::new`]).
    pub paged: bool,
}

/// A new batch to start.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Start {
    /// Its requests, in queue order.
    pub members: Vec<usize>,
    /// For a batch of one, the head its prompt shares with prompts elsewhere (a running row, a
    /// request still queued), which it computes and keeps as a prefix for them; else 0 (a
    /// batch of several computes the head its own prompts share).
    pub head: usize,
}

/// What one step admits: positions in the queue as given.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Plan {
    /// For each running batch (in the order given), the requests that join it.
    pub joins: Vec<Vec<usize>>,
    /// New batches, in queue order of their first request.
    pub starts: Vec<Start>,
    /// Running batches to close to newcomers.
    pub close: Vec<usize>,
}

/// A new batch being gathered.
struct Gathering {
    members: Vec<usize>,
    /// The head its first prompt shares with prompts elsewhere ([`Start::head`]).
    head: usize,
    /// Whether its members share no long head (prompts that would be alone otherwise).
    loose: bool,
    /// Their longest prompt and the head they all share.
    longest: usize,
    common: usize,
}

impl Gathering {
    /// Its KV projection with `extra` (the queue position of one more member) added: rows
    /// padded to the longest past the prefix the batch will use.
    fn projection(&self, queue: &[&Request], kept: &[usize], extra: usize, paged: bool) -> Tokens {
        let r = queue[extra];
        let n = self.members.len() + 1;
        let longest = self.longest.max(r.prompt_ids.len());
        let seed = self.members.first().map_or(r, |&m| queue[m]);
        let common = self.common.min(common_len(&seed.prompt_ids, &r.prompt_ids));
        // A lone prompt uses what is kept of it or computes the head it shares elsewhere;
        // several compute their common head (a loose batch's is short: counted as none).
        let prefix = if n == 1 {
            kept[extra].max(self.head)
        } else if self.loose {
            0
        } else {
            common.min(longest.saturating_sub(1))
        };
        let mut p = KvProjection::new(paged);
        for &m in self.members.iter().chain([&extra]) {
            p.add(longest.saturating_sub(prefix), steps_of(queue[m]));
        }
        Tokens {
            kv: p.tokens(),
            longest,
            common,
        }
    }
}

/// A projection with what produced it.
struct Tokens {
    kv: usize,
    longest: usize,
    common: usize,
}

/// What one step admits from `queue` (oldest first) into `batches`: `fit(b, r)` says how
/// request `r` fits running batch `b`, `kept[r]` is the longest kept prefix request `r` could
/// start from, `shared[r]` the longest head it shares with a running row (0 when under
/// [`Limits::min_shared_prefix`]).
pub(super) fn plan(
    queue: &[&Request],
    batches: &[OpenBatch],
    kept: &[usize],
    shared: &[usize],
    fit: impl Fn(usize, &Request) -> Fit,
    limits: &Limits,
) -> Plan {
    let mut plan = Plan {
        joins: vec![Vec::new(); batches.len()],
        ..Plan::default()
    };
    let decoding: usize = batches.iter().map(|b| b.rows).sum();
    let mut rows = decoding;
    // Each running batch's projection with its newcomers, and the widest newcomer past its
    // prefix (newcomers are prefilled together, padded to the widest).
    let mut joined: Vec<(KvProjection, usize)> =
        batches.iter().map(|b| (b.projection, 0)).collect();
    let mut gathering: Vec<(Gathering, usize)> = Vec::new();
    let mut kv: usize = batches.iter().map(|b| b.projection.tokens()).sum();
    let mut tokens = 0;
    let min = limits.min_shared_prefix;
    for (q, r) in queue.iter().enumerate() {
        if rows >= limits.max_rows {
            break;
        }
        let first = rows == 0;
        let fits = |old: usize, new: usize| first || kv - old + new <= limits.kv_tokens;
        let over_join_budget = |new_tokens: usize| {
            decoding > 0 && tokens > 0 && tokens + new_tokens > limits.max_join_tokens
        };
        let fits_of: Vec<Fit> = (0..batches.len()).map(|b| fit(b, r)).collect();
        // A running batch it should join.
        if let Some(b) = (0..batches.len()).find(|&b| !batches[b].closed && fits_of[b] == Fit::Join)
        {
            let new_tokens = r.prompt_ids.len().saturating_sub(batches[b].prefix_len);
            if over_join_budget(new_tokens) {
                break;
            }
            let (projection, widest) = joined[b];
            let width = widest.max(new_tokens);
            let mut with = batches[b].projection;
            for &m in plan.joins[b].iter().chain([&q]) {
                with.add(width, steps_of(queue[m]));
            }
            if !fits(projection.tokens(), with.tokens()) {
                break;
            }
            kv = kv - projection.tokens() + with.tokens();
            joined[b] = (with, width);
            plan.joins[b].push(q);
            tokens += new_tokens;
            rows += 1;
            continue;
        }
        // A new batch: the one gathering prompts of its head, or one of its own when it shares
        // a long head with anyone (a kept prefix, a running row, a later request), or the one of
        // prompts that share none.
        let len = r.prompt_ids.len();
        let head = |g: &Gathering| {
            !g.loose && common_len(&queue[g.members[0]].prompt_ids, &r.prompt_ids) >= min
        };
        // The head it shares with a running row or a later request.
        let lone_head = (queue[q + 1..].iter().take(limits.max_rows))
            .map(|o| common_len(&o.prompt_ids, &r.prompt_ids))
            .max()
            .unwrap_or(0)
            .max(shared[q])
            .min(len.saturating_sub(1));
        let own = kept[q] >= min || fits_of.contains(&Fit::Own) || lone_head >= min;
        let target = match gathering.iter().position(|(g, _)| head(g)) {
            Some(g) => Some(g),
            None if !own => gathering.iter().position(|(g, _)| g.loose),
            None => None,
        };
        // What it adds to the step's prefill: past the head it shares with its batch's first
        // prompt (computed once for the batch), else past what is kept of it.
        let shared = match target {
            Some(g) if !gathering[g].0.loose => {
                let seed = &queue[gathering[g].0.members[0]].prompt_ids;
                common_len(seed, &r.prompt_ids).min(len.saturating_sub(1))
            }
            _ => 0,
        };
        let new_tokens = len.saturating_sub(shared.max(kept[q]));
        if over_join_budget(new_tokens) {
            break;
        }
        match target {
            Some(g) => {
                let (gather, old) = &gathering[g];
                let with = gather.projection(queue, kept, q, limits.paged);
                if !fits(*old, with.kv) {
                    break;
                }
                kv = kv - *old + with.kv;
                let (gather, old) = &mut gathering[g];
                gather.members.push(q);
                (gather.longest, gather.common, *old) = (with.longest, with.common, with.kv);
            }
            None => {
                let open = batches.len() + gathering.len();
                if open >= limits.max_batches.max(1) {
                    // No batch can start for it: the open ones drain so that one can.
                    plan.close = (0..batches.len()).filter(|&b| !batches[b].closed).collect();
                    break;
                }
                let gather = Gathering {
                    members: Vec::new(),
                    head: if lone_head >= min { lone_head } else { 0 },
                    loose: !own,
                    longest: 0,
                    common: usize::MAX,
                };
                let with = gather.projection(queue, kept, q, limits.paged);
                if !fits(0, with.kv) {
                    break;
                }
                kv += with.kv;
                let mut gather = gather;
                gather.members.push(q);
                (gather.longest, gather.common) = (with.longest, with.common);
                gathering.push((gather, with.kv));
            }
        }
        tokens += new_tokens;
        rows += 1;
    }
    plan.starts = (gathering.into_iter())
        .map(|(g, _)| Start {
            head: if g.members.len() == 1 { g.head } else { 0 },
            members: g.members,
        })
        .collect();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: usize = 4;

    /// A prompt: `head` repeated `n` times then `tail` (token ids), asking `new` tokens.
    fn prompt(head: u32, n: usize, tail: &[u32], new: usize) -> Request {
        let mut ids = vec![head; n];
        ids.extend_from_slice(tail);
        Request::greedy(ids, new)
    }

    fn limits() -> Limits {
        Limits {
            max_rows: 32,
            max_batches: 4,
            max_join_tokens: 1 << 20,
            kv_tokens: usize::MAX,
            min_shared_prefix: MIN,
            paged: true,
        }
    }

    fn refs(q: &[Request]) -> Vec<&Request> {
        q.iter().collect()
    }

    /// [`plan`] for requests that share no head with a running row.
    fn plan_of(
        queue: &[&Request],
        batches: &[OpenBatch],
        kept: &[usize],
        fit: impl Fn(usize, &Request) -> Fit,
        limits: &Limits,
    ) -> Plan {
        plan(queue, batches, kept, &vec![0; queue.len()], fit, limits)
    }

    /// Each new batch's requests.
    fn members(p: &Plan) -> Vec<Vec<usize>> {
        p.starts.iter().map(|s| s.members.clone()).collect()
    }

    /// Two kinds of prompt interleaved, each kind sharing a long head: two batches, each of
    /// one kind, in queue order; prompts sharing no head with anyone go in a third, together.
    #[test]
    fn interleaved_kinds_start_a_batch_each_and_loners_one_together() {
        let q = vec![
            prompt(7, 10, &[1], 4), // kind A
            prompt(9, 12, &[2], 4), // kind B
            prompt(7, 10, &[3], 4), // A
            prompt(5, 1, &[4], 4),  // alone
            prompt(9, 12, &[5], 4), // B
            prompt(6, 1, &[6], 4),  // alone
            prompt(7, 10, &[7], 4), // A
        ];
        let p = plan_of(&refs(&q), &[], &[0; 7], |_, _| Fit::No, &limits());
        assert_eq!(members(&p), vec![vec![0, 2, 6], vec![1, 4], vec![3, 5]]);
        assert!(p.close.is_empty() && p.joins.is_empty());
    }

    /// With the prefix cache off (no head long enough), everything goes in one batch, as a
    /// server of one batch per version did.
    #[test]
    fn without_a_shared_head_everything_is_one_batch() {
        let q = vec![prompt(7, 10, &[1], 4), prompt(9, 12, &[2], 4)];
        let off = Limits {
            min_shared_prefix: usize::MAX,
            ..limits()
        };
        let p = plan_of(&refs(&q), &[], &[0, 0], |_, _| Fit::No, &off);
        assert_eq!(members(&p), vec![vec![0, 1]]);
    }

    /// A lone request whose prompt starts with a kept prefix gets a batch of its own (to start
    /// from that prefix), not the loners' batch.
    #[test]
    fn a_lone_prompt_with_a_kept_prefix_starts_its_own_batch() {
        let q = vec![
            prompt(5, 1, &[1], 4),
            prompt(9, 12, &[2], 4),
            prompt(6, 1, &[3], 4),
        ];
        let p = plan_of(&refs(&q), &[], &[0, 12, 0], |_, _| Fit::No, &limits());
        assert_eq!(members(&p), vec![vec![0, 2], vec![1]]);
    }

    /// A lone request that shares a long head with a running row starts a batch of its own
    /// that computes that head (for the next prompts that share it to start from), not the
    /// loners' batch; one whose head is shared only by a request left queued does the same.
    #[test]
    fn a_lone_prompt_sharing_a_head_elsewhere_computes_it() {
        let q = vec![prompt(9, 12, &[2], 4), prompt(5, 1, &[4], 4)];
        let p = plan(&refs(&q), &[], &[0, 0], &[12, 0], |_, _| Fit::No, &limits());
        let want = vec![
            Start {
                members: vec![0],
                head: 12,
            },
            Start {
                members: vec![1],
                head: 0,
            },
        ];
        assert_eq!(p.starts, want);
        // Sharing nothing with a running row, the two are loners together.
        let p = plan_of(&refs(&q), &[], &[0, 0], |_, _| Fit::No, &limits());
        assert_eq!(members(&p), vec![vec![0, 1]]);
        assert_eq!(p.starts[0].head, 0);
        // Room for one row: the first goes alone and computes the 10 tokens it shares with the
        // second (all but its last token).
        let q = vec![prompt(7, 10, &[1], 4), prompt(7, 10, &[2], 4)];
        let one = Limits {
            max_rows: 1,
            ..limits()
        };
        let p = plan_of(&refs(&q), &[], &[0, 0], |_, _| Fit::No, &one);
        let want = vec![Start {
            members: vec![0],
            head: 10,
        }];
        assert_eq!(p.starts, want);
    }

    fn running(prefix_len: usize, rows: usize) -> OpenBatch {
        let mut projection = KvProjection::new(true);
        for _ in 0..rows {
            projection.add(8, 8);
        }
        OpenBatch {
            prefix_len,
            projection,
            rows,
            closed: false,
        }
    }

    /// Requests join the running batch they fit; another kind starts its own batch beside it
    /// (it used to close the running batch until it drained).
    #[test]
    fn one_kind_joins_the_running_batch_the_other_starts_beside_it() {
        let q = vec![
            prompt(9, 12, &[2], 4),
            prompt(7, 10, &[1], 4),
            prompt(9, 12, &[3], 4),
        ];
        let batches = [running(10, 3)];
        let fit = |_: usize, r: &Request| {
            if r.prompt_ids[0] == 7 {
                Fit::Join
            } else {
                Fit::No
            }
        };
        let p = plan_of(&refs(&q), &batches, &[0; 3], fit, &limits());
        assert_eq!(p.joins, vec![vec![1]]);
        assert_eq!(members(&p), vec![vec![0, 2]]);
        assert!(p.close.is_empty());
    }

    /// When no more batches can run, a request that needs one of its own waits in its place,
    /// the requests behind it too, and the open batches close so that one drains.
    #[test]
    fn with_every_batch_taken_a_new_kind_waits_and_the_batches_close() {
        let q = vec![
            prompt(7, 10, &[1], 4),
            prompt(9, 12, &[2], 4),
            prompt(7, 10, &[3], 4),
        ];
        let batches = [running(10, 2), running(3, 1)];
        let fit = |b: usize, r: &Request| {
            if b == 0 && r.prompt_ids[0] == 7 {
                Fit::Join
            } else {
                Fit::No
            }
        };
        let two = Limits {
            max_batches: 2,
            ..limits()
        };
        let p = plan_of(&refs(&q), &batches, &[0; 3], fit, &two);
        assert_eq!(p.joins, vec![vec![0], vec![]]);
        assert!(p.starts.is_empty());
        assert_eq!(p.close, vec![0, 1]);
    }

    /// A closed batch takes no one: a request that fits only it waits for a batch of its own.
    #[test]
    fn a_closed_batch_takes_no_newcomer() {
        let q = vec![prompt(7, 10, &[1], 4)];
        let mut closed = running(10, 2);
        closed.closed = true;
        let p = plan_of(&refs(&q), &[closed], &[10], |_, _| Fit::Join, &limits());
        assert_eq!(p.joins, vec![Vec::<usize>::new()]);
        assert_eq!(members(&p), vec![vec![0]]);
    }

    /// While other rows decode, a new batch's prompts count against the step's prefill budget
    /// past the head they share (computed once), so a kind's second prompt goes in beside its
    /// first and the batch starts with their shared prefix; a prompt of another kind counts
    /// whole.
    #[test]
    fn a_new_batch_counts_only_what_its_prompts_do_not_share() {
        let q = vec![
            prompt(9, 600, &[1], 4),
            prompt(9, 600, &[2], 4),
            prompt(5, 600, &[3], 4),
        ];
        let batches = [running(10, 3)];
        let budget = Limits {
            max_join_tokens: 1024,
            ..limits()
        };
        let p = plan_of(&refs(&q), &batches, &[0; 3], |_, _| Fit::No, &budget);
        assert_eq!(members(&p), vec![vec![0, 1]]);
    }

    /// Rows, the join budget and the KV budget each stop admission in queue order.
    #[test]
    fn rows_join_tokens_and_kv_bound_what_goes_in() {
        let q: Vec<Request> = (0..6).map(|i| prompt(7, 10, &[i], 4)).collect();
        let batches = [running(0, 2)];
        let join = |_: usize, _: &Request| Fit::Join;
        let rows = Limits {
            max_rows: 5,
            ..limits()
        };
        assert_eq!(
            plan_of(&refs(&q), &batches, &[0; 6], join, &rows).joins,
            vec![vec![0, 1, 2]]
        );
        // 11 tokens a prompt past a prefix of none: 25 tokens take two, the first always goes.
        let budget = Limits {
            max_join_tokens: 25,
            ..limits()
        };
        assert_eq!(
            plan_of(&refs(&q), &batches, &[0; 6], join, &budget).joins,
            vec![vec![0, 1]]
        );
        let tiny = Limits {
            max_join_tokens: 1,
            ..limits()
        };
        assert_eq!(
            plan_of(&refs(&q), &batches, &[0; 6], join, &tiny).joins,
            vec![vec![0]]
        );
        // Paged, a row of 11 slots + 4 steps holds one block of 64 slots; the two running
        // rows hold one each (8 + 8). Room for five blocks: three newcomers.
        let kv = Limits {
            kv_tokens: 5 * 64,
            ..limits()
        };
        assert_eq!(
            plan_of(&refs(&q), &batches, &[0; 6], join, &kv).joins,
            vec![vec![0, 1, 2]]
        );
        // The version's first row runs whatever the budget; the next waits.
        let none = Limits {
            kv_tokens: 0,
            ..limits()
        };
        let p = plan_of(&refs(&q), &[], &[0; 6], join, &none);
        assert_eq!(members(&p), vec![vec![0]]);
    }
}
