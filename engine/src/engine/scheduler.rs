//! The engine's worker: a continuous-batching scheduler over the paged KV cache.
//!
//! Each step: cancelled sequences leave (their KV blocks freed at once); waiting requests are
//! admitted in order while a batch slot is free and the KV cache has blocks for the whole
//! request (prompt plus `max_new_tokens`, reserved up front so that a running sequence never
//! runs out); then one forward pass runs every running sequence's next rows: a decode token for
//! each sequence past its prompt, and prompt chunks of the others within the step's row budget.
//! Sampled tokens go to their owners as they are chosen; a sequence that stops (EOS or length)
//! or fails (an expert it needed could not be read) frees its blocks, and the others go on.
//! A sequence that asked for its prompt's log-probabilities gets the logits of every prompt row
//! (`Logits::All`) and keeps, per row, the log-probability of the prompt token that follows.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Receiver;
use stevedore_models::{Batch, KvPool, Logits, SeqId};

use super::regroup::{self, Ready, Route, Schedule};
use super::source::StepSource;
use super::{lock, Command, Completion, Event, FinishReason, Inner, Request, Sink};
use crate::forecast::{alone_rows, RowAhead, StepRow};
use crate::record::RecordRow;
use crate::sampling::{log_probs, Sampler};
use crate::text::Detokenizer;
use crate::trace::Phase;

/// One request's state, from submission to its last token.
pub(crate) struct Sequence {
    id: SeqId,
    req: Request,
    sampler: Sampler,
    generated: Vec<u32>,
    /// Prompt tokens already run.
    fed: usize,
    /// With `req.prompt_logprobs`: the log-probability of each prompt token after the first
    /// whose predicting row has run (`fed - 1` entries once a chunk has run).
    prompt_logprobs: Option<Vec<f32>>,
    detok: Option<Detokenizer>,
    sink: Sink,
    cancel: Arc<AtomicBool>,
    submitted: Instant,
    admitted: Option<Instant>,
    first_token: Option<Instant>,
    /// Regrouping: the route of its last token, and the steps since it last ran.
    route: Route,
    waited: usize,
}

impl Sequence {
    pub fn new(
        id: SeqId,
        req: Request,
        text: bool,
        sink: Sink,
        cancel: Arc<AtomicBool>,
        route: Route,
    ) -> Self {
        Sequence {
            route,
            waited: 0,
            id,
            sampler: Sampler::new(req.sampling.clone()),
            prompt_logprobs: req
                .prompt_logprobs
                .then(|| Vec::with_capacity(req.prompt_ids.len().saturating_sub(1))),
            req,
            generated: Vec::new(),
            fed: 0,
            detok: text.then(Detokenizer::new),
            sink,
            cancel,
            submitted: Instant::now(),
            admitted: None,
            first_token: None,
        }
    }

    /// Positions the sequence can reach: its reservation.
    fn positions(&self) -> usize {
        self.req.prompt_ids.len() + self.req.max_new_tokens
    }

    fn prefilled(&self) -> bool {
        self.fed == self.req.prompt_ids.len()
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    fn completion(&mut self, inner: &Inner, reason: FinishReason) -> Completion {
        let now = Instant::now();
        let admitted = self.admitted.unwrap_or(now);
        let first = self.first_token.unwrap_or(now);
        let (text, tail) = match (&inner.text, self.detok.as_mut()) {
            (Some(t), Some(d)) => (t.decode(&self.generated).ok(), d.finish(t).unwrap_or_default()),
            _ => (None, String::new()),
        };
        Completion {
            prompt_tokens: self.req.prompt_ids.len(),
            prompt_logprobs: self.prompt_logprobs.take(),
            generated_ids: std::mem::take(&mut self.generated),
            text,
            tail,
            finish_reason: reason,
            queue_seconds: (admitted - self.submitted).as_secs_f64(),
            prefill_seconds: (first - admitted).as_secs_f64(),
            decode_seconds: (now - first).as_secs_f64(),
        }
    }
}

pub(crate) struct Scheduler {
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    kv: KvPool,
    max_batch: usize,
    max_batch_tokens: usize,
    schedule: Schedule,
}

impl Scheduler {
    pub fn new(kv: KvPool, max_batch: usize, max_batch_tokens: usize, schedule: Schedule) -> Self {
        Scheduler { waiting: VecDeque::new(), running: Vec::new(), kv, max_batch, max_batch_tokens, schedule }
    }

