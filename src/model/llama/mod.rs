//! The Llama family (llama 2/3, mistral, qwen2, qwen3) in one forward pass. The differences
//! between them are fields of [`LlamaConfig`], each used in one place below.

mod checkpoint;
mod config;
mod cost;
pub mod gguf;

pub use checkpoint::Checkpoint;
pub use config::{Arch, Llama3RopeScaling, LlamaConfig};

use super::{Architecture, Bound, PassCost, PassShape, TensorSpec, WeightGroup, Weights};
use crate::backend::{AttentionShape, Backend, KvCache};
use crate::error::{Error, Result};

/// Rows of a pass that go through a block's MLP together. A fixed number, never one chosen
/// by the budget: GEMM results may depend on the number of rows, and a pass must compute
/// the same numbers at every budget. 4096 rows keep the GEMMs at full speed and bound the
/// MLP's activations of a 16384-token pass of a 7B model to a quarter.
pub const MLP_CHUNK_ROWS: usize = 4096;

/// One sequence's share of a pass: the tokens it adds and the cache they extend.
pub struct Segment<'a, C> {
    pub tokens: &'a [u32],
    pub cache: &'a mut C,
}

/// Which positions' logits a forward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// The last position only `[vocab]` (generation).
    Last,
    /// Every position `[tokens, vocab]` (tests, scoring).
    All,
}

pub struct Llama {
    pub config: LlamaConfig,
    /// What a pass returns.
    pub output: Output,
    /// Before every tensor name but the head's: "model." in a causal LM's checkpoint, ""
    /// in a bare model's (a diffusers pipeline's text encoder saved as `Qwen3Model`).
    prefix: String,
    groups: Vec<WeightGroup>,
    inv_freq: Vec<f32>,
}

/// What a Llama pass computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Logits from the final norm and the head (a language model).
    Logits,
    /// The residual stream after the first `layers` blocks, with no final norm: a text
    /// encoder's `hidden_states[layers]` (Z-Image takes `hidden_states[-2]`, the input of
    /// the last block). The blocks after them and the head are not part of the model.
    Hidden { layers: usize },
    /// The final norm's output at every position, after all blocks: a text encoder's
    /// `hidden_states[-1]` (Qwen-Image takes it). The head is not part of the model; the final
    /// norm is the last group.
    LastHidden,
}

/// Where each part of the model is among its groups.
const EMBEDDING: usize = 0;
const fn block(layer: usize) -> usize {
    1 + layer
}

