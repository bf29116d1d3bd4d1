//! `model_call`: the pattern every model-backed operator shares. Each record becomes one or more
//! requests to the process's model server; the operator keeps the capability of each record
//! while its requests are in flight (so its epoch cannot complete), is woken by a
//! `SyncActivator` when answers come back, and emits `finish(record, answers)` at the record's
//! time. At most `max_in_flight` records are in flight; the rest wait in order, counted in the
//! operator's [`Backlog`] so that a producer upstream can hold back.

use super::Time;
pub use crate::serve::Ask;
use crate::serve::{GenAnswer, GenError, GenRequest, ModelClient};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::StreamVec;
use timely::scheduling::Activator;

/// Most requests a record may fan out to (tickets encode the index in the low bits).
const MAX_ASKS: u64 = 64;

/// Records given to a model-backed operator and not yet sent to the model server: a producer
/// upstream in the same worker adds what it emits, the operator takes off what it sends, so a
/// producer that could emit a great many at once (a round's re-rating) emits as they go: it
/// waits while the line is at its limit and is woken when it falls under it.
#[derive(Clone, Debug, Default)]
pub struct Backlog(Rc<BacklogState>);

#[derive(Debug, Default)]
struct BacklogState {
    waiting: Cell<usize>,
    /// The producer to wake, and the count under which it can go on.
    producer: RefCell<Option<(Activator, usize)>>,
}

impl Backlog {
    /// `n` more records emitted towards the operator.
    pub fn add(&self, n: usize) {
        self.0.waiting.set(self.0.waiting.get() + n);
    }

    /// Records emitted and not yet sent to the server.
    pub fn get(&self) -> usize {
        self.0.waiting.get()
    }

    /// `n` of them sent to the server (or otherwise taken off the line); wakes the producer
    /// when the line falls under its limit.
    pub fn sent(&self, n: usize) {
        let before = self.0.waiting.get();
        let after = before.saturating_sub(n);
        self.0.waiting.set(after);
        if let Some((producer, limit)) = self.0.producer.borrow().as_ref() {
            if before >= *limit && after < *limit {
                producer.activate();
            }
        }
    }

    /// Wakes `producer` whenever the line falls under `limit`.
    pub fn wake_under(&self, limit: usize, producer: Activator) {
        *self.0.producer.borrow_mut() = Some((producer, limit));
    }
}

struct InFlight<D> {
    cap: Capability<Time>,
    record: D,
    answers: Vec<Option<GenAnswer>>,
    missing: usize,
}