    /// Sequences that may hold KV blocks at once.
    fn resident(&self) -> usize {
        match self.schedule {
            Schedule::Fcfs => self.max_batch,
            Schedule::Regroup { pool, .. } => pool.max(self.max_batch),
        }
    }

    /// The running sequences this step runs (indices, ascending).
    fn choose(&mut self) -> Vec<usize> {
        let max_wait = match self.schedule {
            Schedule::Regroup { max_wait, .. } if self.running.len() > self.max_batch => max_wait,
            _ => return (0..self.running.len()).collect(),
        };
        // Candidates: every decoding sequence, and the prefilling ones whose next chunk fits the
        // row budget left after a full pass of decode rows (a slot given to a prompt that gets no
        // rows would be a slot wasted).
        let mut room = self.max_batch_tokens.saturating_sub(self.max_batch);
        let mut candidates = Vec::with_capacity(self.running.len());
        for (i, s) in self.running.iter().enumerate() {
            if s.prefilled() {
                candidates.push(i);
            } else if room > 0 {
                room = room.saturating_sub(s.req.prompt_ids.len() - s.fed);
                candidates.push(i);
            }
        }
        let ready: Vec<Ready> = candidates
            .iter()
            .map(|&i| {
                let s = &self.running[i];
                Ready { waited: s.waited, prefill: !s.prefilled(), route: &s.route }
            })
            .collect();
        let mut chosen: Vec<usize> =
            regroup::select(&ready, self.max_batch, max_wait).into_iter().map(|k| candidates[k]).collect();
        chosen.sort_unstable();
        for (i, s) in self.running.iter_mut().enumerate() {
            s.waited = if chosen.binary_search(&i).is_ok() { 0 } else { s.waited + 1 };
        }
        chosen
    }

    /// The worker loop: takes commands, steps while there is work, stops on shutdown or when
    /// the engine is gone. Requests still open then fail.
    pub fn run(mut self, inner: &Inner, rx: Receiver<Command>) {
        loop {
            let idle = self.waiting.is_empty() && self.running.is_empty();
            let cmd = if idle { rx.recv().ok() } else { rx.try_recv().ok() };
            match cmd {
                Some(Command::Submit(seq)) => {
                    self.submit(inner, *seq);
                    continue;
                }
                Some(Command::Shutdown) => break,
                None if idle => break,
                None => {}
            }
            self.step(inner);
        }
        for s in self.running.drain(..).chain(self.waiting.drain(..)) {
            s.sink.send(s.id, Event::Failed("the engine stopped before finishing this request".into()));
        }
    }

    fn submit(&mut self, inner: &Inner, mut seq: Sequence) {
        // Nothing to generate and nothing to score: done before it starts.
        if seq.req.max_new_tokens == 0 && !seq.req.prompt_logprobs {
            seq.admitted = Some(Instant::now());
            let c = seq.completion(inner, FinishReason::Length);
            seq.sink.send(seq.id, Event::Finished(c));
            return;
        }
        self.waiting.push_back(seq);
    }

    /// A sequence leaves: its KV blocks and its routing cursor go.
    fn retire(&mut self, inner: &Inner, seq: &Sequence) {
        self.kv.release(seq.id);
        if let Some(f) = &inner.forecaster {
            lock(f).end_sequence(seq.id);
        }
    }

    fn fail(&mut self, inner: &Inner, seq: Sequence, msg: String) {
        self.retire(inner, &seq);
        lock(&inner.stats).requests_failed += 1;
        seq.sink.send(seq.id, Event::Failed(msg));
    }

