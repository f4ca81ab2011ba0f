//! Generation: prompt → tokens → model passes → sampled tokens → text, printed as it comes.

pub mod chat;
mod running;
mod sample;
mod text;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

pub use chat::Message;
pub use running::{PassReport, Running};
pub use sample::{argmax, Sampler, SamplingConfig};
pub use text::TextCodec;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::Checkpoint;
use crate::model::{Architecture, Llama, Logits, ResidentWeights, Weights};

/// What to generate from one prompt.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    /// Most tokens to generate; [`UNTIL_CONTEXT_FULL`] for no limit but the context.
    pub max_tokens: usize,
    pub sampling: SamplingConfig,
    /// Stop when the text contains one of these (it is not included in the output).
    pub stop_strings: Vec<String>,
    /// Keep going past end-of-sequence tokens.
    pub ignore_eos: bool,
}

/// `max_tokens` for "generate until the context is full" (`--max-tokens -1`, as in llama.cpp).
pub const UNTIL_CONTEXT_FULL: usize = usize::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence token was generated.
    Eos,
    /// A stop string appeared.
    StopString,
    /// `max_tokens` were generated.
    MaxTokens,
    /// The context is full.
    Context,
    /// [`Generator::interrupt`] was raised (Ctrl-C in `ferry chat`).
    Interrupted,
}

impl Finish {
    /// The name a program reads (`ferry run --json`'s "finish").
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Eos => "eos",
            Finish::StopString => "stop_string",
            Finish::MaxTokens => "max_tokens",
            Finish::Context => "context_full",
            Finish::Interrupted => "interrupted",
        }
    }
}

impl std::fmt::Display for Finish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Finish::Eos => "end of sequence",
            Finish::StopString => "stop text",
            Finish::MaxTokens => "max tokens reached",
            Finish::Context => "context full",
            Finish::Interrupted => "interrupted",
        })
    }
}

/// The context a generator holds: `requested` (`--context`), at most the model's
/// `max_position_embeddings`; the model's maximum when none is asked for.
pub fn context_length(requested: Option<usize>, max_position_embeddings: usize) -> Result<usize> {
    match requested {
        Some(0) => Err(Error::Flag {
            flag: "--context",
            message: "expected at least 1 position".into(),
        }),
        Some(c) if c > max_position_embeddings => Err(Error::Flag {
            flag: "--context",
            message: format!(
                "{c} exceeds the model's max_position_embeddings {max_position_embeddings}"
            ),
        }),
        Some(c) => Ok(c),
        None => Ok(max_position_embeddings),
    }
}

#[derive(Clone, Debug)]
pub struct Output {
    /// Generated token ids (without the prompt; with the EOS token if one ended it).
    pub tokens: Vec<u32>,
    /// Generated text (without a stop string or EOS).
    pub text: String,
    pub finish: Finish,
    /// Seconds for the prompt pass, and for the tokens after it.
    pub prompt_secs: f64,
    pub decode_secs: f64,
}

/// A model ready to generate: weights on a backend, tokenizer, and generation defaults.
pub struct Generator<B: Backend> {
    pub model: Llama,
    backend: B,
    /// Resident, or streamed by the engine (`--vram`).
    weights: Box<dyn Weights<B::Weight>>,
    /// Text ↔ token ids: `gen.text.encode(...)`, `gen.text.decode(...)`.
    pub text: TextCodec,
    /// Most positions (prompt + generated) a sequence may hold.
    pub context: usize,
    /// When raised (from another thread or a signal handler: hence a static), every
    /// sequence ends after the pass in flight, with [`Finish::Interrupted`]; lowered again as
    /// the generation returns.
    pub interrupt: Option<&'static AtomicBool>,
}

impl<B: Backend> Generator<B> {
    /// Load `ckpt` onto `backend`, every weight resident. `context` defaults to the model's
    /// max_position_embeddings.
    pub fn new(ckpt: &Checkpoint, backend: B, context: Option<usize>) -> Result<Self>
    where
        B::Weight: 'static,
    {
        Self::with_weights(ckpt, backend, None, TextCodec::open(ckpt)?, context)
    }

