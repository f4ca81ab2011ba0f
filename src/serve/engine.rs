//! The engine loop: one thread owns the generator (model, backend, weights) and runs passes
//! while any sequence is active. Requests arrive over a bounded channel from the HTTP side;
//! each joins the running batch at the next pass when there is room (`max_batch`), and its
//! text goes back over its own channel. A sequence whose client has gone (its channel
//! closed) leaves before the next pass.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc::UnboundedSender;

use crate::backend::cuda::streaming::PassStats;
use crate::backend::Backend;
use crate::generate::{Finish, Generator, Request, Running};

/// A request for the engine, with the channel its answer goes back on.
pub struct Job {
    pub request: Request,
    pub events: UnboundedSender<Event>,
}

/// What the engine sends back for one request.
#[derive(Debug)]
pub enum Event {
    Text(String),
    Done {
        finish: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(String),
}

/// Counters the HTTP side shows on /metrics (totals since start).
#[derive(Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub rejected_queue_full: AtomicU64,
    pub rejected_bad_request: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub queued: AtomicUsize,
    pub active: AtomicUsize,
    pub passes: AtomicU64,
    /// Microseconds, all passes together.
    pub pass_us: AtomicU64,
    pub streamed_bytes: AtomicU64,
    /// The last streamed pass's overlap efficiency, × 1e6.
    pub efficiency_ppm: AtomicU64,
    /// Image requests accepted into the image queue, and refused because it was full.
    pub image_requests: AtomicU64,
    pub rejected_image_queue_full: AtomicU64,
    /// Image requests waiting, and generating (0 or 1).
    pub image_queued: AtomicUsize,
    pub image_running: AtomicUsize,
    /// Image jobs finished (each one batch of images), the images they made, and their time
    /// in microseconds.
    pub image_jobs: AtomicU64,
    pub images_generated: AtomicU64,
    pub image_us: AtomicU64,
}

pub struct EngineConfig {
    pub max_batch: usize,
    /// Most prompt tokens one pass takes in (see [`Generator::pass`]).
    pub prompt_chunk: usize,
}

/// Run passes until `jobs` is closed and every sequence has ended. `cancel` (raised at the
/// shutdown deadline) ends every sequence after the pass in flight. `pass_log` is the
/// streamed weights' log of passes, drained after each pass into `metrics`.
pub fn run<B: Backend>(
    mut gen: Generator<B>,
    config: EngineConfig,
    jobs: Receiver<Job>,
    metrics: Arc<Metrics>,
    cancel: &AtomicBool,
    pass_log: Option<Arc<Mutex<Vec<PassStats>>>>,
) {
    let mut active: Vec<Running<B::KvCache>> = Vec::new();
    let mut events: std::collections::HashMap<u64, UnboundedSender<Event>> = Default::default();
    let mut next_id = 0u64;
    let mut open = true;
    loop {
        // Newcomers join while there is room; with nothing to do, wait for one.
        while open && active.len() < config.max_batch {
            let job = if active.is_empty() {
                jobs.recv().map_err(|_| TryRecvError::Disconnected)
            } else {
                jobs.try_recv()
            };
            let job = match job {
                Ok(job) => job,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            };
            metrics.queued.fetch_sub(1, Ordering::SeqCst);
            if job.events.is_closed() {
                continue;
            }
            next_id += 1;
            match gen.admit(next_id, job.request) {
                Ok(seq) => {
                    events.insert(next_id, job.events);
                    active.push(seq);
                }
                Err(e) => {
                    let _ = job.events.send(Event::Failed(e.to_string()));
                }
            }
        }
        // Clients that have gone free their sequences.
        active.retain(|s| events.get(&s.id).is_some_and(|e| !e.is_closed()));
        events.retain(|id, _| active.iter().any(|s| s.id == *id));
        metrics.active.store(active.len(), Ordering::SeqCst);
        if active.is_empty() {
            if open {
                continue;
            }
            return;
        }
        let cancelled = cancel.load(Ordering::SeqCst);
        let result = gen.pass(
            &mut active,
            config.prompt_chunk,
            cancelled,
            &mut |id, piece| {
                if let Some(tx) = events.get(&id) {
                    let _ = tx.send(Event::Text(piece.to_string()));
                }
            },
        );
        let (ended, report) = match result {
            Ok(r) => r,
            Err(e) => {
                // A failed pass fails every sequence in it; the server goes on.
                for s in active.drain(..) {
                    if let Some(tx) = events.remove(&s.id) {
                        let _ = tx.send(Event::Failed(e.to_string()));
                    }
                }
                continue;
            }
        };
        metrics.passes.fetch_add(1, Ordering::Relaxed);
        metrics
            .pass_us
            .fetch_add((report.seconds * 1e6) as u64, Ordering::Relaxed);
        metrics
            .prompt_tokens
            .fetch_add(report.prompt_tokens as u64, Ordering::Relaxed);
        metrics
            .generated_tokens
            .fetch_add(report.generated as u64, Ordering::Relaxed);
        if let Some(log) = &pass_log {
            let passes = std::mem::take(&mut *log.lock().expect("pass log"));
            for p in passes {
                metrics
                    .streamed_bytes
                    .fetch_add(p.streamed_bytes as u64, Ordering::Relaxed);
                metrics
                    .efficiency_ppm
                    .store((p.efficiency * 1e6) as u64, Ordering::Relaxed);
            }
        }
        metrics.active.store(active.len(), Ordering::SeqCst);
        for (id, out, prompt_tokens) in ended {
            if let Some(tx) = events.remove(&id) {
                let _ = tx.send(Event::Done {
                    finish: out.finish,
                    prompt_tokens,
                    completion_tokens: out.tokens.len(),
                });
            }
        }
    }
}