    fn finish(&mut self, inner: &Inner, mut seq: Sequence, reason: FinishReason) {
        self.retire(inner, &seq);
        lock(&inner.stats).requests_finished += 1;
        let c = seq.completion(inner, reason);
        seq.sink.send(seq.id, Event::Finished(c));
    }

    /// Admits waiting requests in order while a batch slot and KV blocks allow.
    fn admit(&mut self, inner: &Inner) {
        while self.running.len() < self.resident() {
            let Some(front) = self.waiting.front() else { break };
            let positions = front.positions();
            if self.kv.blocks_for(positions) > self.kv.total_blocks() {
                let seq = self.waiting.pop_front().expect("front exists");
                let msg = format!(
                    "the request needs {positions} positions ({} KV blocks of {} tokens, {} bytes), but the KV cache \
                     holds only {} blocks ({} bytes); give it more room (--kv-cache or engine.kv_cache)",
                    self.kv.blocks_for(positions),
                    self.kv.block_size(),
                    KvPool::bytes_for(&inner.model.config, self.kv.block_size(), positions),
                    self.kv.total_blocks(),
                    self.kv.bytes()
                );
                self.fail(inner, seq, msg);
                continue;
            }
            if !self.kv.can_allocate(positions) {
                break; // waits for a running sequence to free its blocks
            }
            let mut seq = self.waiting.pop_front().expect("front exists");
            self.kv.allocate(seq.id, positions).expect("checked above");
            seq.admitted = Some(Instant::now());
            self.running.push(seq);
        }
        self.note_state(inner);
    }

    /// The gauges: sequences running and waiting, KV blocks in use.
    fn note_state(&self, inner: &Inner) {
        let used = self.kv.total_blocks() - self.kv.free_blocks();
        let mut stats = lock(&inner.stats);
        stats.kv_blocks_peak = stats.kv_blocks_peak.max(used);
        stats.kv_blocks_used = used;
        stats.kv_blocks_total = self.kv.total_blocks();
        stats.running = self.running.len();
        stats.waiting = self.waiting.len();
    }