    /// Like [`new`](Self::new), with weights made by the caller (the streaming engine; None:
    /// every weight resident) and a text codec already opened.
    pub fn with_weights(
        ckpt: &Checkpoint,
        backend: B,
        weights: Option<Box<dyn Weights<B::Weight>>>,
        text: TextCodec,
        context: Option<usize>,
    ) -> Result<Self>
    where
        B::Weight: 'static,
    {
        let model = Llama::new(ckpt.config.clone());
        let context = context_length(context, ckpt.config.max_position_embeddings)?;
        let weights = match weights {
            Some(w) => w,
            None => Box::new(ResidentWeights::load(ckpt, model.groups(), |t| {
                backend.weight(t)
            })?),
        };
        Ok(Generator {
            model,
            backend,
            weights,
            text,
            context,
            interrupt: None,
        })
    }

    /// Logits `[tokens, vocab]` for every position of `tokens` from an empty cache.
    pub fn score(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut cache = self.new_cache(tokens.len())?;
        self.model.forward(
            &self.backend,
            &mut self.weights,
            tokens,
            &mut cache,
            Logits::All,
        )
    }

    /// A cache for `positions` tokens (prompt + generated); at most the context.
    fn new_cache(&self, positions: usize) -> Result<B::KvCache> {
        if positions > self.context {
            return Err(Error::PromptTooLong {
                tokens: positions,
                context: self.context,
            });
        }
        let c = &self.model.config;
        self.backend
            .kv_cache(c.num_layers, self.model.attention_shape(), positions)
    }

    /// Generate from `req`, handing each new piece of text to `on_text` as soon as it is
    /// final (complete UTF-8, not part of a possible stop string).
    pub fn generate(&mut self, req: &Request, on_text: &mut dyn FnMut(&str)) -> Result<Output> {
        let (mut outputs, _) =
            self.generate_batch(std::slice::from_ref(req), 1, &mut |_, piece| on_text(piece))?;
        Ok(outputs.pop().expect("one output per request"))
    }

    /// Generate from many requests, up to `batch` sequences per pass: one pass over the
    /// weights serves every active sequence (prompts of newly admitted ones and the next
    /// token of the others). A sequence that ends makes room for the next waiting one.
    /// `on_text(i, piece)` receives request `i`'s text as it becomes final. Outputs come back
    /// in request order.
    pub fn generate_batch(
        &mut self,
        requests: &[Request],
        batch: usize,
        on_text: &mut dyn FnMut(usize, &str),
    ) -> Result<(Vec<Output>, BatchStats)> {
        self.generate_batch_with_progress(requests, batch, on_text, &mut |_, _| {}, &mut |_| {})
    }

    /// [`generate_batch`](Self::generate_batch), handing each request's output to
    /// `on_done(i, output)` as it ends, and telling `on_pass` where the generation stands
    /// after each pass (for a progress bar).
    pub fn generate_batch_with_progress(
        &mut self,
        requests: &[Request],
        batch: usize,
        on_text: &mut dyn FnMut(usize, &str),
        on_done: &mut dyn FnMut(usize, &Output),
        on_pass: &mut dyn FnMut(Progress),
    ) -> Result<(Vec<Output>, BatchStats)> {
        let result = self.generate_batch_inner(requests, batch, on_text, on_done, on_pass);
        if let Some(flag) = self.interrupt {
            flag.store(false, Ordering::SeqCst);
        }
        result
    }