/// One decoder block's weights, named as in the checkpoint (`model.layers.N.…`).
struct BlockWeights<'a, W> {
    input_layernorm: &'a W,
    q_proj: &'a W,
    k_proj: &'a W,
    v_proj: &'a W,
    o_proj: &'a W,
    post_attention_layernorm: &'a W,
    gate_proj: &'a W,
    up_proj: &'a W,
    down_proj: &'a W,
    /// q, k, v biases (`qkv_bias`).
    qkv_bias: Option<[&'a W; 3]>,
    o_bias: Option<&'a W>,
    /// q_norm, k_norm (`qk_norm`).
    qk_norm: Option<[&'a W; 2]>,
}

impl Llama {
    /// A language model whose tensors are named as transformers' `…ForCausalLM` saves them.
    pub fn new(config: LlamaConfig) -> Llama {
        Self::build(config, Output::Logits, "model.")
    }

    /// A text encoder: the residual after `layers` blocks (1 ≤ layers ≤ num_layers; the
    /// caller checks it against the config it read), for a checkpoint whose tensor names
    /// start with `prefix` ("model." or "").
    pub fn encoder(config: LlamaConfig, layers: usize, prefix: &str) -> Llama {
        assert!(
            (1..=config.num_layers).contains(&layers),
            "hidden state after {layers} of {} blocks",
            config.num_layers
        );
        Self::build(config, Output::Hidden { layers }, prefix)
    }

    /// A text encoder returning the final norm's output (`hidden_states[-1]`), for a
    /// checkpoint whose tensor names start with `prefix` ("model." or "").
    pub fn last_hidden(config: LlamaConfig, prefix: &str) -> Llama {
        Self::build(config, Output::LastHidden, prefix)
    }

    fn build(config: LlamaConfig, output: Output, prefix: &str) -> Llama {
        let groups = weight_groups(&config, output, prefix);
        let inv_freq = config.rope_inv_freq();
        Llama {
            config,
            output,
            prefix: prefix.to_string(),
            groups,
            inv_freq,
        }
    }

    /// Blocks a pass runs.
    pub fn layers(&self) -> usize {
        match self.output {
            Output::Logits | Output::LastHidden => self.config.num_layers,
            Output::Hidden { layers } => layers,
        }
    }

    /// The group of the final norm and the language-model head (the final norm alone for
    /// [`Output::LastHidden`]).
    fn head(&self) -> usize {
        block(self.config.num_layers)
    }

    fn name(&self, s: &str) -> String {
        format!("{}{s}", self.prefix)
    }

    pub fn attention_shape(&self) -> AttentionShape {
        AttentionShape {
            num_heads: self.config.num_heads,
            num_kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
            sliding_window: self.config.sliding_window,
        }
    }

    /// Run `tokens` through the model, appending to `cache`, and return logits (f32, on the
    /// host) for the positions `want` asks for.
    pub fn forward<B: Backend>(
        &self,
        backend: &B,
        weights: &mut impl Weights<B::Weight>,
        tokens: &[u32],
        cache: &mut B::KvCache,
        want: Logits,
    ) -> Result<Vec<f32>> {
        let logits = self.forward_logits(backend, weights, tokens, cache, want)?;
        backend.to_host(&logits)
    }

    /// [`forward`](Self::forward), leaving the logits `[rows, vocab]` where the backend
    /// computed them (so that a GPU can pick the next token without copying them).
    pub fn forward_logits<B: Backend>(
        &self,
        backend: &B,
        weights: &mut impl Weights<B::Weight>,
        tokens: &[u32],
        cache: &mut B::KvCache,
        want: Logits,
    ) -> Result<B::Activation> {
        self.forward_batch(backend, weights, &mut [Segment { tokens, cache }], want)
    }

    /// One pass for several sequences: each segment's new tokens go through every layer
    /// together (one matrix product per weight for all of them), attention reads each
    /// sequence's own cache. Returns logits `[rows, vocab]` on the backend: one row per
    /// segment for [`Logits::Last`], every token's row in segment order for [`Logits::All`].
    pub fn forward_batch<B: Backend>(
        &self,
        backend: &B,
        weights: &mut impl Weights<B::Weight>,
        segments: &mut [Segment<'_, B::KvCache>],
        want: Logits,
    ) -> Result<B::Activation> {
        let c = &self.config;
        for seg in segments.iter() {
            let end = seg.cache.len() + seg.tokens.len();
            if end > seg.cache.capacity() {
                return Err(Error::PromptTooLong {
                    tokens: end,
                    context: seg.cache.capacity(),
                });
            }
            if let Some(&bad) = seg.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                return Err(Error::Tokenizer {
                    path: "input".into(),
                    message: format!(
                        "token id {bad} is outside the vocabulary of {} ids",
                        c.vocab_size
                    ),
                });
            }
        }
        let eps = c.rms_norm_eps as f32;
        let shape = self.attention_shape();
        // Each segment's first row in the stacked activations, and its first position.
        let starts: Vec<usize> = segments
            .iter()
            .scan(0, |row, s| {
                let start = *row;
                *row += s.tokens.len();
                Some(start)
            })
            .collect();
        let positions: Vec<usize> = segments.iter().map(|s| s.cache.len()).collect();

        // [t, hidden], t = all segments' tokens
        let tokens: Vec<u32> = segments
            .iter()
            .flat_map(|s| s.tokens.iter().copied())
            .collect();
        let embedding = Bound::new(&self.groups[EMBEDDING], weights.group(EMBEDDING)?);
        let mut x = backend.embed(embedding.get(&self.name(EMBED_TOKENS)), &tokens)?;

        for layer in 0..self.layers() {
            let w = self.block_weights(layer, weights.group(block(layer))?);

            // Attention: x = x + o_proj(attn(rope(q), rope(k), v)).
            let h = backend.rms_norm(&x, w.input_layernorm, eps)?;
            let bias = |i: usize| w.qkv_bias.map(|b| b[i]);
            let mut q = backend.linear(&h, w.q_proj, bias(0))?; // [t, heads*head_dim]
            let mut k = backend.linear(&h, w.k_proj, bias(1))?; // [t, kv_heads*head_dim]
            let v = backend.linear(&h, w.v_proj, bias(2))?; // [t, kv_heads*head_dim]
            drop(h);
            if let Some([q_norm, k_norm]) = w.qk_norm {
                q = backend.rms_norm(&q, q_norm, eps)?;
                k = backend.rms_norm(&k, k_norm, eps)?;
            }
            // Each sequence at its own positions, over its own cache, on its rows.
            let mut a = backend.activation(tokens.len(), shape.num_heads * shape.head_dim)?;
            for (i, seg) in segments.iter_mut().enumerate() {
                let (rows, pos) = (starts[i]..starts[i] + seg.tokens.len(), positions[i]);
                backend.rope(&mut q, &mut k, rows.clone(), pos, &self.inv_freq, shape)?;
                backend.attention(&q, &k, &v, rows, seg.cache, layer, pos, shape, &mut a)?;
            }
            backend.linear_add(&mut x, 0, &a, w.o_proj, w.o_bias)?;
            drop((q, k, v, a)); // free before the MLP's larger activations

            // MLP: x = x + down(silu(gate(h)) * up(h)), row by row, so in blocks of rows: its
            // [rows, ffn] intermediates are the largest activations of a long pass (1.9 GB
            // at 16384 tokens of a 7B model, a quarter of that in blocks of 4096).
            let rows = tokens.len();
            for start in (0..rows).step_by(MLP_CHUNK_ROWS) {
                let n = MLP_CHUNK_ROWS.min(rows - start);
                let h = backend.rms_norm_rows(&x, start, n, w.post_attention_layernorm, eps)?;
                let mut gate = backend.linear(&h, w.gate_proj, None)?; // [n, ffn]
                let up = backend.linear(&h, w.up_proj, None)?; // [n, ffn]
                drop(h);
                backend.silu_mul(&mut gate, &up)?;
                drop(up);
                backend.linear_add(&mut x, start, &gate, w.down_proj, None)?;
            }
        }
        for seg in segments.iter_mut() {
            seg.cache.advance(seg.tokens.len());
        }
        match self.output {
            Output::Hidden { .. } => {
                weights.finish_pass()?;
                return Ok(x); // [t, hidden]: every row, in segment order
            }
            Output::LastHidden => {
                let w = Bound::new(&self.groups[self.head()], weights.group(self.head())?);
                let normed = backend.rms_norm(&x, w.get(&self.name("norm.weight")), eps)?;
                weights.finish_pass()?;
                return Ok(normed); // [t, hidden]: every row, in segment order
            }
            Output::Logits => {}
        }

        let x = match want {
            Logits::All => x,
            Logits::Last => {
                let last: Vec<_> = segments
                    .iter()
                    .zip(&starts)
                    .map(|(s, &start)| backend.rows(&x, start + s.tokens.len() - 1, 1))
                    .collect::<Result<_>>()?;
                match last.len() {
                    1 => last.into_iter().next().expect("one row"),
                    _ => backend.concat_rows(&last)?,
                }
            }
        };
        // The head: final norm, then logits [rows, vocab] by blocks of vocabulary rows when
        // the head comes in parts (the norm is in the first).
        let head = self.head();
        let mut normed = None;
        let mut blocks = Vec::new();
        for part in 0..weights.parts(head)? {
            let w = Bound::parts(&self.groups[head], weights.part(head, part)?);
            if let Some(norm) = w.opt(&self.name("norm.weight")) {
                normed = Some(backend.rms_norm(&x, norm, eps)?);
            }
            if let (Some(normed), Some(lm_head)) = (&normed, w.opt(&self.lm_head_name())) {
                blocks.push(backend.linear(normed, lm_head, None)?); // [rows, block rows]
            }
        }
        let logits = backend.concat_cols(blocks)?;
        weights.finish_pass()?;
        Ok(logits)
    }

    /// The weights of decoder block `layer`, bound by name.
    fn block_weights<'a, W>(&'a self, layer: usize, ws: &'a [W]) -> BlockWeights<'a, W> {
        let c = &self.config;
        let w = Bound::new(&self.groups[block(layer)], ws);
        let p = |s: &str| w.get(&self.name(&format!("layers.{layer}.{s}")));
        BlockWeights {
            input_layernorm: p("input_layernorm.weight"),
            q_proj: p("self_attn.q_proj.weight"),
            k_proj: p("self_attn.k_proj.weight"),
            v_proj: p("self_attn.v_proj.weight"),
            o_proj: p("self_attn.o_proj.weight"),
            post_attention_layernorm: p("post_attention_layernorm.weight"),
            gate_proj: p("mlp.gate_proj.weight"),
            up_proj: p("mlp.up_proj.weight"),
            down_proj: p("mlp.down_proj.weight"),
            qkv_bias: c.qkv_bias.then(|| {
                [
                    p("self_attn.q_proj.bias"),
                    p("self_attn.k_proj.bias"),
                    p("self_attn.v_proj.bias"),
                ]
            }),
            o_bias: c.o_bias.then(|| p("self_attn.o_proj.bias")),
            qk_norm: c
                .qk_norm
                .then(|| [p("self_attn.q_norm.weight"), p("self_attn.k_norm.weight")]),
        }
    }

    fn lm_head_name(&self) -> String {
        lm_head_name(&self.config, &self.prefix)
    }
}

impl Architecture for Llama {
    /// Embedding, blocks, head.
    fn groups(&self) -> &[WeightGroup] {
        &self.groups
    }

    fn pass_cost(&self, shape: PassShape) -> PassCost {
        let mut flops = cost::group_flops(&self.config, shape);
        flops.truncate(self.groups.len()); // an encoder: its blocks, no head
        if self.output == Output::LastHidden {
            // The final norm alone: no head's product.
            *flops.last_mut().expect("the final norm's group") = 0.0;
        }
        let positions = shape.past + shape.tokens;
        PassCost {
            flops,
            workspace: cost::workspace_bytes(&self.config, shape),
            cache: cost::kv_cache_bytes(&self.config, positions, shape.batch)
                / self.config.num_layers
                * self.layers(),
        }
    }
}

impl Llama {
    /// [`Architecture::pass_cost`]'s workspace when every position's logits are wanted
    /// ([`Logits::All`]: tests, scoring).
    pub fn workspace_all_logits(&self, shape: PassShape) -> usize {
        cost::workspace_bytes_all_logits(&self.config, shape)
    }

    /// Activation memory of a server's pass: `sequences` each decoding a token, beside
    /// newcomers' prompt pieces of `prompt_rows` tokens in all (their last rows' logits
    /// among the `sequences`).
    pub fn serving_workspace(&self, sequences: usize, prompt_rows: usize) -> usize {
        cost::rows_workspace_bytes(&self.config, sequences + prompt_rows, sequences)
    }
}

/// The token embedding, after the prefix.
const EMBED_TOKENS: &str = "embed_tokens.weight";

/// The head's weight: its own (never prefixed), or the embedding's when they are tied.
fn lm_head_name(c: &LlamaConfig, prefix: &str) -> String {
    if c.tie_word_embeddings {
        format!("{prefix}{EMBED_TOKENS}")
    } else {
        "lm_head.weight".into()
    }
}

/// The groups of a Llama-family model with the tensors (HF names) and shapes each holds.
fn weight_groups(c: &LlamaConfig, output: Output, prefix: &str) -> Vec<WeightGroup> {
    let t = |name: String, shape: &[usize]| TensorSpec::new(name, shape);
    let (h, q, kv, ffn) = (
        c.hidden_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
        c.intermediate_size,
    );
    let mut groups = vec![WeightGroup {
        host_gather: true,
        ..WeightGroup::new(
            "embedding",
            vec![t(format!("{prefix}{EMBED_TOKENS}"), &[c.vocab_size, h])],
        )
    }];
    let layers = match output {
        Output::Logits | Output::LastHidden => c.num_layers,
        Output::Hidden { layers } => layers,
    };
    for i in 0..layers {
        let p = |s: &str| format!("{prefix}layers.{i}.{s}");
        let mut tensors = vec![
            t(p("input_layernorm.weight"), &[h]),
            t(p("self_attn.q_proj.weight"), &[q, h]),
            t(p("self_attn.k_proj.weight"), &[kv, h]),
            t(p("self_attn.v_proj.weight"), &[kv, h]),
            t(p("self_attn.o_proj.weight"), &[h, q]),
            t(p("post_attention_layernorm.weight"), &[h]),
            t(p("mlp.gate_proj.weight"), &[ffn, h]),
            t(p("mlp.up_proj.weight"), &[ffn, h]),
            t(p("mlp.down_proj.weight"), &[h, ffn]),
        ];
        if c.qkv_bias {
            tensors.push(t(p("self_attn.q_proj.bias"), &[q]));
            tensors.push(t(p("self_attn.k_proj.bias"), &[kv]));
            tensors.push(t(p("self_attn.v_proj.bias"), &[kv]));
        }
        if c.o_bias {
            tensors.push(t(p("self_attn.o_proj.bias"), &[h]));
        }
        if c.qk_norm {
            tensors.push(t(p("self_attn.q_norm.weight"), &[c.head_dim]));
            tensors.push(t(p("self_attn.k_norm.weight"), &[c.head_dim]));
        }
        groups.push(WeightGroup::new(format!("block {i}"), tensors));
    }
    if output == Output::Logits {
        groups.push(WeightGroup::new(
            "head",
            vec![
                t(format!("{prefix}norm.weight"), &[h]),
                // Logits come in blocks of vocabulary rows when the head streams in pieces.
                t(lm_head_name(c, prefix), &[c.vocab_size, h]).split_rows(),
            ],
        ));
        debug_assert_eq!(groups.len(), block(c.num_layers) + 1);
    }
    if output == Output::LastHidden {
        groups.push(WeightGroup::new(
            "final norm",
            vec![t(format!("{prefix}norm.weight"), &[h])],
        ));
    }
    groups
}