    /// One forward pass over every running sequence. See the module docs.
    fn step(&mut self, inner: &Inner) {
        // Cancelled sequences leave first: their blocks may admit someone now. Their owners
        // hear it (a shared channel may be counting outstanding requests).
        let (cancelled, running): (Vec<Sequence>, Vec<Sequence>) =
            self.running.drain(..).partition(Sequence::cancelled);
        let (gone, waiting): (Vec<Sequence>, Vec<Sequence>) =
            self.waiting.drain(..).partition(Sequence::cancelled);
        self.running = running;
        self.waiting = waiting.into();
        for s in cancelled.into_iter().chain(gone) {
            self.retire(inner, &s);
            lock(&inner.stats).requests_cancelled += 1;
            s.sink.send(s.id, Event::Failed("the request was cancelled".into()));
        }
        self.running.sort_by_key(|s| s.id);
        self.admit(inner);
        if self.running.is_empty() {
            return;
        }

        // Decode tokens first (one row each), then prompt chunks within the row budget.
        let chosen = self.choose();
        let mut batch = Batch::new();
        let mut rows: Vec<(usize, usize, Logits)> = Vec::new(); // (sequence index, rows, logits of)
        let mut budget = self.max_batch_tokens;
        for &i in chosen.iter().filter(|&&i| self.running[i].prefilled()) {
            let s = &self.running[i];
            let pos = s.req.prompt_ids.len() + s.generated.len() - 1;
            batch.push(s.id, pos, &s.generated[s.generated.len() - 1..], Logits::Last);
            rows.push((i, 1, Logits::Last));
            budget = budget.saturating_sub(1);
        }
        for &i in chosen.iter().filter(|&&i| !self.running[i].prefilled()) {
            let s = &self.running[i];
            let take = (s.req.prompt_ids.len() - s.fed).min(budget);
            if take == 0 {
                break;
            }
            let logits = match (s.req.prompt_logprobs, s.fed + take == s.req.prompt_ids.len()) {
                (true, _) => Logits::All,
                (false, true) => Logits::Last,
                (false, false) => Logits::None,
            };
            batch.push(s.id, s.fed, &s.req.prompt_ids[s.fed..s.fed + take], logits);
            rows.push((i, take, logits));
            budget -= take;
        }

        let t0 = Instant::now();
        let horizon = inner.horizon.as_ref().map(|h| lock(h).horizon());
        if let Some(h) = horizon {
            inner.store.set_horizon(h.layers, h.bytes);
        }
        // Next-gate estimates of the first layers from each one-row sequence's embedding.
        let brows = batch.rows();
        let alone = alone_rows(&brows.iter().map(|r| r.seq).collect::<Vec<_>>());
        let at_start = match inner.foresight {
            Some(f) => {
                let tokens: Vec<u32> =
                    (brows.iter().zip(&alone)).filter(|(_, a)| **a).map(|(r, _)| r.token).collect();
                inner.model.estimate_at_start(&tokens, f)
            }
            None => Vec::new(),
        };
        let row_of: Vec<Option<usize>> = alone
            .iter()
            .scan(0usize, |n, &a| {
                let i = *n;
                *n += usize::from(a);
                Some(a.then_some(i))
            })
            .collect();
        let start_ahead = |r: usize| -> RowAhead<'_> {
            let Some(i) = row_of[r] else { return Vec::new() };
            (at_start.iter())
                .map(|g| {
                    let (experts, probs) = g.row(i);
                    (g.moe.0, experts, probs)
                })
                .collect()
        };
        if let Some(f) = &inner.forecaster {
            let step_rows: Vec<StepRow> =
                batch.rows().iter().map(|r| StepRow { seq: r.seq, token: Some(r.token) }).collect();
            let candidates = lock(f).begin_step(&step_rows, start_ahead);
            inner.store.begin_step(&candidates);
        }
        if let Some(r) = lock(&inner.recorder).as_mut() {
            let record: Vec<RecordRow> = batch
                .rows()
                .iter()
                .zip(rows.iter().flat_map(|&(i, n, _)| std::iter::repeat_n(i, n)))
                .map(|(r, i)| RecordRow {
                    seq: r.seq,
                    pos: r.pos,
                    token: r.token,
                    phase: if self.running[i].prefilled() { Phase::Decode } else { Phase::Prefill },
                })
                .collect();
            r.begin_step(&record, inner.model.layers.num_moe_layers(), horizon);
            r.record_start(start_ahead);
        }
        let source = StepSource {
            foresight: inner.foresight,
            store: &inner.store,
            forecaster: inner.forecaster.as_ref(),
            recorder: &inner.recorder,
            layer_steps: Default::default(),
            layer_experts: Default::default(),
            // Each sequence's last row in the batch carries its route for the next step.
            route_rows: matches!(self.schedule, Schedule::Regroup { .. }).then(|| {
                let of_row = rows
                    .iter()
                    .flat_map(|&(i, n, _)| (0..n).map(move |k| (k + 1 == n).then_some(i)))
                    .collect();
                (of_row, Default::default())
            }),
        };
        let span = tracing::debug_span!("step", rows = batch.len(), sequences = rows.len()).entered();
        let result = inner.model.forward(&batch, &mut self.kv, &source);
        drop(span);
        if let Some(r) = lock(&inner.recorder).as_mut() {
            if let Err(e) = r.end_step() {
                lock(&inner.trace_error).get_or_insert(e);
            }
        }
        let forward_seconds = t0.elapsed().as_secs_f64();