    fn generate_batch_inner(
        &mut self,
        requests: &[Request],
        batch: usize,
        on_text: &mut dyn FnMut(usize, &str),
        on_done: &mut dyn FnMut(usize, &Output),
        on_pass: &mut dyn FnMut(Progress),
    ) -> Result<(Vec<Output>, BatchStats)> {
        if batch == 0 {
            return Err(Error::Flag {
                flag: "--batch",
                message: "expected at least 1".into(),
            });
        }
        for (i, r) in requests.iter().enumerate() {
            if r.prompt.is_empty() {
                return Err(Error::Flag {
                    flag: "--prompt",
                    message: format!("prompt {} is empty; give some text", i + 1),
                });
            }
            if r.prompt.len() >= self.context {
                return Err(Error::PromptTooLong {
                    tokens: r.prompt.len(),
                    context: self.context,
                });
            }
        }
        let mut stats = BatchStats::default();
        let start = Instant::now();
        let mut outputs: Vec<Option<Output>> = vec![None; requests.len()];
        let mut finished = 0;
        let mut waiting = 0..requests.len();
        let mut active: Vec<Running<B::KvCache>> = Vec::new();
        let mut end = |index: usize, out: Output, finished: &mut usize| {
            on_done(index, &out);
            outputs[index] = Some(out);
            *finished += 1;
        };
        loop {
            while active.len() < batch {
                let Some(index) = waiting.next() else { break };
                match requests[index].max_tokens {
                    0 => end(index, Output::empty(Finish::MaxTokens), &mut finished),
                    _ => active.push(self.admit(index as u64, requests[index].clone())?),
                }
            }
            if active.is_empty() {
                break;
            }
            // Whole prompts: every newcomer's in the pass it joins.
            let (ended, report) = self.pass(&mut active, usize::MAX, false, &mut |id, piece| {
                on_text(id as usize, piece)
            })?;
            stats.passes += 1;
            stats.tokens_in += report.tokens;
            stats.tokens_out += report.generated;
            stats.pass_secs.push(report.seconds);
            stats.pass_sequences.push(report.sequences);
            for (id, out, _) in ended {
                end(id as usize, out, &mut finished);
            }
            if report.interrupted {
                for index in waiting.by_ref() {
                    end(index, Output::empty(Finish::Interrupted), &mut finished);
                }
            }
            on_pass(Progress {
                finished,
                requests: requests.len(),
                tokens_out: stats.tokens_out,
            });
        }
        stats.seconds = start.elapsed().as_secs_f64();
        let outputs = outputs
            .into_iter()
            .map(|o| o.expect("every request ends"))
            .collect();
        Ok((outputs, stats))
    }
}

/// Where a batched generation stands after a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Requests done (each has its output), of `requests`.
    pub finished: usize,
    pub requests: usize,
    /// Tokens generated so far, all sequences together.
    pub tokens_out: usize,
}

/// What a batched generation did.
#[derive(Clone, Debug, Default)]
pub struct BatchStats {
    /// Passes over the weights.
    pub passes: usize,
    /// Each pass: seconds from its start to its tokens being picked, and sequences in it.
    pub pass_secs: Vec<f64>,
    pub pass_sequences: Vec<usize>,
    /// Tokens run through the model (prompts and fed-back tokens), and tokens generated.
    pub tokens_in: usize,
    pub tokens_out: usize,
    pub seconds: f64,
}

impl BatchStats {
    /// Tokens per second over the passes after the first (decoding, once the prompts are in).
    pub fn decode_tok_s(&self) -> f64 {
        let secs: f64 = self.pass_secs.iter().skip(1).sum();
        let tokens: usize = self.pass_sequences.iter().skip(1).sum();
        tokens as f64 / secs.max(1e-9)
    }
}

impl Output {
    fn empty(finish: Finish) -> Output {
        Output {
            tokens: Vec::new(),
            text: String::new(),
            finish,
            prompt_secs: 0.0,
            decode_secs: 0.0,
        }
    }
}

/// How many bytes of `text` can be shown: not a trailing incomplete character (decoded as
/// U+FFFD) and not a tail that may grow into a stop string.
fn final_prefix(text: &str, stop_strings: &[String]) -> usize {
    let mut end = text.trim_end_matches('\u{FFFD}').len();
    for stop in stop_strings {
        for (i, _) in stop.char_indices().skip(1) {
            if text[..end].ends_with(&stop[..i]) {
                end = end.min(text.len() - i);
            }
        }
    }
    end
}

#[cfg(test)]
mod tests {
    use super::final_prefix;

    #[test]
    fn holds_back_partial_stop_strings_and_characters() {
        let stops = vec!["<END>".to_string()];
        assert_eq!(final_prefix("hello <EN", &stops), 6);
        assert_eq!(final_prefix("hello", &stops), 5);
        assert_eq!(final_prefix("caf\u{FFFD}", &[]), 3);
    }
}