/// The operator. `ask` may return no request (then `finish` gets no answers at once).
/// `backlog` is decreased by one for every record taken from the waiting line.
pub fn model_call<'s, D, O, A, F>(
    records: StreamVec<'s, Time, D>,
    name: &str,
    client: ModelClient,
    max_in_flight: usize,
    backlog: Backlog,
    mut ask: A,
    mut finish: F,
) -> StreamVec<'s, Time, O>
where
    D: Clone + 'static,
    O: Clone + 'static,
    A: FnMut(&D) -> Vec<Ask> + 'static,
    F: FnMut(D, Vec<GenAnswer>) -> Option<O> + 'static,
{
    let scope = records.scope();
    records.unary(Pipeline, name, move |_cap, info| {
        let wake = scope.worker().sync_activator_for(info.address.to_vec());
        let (reply, answers) = crossbeam_channel::unbounded::<GenAnswer>();
        let mut waiting: VecDeque<(Capability<Time>, D)> = VecDeque::new();
        let mut in_flight: HashMap<u64, InFlight<D>> = HashMap::new();
        let mut next_record: u64 = 0;
        move |input, output| {
            input.for_each_stamp(|cap, data| {
                let Some(cap) = cap.retain_least(output.output_index()) else {
                    return;
                };
                for d in data.flat_map(|d| d.drain(..)) {
                    waiting.push_back((cap.clone(), d));
                }
            });
            loop {
                // Answers first: they free room for more requests.
                while let Ok(answer) = answers.try_recv() {
                    let (id, idx) = (
                        answer.ticket / MAX_ASKS,
                        (answer.ticket % MAX_ASKS) as usize,
                    );
                    let done = match in_flight.get_mut(&id) {
                        Some(f) if f.answers.get(idx).is_some_and(|a| a.is_none()) => {
                            f.answers[idx] = Some(answer);
                            f.missing -= 1;
                            f.missing == 0
                        }
                        _ => false,
                    };
                    if done {
                        if let Some(f) = in_flight.remove(&id) {
                            let answers = f.answers.into_iter().flatten().collect();
                            if let Some(out) = finish(f.record, answers) {
                                output.session(&f.cap).give(out);
                            }
                        }
                    }
                }
                if in_flight.len() >= max_in_flight.max(1) {
                    break;
                }
                let Some((cap, record)) = waiting.pop_front() else {
                    break;
                };
                backlog.sent(1);
                let asks = ask(&record);
                let asks = &asks[..asks.len().min(MAX_ASKS as usize)];
                if asks.is_empty() {
                    if let Some(out) = finish(record, Vec::new()) {
                        output.session(&cap).give(out);
                    }
                    continue;
                }
                let id = next_record;
                next_record += 1;
                let mut failed = Vec::new();
                for (i, a) in asks.iter().enumerate() {
                    let ticket = id * MAX_ASKS + i as u64;
                    let request = GenRequest {
                        ticket,
                        ask: a.clone(),
                        reply: reply.clone(),
                        wake: Some(wake.clone()),
                        stream: None,
                    };
                    // The only way a send fails: the server is gone.
                    if client.send(request).is_err() {
                        failed.push(GenAnswer {
                            ticket,
                            result: Err(GenError::Stopped),
                            choice: None,
                            choice_probs: None,
                            prompt_tokens: 0,
                            new_tokens: 0,
                        });
                    }
                }
                in_flight.insert(
                    id,
                    InFlight {
                        cap,
                        record,
                        answers: vec![None; asks.len()],
                        missing: asks.len(),
                    },
                );
                // A stopped server answers nothing: deliver its failures ourselves.
                for f in failed {
                    let _ = reply.send(f);
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::chat::Message;
    use crate::model::sampling::Sampling;
    use timely::dataflow::operators::capture::Extract;
    use timely::dataflow::operators::vec::Input;
    use timely::dataflow::operators::{Capture, Probe};
    use timely::dataflow::InputHandleVec;

    fn ask(text: String) -> Ask {
        Ask {
            model: "m".into(),
            messages: vec![Message::user(text)],
            max_new_tokens: 4,
            sampling: Sampling::greedy(),
            choose: None,
            raw_prompt: None,
            choose_after: None,
        }
    }

    /// Record `r` asks `r % 3` questions ("r.0", "r.1"); the server answers each slowly, out of
    /// the operator's sight, and fails "7.0". With two records in flight at most, every record
    /// still comes out exactly once, at its own time, with its answers in the order it asked
    /// them (the failure included), and one that asks nothing comes out with none.
    #[test]
    fn each_record_comes_out_once_at_its_time_with_its_answers_in_order() {
        let client = ModelClient::answering(|r| {
            std::thread::sleep(std::time::Duration::from_millis(3));
            let q = &r.ask.messages[0].content;
            if q == "7.0" {
                Err(GenError::Model("out of memory".into()))
            } else {
                Ok(format!("re {q}"))
            }
        });
        let captured = timely::execute_directly(move |worker| {
            let mut input: InputHandleVec<Time, u64> = InputHandleVec::new();
            let (probe, captured) = worker.dataflow(|scope| {
                let out = model_call(
                    scope.input_from(&mut input),
                    "Test",
                    client.clone(),
                    2,
                    Backlog::default(),
                    |r: &u64| (0..r % 3).map(|i| ask(format!("{r}.{i}"))).collect(),
                    |r, answers: Vec<GenAnswer>| {
                        let texts: Vec<String> = answers
                            .into_iter()
                            .map(|a| a.result.unwrap_or_else(|e| format!("error: {e}")))
                            .collect();
                        Some((r, texts))
                    },
                );
                let (probe, out) = out.probe();
                (probe, out.capture())
            });
            for r in 0..6 {
                input.send(r);
            }
            input.advance_to(1);
            for r in 6..9 {
                input.send(r);
            }
            input.close();
            worker.step_while(|| !probe.done());
            captured
        });
        let expected = |rs: std::ops::Range<u64>| -> Vec<(u64, Vec<String>)> {
            rs.map(|r| {
                let texts = (0..r % 3)
                    .map(|i| match (r, i) {
                        (7, 0) => "error: the model failed: out of memory".to_owned(),
                        _ => format!("re {r}.{i}"),
                    })
                    .collect();
                (r, texts)
            })
            .collect()
        };
        assert_eq!(
            captured.extract(),
            vec![(0, expected(0..6)), (1, expected(6..9))]
        );
    }
}