        let out = match result {
            Ok(out) => out,
            Err(e) => {
                // The batch as a whole was refused: every sequence in it fails.
                let msg = e.to_string();
                let mut ids: Vec<usize> = rows.iter().map(|&(i, ..)| i).collect();
                ids.sort_unstable();
                for i in ids.into_iter().rev() {
                    let s = self.running.remove(i);
                    self.fail(inner, s, msg.clone());
                }
                self.note_state(inner);
                return;
            }
        };
        {
            let mut st = lock(&inner.stats);
            st.steps += 1;
            st.forward_seconds += forward_seconds;
            st.max_batch_seen = st.max_batch_seen.max(rows.len());
            st.count_batch(rows.len());
            let (steps, experts) = (source.layer_steps.into_inner(), source.layer_experts.into_inner());
            if let Some(h) = &inner.horizon {
                lock(h).update(&inner.store.stats(), forward_seconds, steps);
            }
            st.layer_steps += steps;
            st.layer_experts += experts;
            if rows.iter().all(|&(i, ..)| self.running[i].prefilled()) {
                st.decode_layer_steps += steps;
                st.decode_layer_experts += experts;
            }
        }
        if let Some((_, routes)) = source.route_rows {
            for (i, moe, experts) in routes.into_inner().unwrap_or_else(|e| e.into_inner()) {
                self.running[i].route.set(moe, &experts);
            }
        }
        {
            let st = &mut *lock(&inner.stats);
            for &(i, n, _) in &rows {
                if self.running[i].prefilled() {
                    st.decode_rows += n as u64;
                } else {
                    st.prefill_rows += n as u64;
                }
            }
        }

        // Score prompt rows and sample each sequence whose next-token logits came back; note
        // prompt progress.
        let vocab = inner.model.config.vocab_size;
        let eos = &inner.model.config.eos_token_ids;
        let mut next_row = 0; // the first logits row of the next span
        let mut ended: Vec<(usize, Option<FinishReason>, Option<String>)> = Vec::new();
        for &(i, n, want) in &rows {
            let s = &mut self.running[i];
            let count = match want {
                Logits::None => 0,
                Logits::Last => 1,
                Logits::All => n,
            };
            let logits = &out.logits[next_row * vocab..(next_row + count) * vocab];
            next_row += count;
            if let Some((_, e)) = out.failed.iter().find(|(id, _)| *id == s.id) {
                ended.push((i, None, Some(format!("{e}"))));
                continue;
            }
            let l = if s.prefilled() {
                Some(logits)
            } else {
                let len = s.req.prompt_ids.len();
                if let Some(scores) = s.prompt_logprobs.as_mut() {
                    // Row `fed + k` predicts prompt token `fed + k + 1`; the prompt's last row
                    // predicts the first new token, sampled below.
                    let targets = &s.req.prompt_ids[s.fed + 1..(s.fed + n + 1).min(len)];
                    scores.extend(log_probs(logits, vocab, targets));
                }
                s.fed += n;
                s.prefilled().then(|| &logits[(count - 1) * vocab..])
            };
            let Some(l) = l else { continue };
            if s.req.max_new_tokens == 0 {
                // Scored only: the prompt is done and nothing is generated.
                ended.push((i, Some(FinishReason::Length), None));
                continue;
            }
            let id = s.sampler.sample(l);
            s.generated.push(id);
            if s.first_token.is_none() {
                s.first_token = Some(Instant::now());
            }
            let text = match (&inner.text, s.detok.as_mut()) {
                (Some(t), Some(d)) => d.push(t, id).unwrap_or_default(),
                _ => String::new(),
            };
            lock(&inner.stats).generated_tokens += 1;
            if !s.sink.send(s.id, Event::Token { id, text }) {
                s.cancel.store(true, Ordering::Relaxed);
            }
            if eos.contains(&id) {
                ended.push((i, Some(FinishReason::Stop), None));
            } else if s.generated.len() >= s.req.max_new_tokens {
                ended.push((i, Some(FinishReason::Length), None));
            }
        }
        ended.sort_by_key(|&(i, ..)| std::cmp::Reverse(i));
        for (i, reason, error) in ended {
            let s = self.running.remove(i);
            match (reason, error) {
                (Some(r), _) => self.finish(inner, s, r),
                (None, e) => self.fail(inner, s, e.unwrap_or_default()),
            }
        }
        lock(&inner.stats).busy_seconds += t0.elapsed().as_secs_f64();
        self.note_state(inner);
    }
}
