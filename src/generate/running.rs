//! Continuous batching: sequences join a running batch between passes and leave when they
//! end (`ferry serve`'s engine, and [`Generator::generate_batch`] with whole prompts). Each pass feeds every decoding sequence its last token and newcomers' prompts
//! in pieces of at most `prompt_chunk` tokens, all newcomers together at most that many, so that
//! a long prompt does not stall the others' decoding for a whole pass of its length. A prompt's
//! pieces fall at the same places whatever its neighbours are, so batching does not change
//! what a sequence generates.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{Finish, Generator, Output, Request, Sampler};
use crate::backend::{Backend, KvCache};
use crate::error::{Error, Result};
use crate::model::{Logits, Segment};

/// A sequence of the running batch, named by the caller's `id`.
pub struct Running<C> {
    pub id: u64,
    request: Request,
    cache: C,
    sampler: Sampler,
    /// Tokens not yet run through the model: the prompt (what is left of it), then each new token.
    pending: Vec<u32>,
    seen: Vec<u32>,
    tokens: Vec<u32>,
    text: String,
    printed: usize,
    admitted: Instant,
    first_token: Option<Instant>,
}

impl<C> Running<C> {
    pub fn prompt_tokens(&self) -> usize {
        self.request.prompt.len()
    }
}

/// What one pass did.
#[derive(Default)]
pub struct PassReport {
    /// Sequences in the pass, tokens run through the model (prompt pieces and fed-back
    /// tokens), of them newcomers' prompt tokens, and tokens generated.
    pub sequences: usize,
    pub tokens: usize,
    pub prompt_tokens: usize,
    pub generated: usize,
    /// Seconds from the pass's start to its tokens being picked.
    pub seconds: f64,
    /// Whether the generator's interrupt ([`Generator::interrupt`]) was raised: every
    /// sequence in the pass ended.
    pub interrupted: bool,
}

impl<B: Backend> Generator<B> {
    /// A sequence for `request`, ready to join the batch; an error names what is wrong with
    /// the request (an empty prompt, one that fills the context, no tokens to generate).
    pub fn admit(&self, id: u64, request: Request) -> Result<Running<B::KvCache>> {
        if request.prompt.is_empty() {
            return Err(Error::Flag {
                flag: "prompt",
                message: "the prompt is empty; give some text".into(),
            });
        }
        if request.max_tokens == 0 {
            return Err(Error::Flag {
                flag: "max_tokens",
                message: "expected at least 1 token to generate".into(),
            });
        }
        if request.prompt.len() >= self.context {
            return Err(Error::PromptTooLong {
                tokens: request.prompt.len(),
                context: self.context,
            });
        }
        let positions = request
            .prompt
            .len()
            .saturating_add(request.max_tokens)
            .min(self.context);
        Ok(Running {
            id,
            cache: self.new_cache(positions)?,
            sampler: Sampler::new(request.sampling.clone()),
            pending: request.prompt.clone(),
            seen: request.prompt.clone(),
            tokens: Vec::new(),
            text: String::new(),
            printed: 0,
            admitted: Instant::now(),
            first_token: None,
            request,
        })
    }

    /// One pass over the weights for the sequences of `active` that it can take (every
    /// decoding one; prompts within `prompt_chunk` tokens in all). `on_text(id, piece)` gets
    /// each sequence's final text as it comes; sequences that end leave `active` and come back
    /// with their outputs and prompt lengths. `cancel`, or the generator's interrupt raised
    /// by the time the pass's tokens are picked, ends every sequence in the pass.
    #[allow(clippy::type_complexity)]
    pub fn pass(
        &mut self,
        active: &mut Vec<Running<B::KvCache>>,
        prompt_chunk: usize,
        cancel: bool,
        on_text: &mut dyn FnMut(u64, &str),
    ) -> Result<(Vec<(u64, Output, usize)>, PassReport)> {
        let start = Instant::now();
        // How many pending tokens each sequence feeds this pass (0: it sits this one out).
        let mut budget = prompt_chunk.max(1);
        let feeds: Vec<usize> = active
            .iter()
            .map(|s| {
                if s.first_token.is_some() {
                    return s.pending.len();
                }
                let take = s.pending.len().min(prompt_chunk.max(1));
                if take <= budget {
                    budget -= take;
                    take
                } else {
                    0
                }
            })
            .collect();
        let tokens = feeds.iter().sum();
        let prompt_tokens = active
            .iter()
            .zip(&feeds)
            .filter(|(s, _)| s.first_token.is_none())
            .map(|(_, &n)| n)
            .sum();
        let mut segments: Vec<Segment<'_, B::KvCache>> = active
            .iter_mut()
            .zip(&feeds)
            .filter(|(_, &n)| n > 0)
            .map(|(s, &n)| Segment {
                tokens: &s.pending[..n],
                cache: &mut s.cache,
            })
            .collect();
        let sequences = segments.len();
        if segments.is_empty() {
            return Ok((Vec::new(), PassReport::default()));
        }
        let logits = self.model.forward_batch(
            &self.backend,
            &mut self.weights,
            &mut segments,
            Logits::Last,
        )?;
        drop(segments);
        let greedy =
            |r: &Request| r.sampling.temperature <= 0.0 && r.sampling.repetition_penalty == 1.0;
        // Greedy sequences pick where the logits are (on a GPU: no copy of the logits).
        let greedy_rows = active
            .iter()
            .zip(&feeds)
            .filter(|(s, &n)| n > 0 && greedy(&s.request))
            .count();
        let argmax = match greedy_rows {
            0 => Vec::new(),
            _ => self.backend.argmax_rows(&logits)?,
        };
        let mut host = match greedy_rows == sequences {
            true => Vec::new(),
            false => self.backend.to_host(&logits)?,
        };
        let vocab = self.model.config.vocab_size;
        let now = Instant::now();
        let seconds = (now - start).as_secs_f64();
        let interrupted = self.interrupt.is_some_and(|f| f.load(Ordering::SeqCst));
        let cancel = cancel || interrupted;
        let mut ended = Vec::new();
        let mut still = Vec::with_capacity(active.len());
        let mut row = 0;
        let mut generated = 0;
        for (mut seq, n) in std::mem::take(active).into_iter().zip(feeds) {
            if n == 0 {
                still.push(seq);
                continue;
            }
            let r = row;
            row += 1;
            if n < seq.pending.len() {
                // A piece of the prompt went in; the rest goes in the next passes.
                seq.pending.drain(..n);
                still.push(seq);
                continue;
            }
            let next = if greedy(&seq.request) {
                argmax[r]
            } else {
                // Each row is sampled once: in place, no copy of the vocabulary.
                seq.sampler
                    .next(&mut host[r * vocab..(r + 1) * vocab], &seq.seen)
            };
            seq.first_token.get_or_insert(now);
            generated += 1;
            let id = seq.id;
            let finish = self.accept(&mut seq, next, &mut |p| on_text(id, p))?;
            match finish.or(cancel.then_some(Finish::Interrupted)) {
                Some(finish) => {
                    if finish == Finish::Interrupted {
                        on_text(id, &seq.text[seq.printed..]);
                    }
                    let first = seq.first_token.unwrap_or(now);
                    let prompt = seq.request.prompt.len();
                    ended.push((
                        id,
                        Output {
                            tokens: seq.tokens,
                            text: seq.text,
                            finish,
                            prompt_secs: (first - seq.admitted).as_secs_f64(),
                            decode_secs: (now - first).as_secs_f64(),
                        },
                        prompt,
                    ));
                }
                None => still.push(seq),
            }
        }
        *active = still;
        Ok((
            ended,
            PassReport {
                sequences,
                tokens,
                prompt_tokens,
                generated,
                seconds,
                interrupted,
            },
        ))
    }

    /// Take `next` into `seq`: hand out final text, and say whether the sequence ends.
    fn accept(
        &self,
        seq: &mut Running<B::KvCache>,
        next: u32,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Option<Finish>> {
        let req = &seq.request;
        seq.tokens.push(next);
        seq.seen.push(next);
        let eos = !req.ignore_eos && self.text.defaults.eos_token_ids.contains(&next);
        let shown = if eos {
            &seq.tokens[..seq.tokens.len() - 1]
        } else {
            &seq.tokens[..]
        };
        seq.text = self.text.decode(shown)?;
        let mut finish = if eos {
            Some(Finish::Eos)
        } else if seq.tokens.len() >= req.max_tokens {
            Some(Finish::MaxTokens)
        } else if seq.cache.len() >= seq.cache.capacity() {
            Some(Finish::Context)
        } else {
            None
        };
        if let Some(at) = req
            .stop_strings
            .iter()
            .filter_map(|s| seq.text.find(s.as_str()))
            .min()
        {
            seq.text.truncate(at);
            finish = Some(Finish::StopString);
        }
        let ready = match finish {
            Some(_) => seq.text.len(),
            None => super::final_prefix(&seq.text, &req.stop_strings),
        };
        if ready > seq.printed {
            on_text(&seq.text[seq.printed..ready]);
            seq.printed = ready;
        }
        seq.pending = vec![next];
        Ok(finish)
    }
}
