//! T5's encoder as transformers' `T5EncoderModel` runs it (T5-XXL v1.1 is Flux.1's second
//! text encoder): token embedding (unscaled), blocks of pre-norm self-attention and a gated
//! GELU feed-forward, a final norm; the output is `last_hidden_state`.
//!
//! A block (`encoder.block.N`):
//! ```text
//! h = RMSNorm(x)                      // T5LayerNorm: no mean, no bias
//! x = x + o(attention(q(h), k(h), v(h)) + position bias, no 1/√d scale)
//! h = RMSNorm(x)
//! x = x + wo(gelu_tanh(wi_0(h)) · wi_1(h))
//! ```
//! The position bias is a table `[num_buckets, heads]` of block 0
//! (`relative_attention_bias`), read by the bucket of each key's position relative to the
//! query and shared by every block. No attention mask: Flux lets every token, pads
//! included, attend (the pipeline passes none).
//!
//! A pass holds several prompts stacked row-wise, each attending to its own rows only.

use std::ops::Range;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::z_image::Trace;
use super::{Architecture, Bound, PassCost, PassShape, TensorSpec, WeightGroup, Weights};
use crate::backend::encoder::EncoderOps;
use crate::checkpoint::Component;
use crate::error::{Error, Result};

/// The token embedding as `T5EncoderModel` saves it (`shared`, tied to
/// `encoder.embed_tokens`), and the other name the tie may leave in a file.
pub const EMBED_NAMES: [&str; 2] = ["shared.weight", "encoder.embed_tokens.weight"];

/// The `feed_forward_proj` values ferry runs: a gated GELU with the tanh approximation.
const GATED_GELU: [&str; 2] = ["gated-gelu", "gated-gelu_new"];

/// config.json of a `T5EncoderModel`, the fields the encoder uses.
#[derive(Clone, Debug, PartialEq)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    /// Width of one head.
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f32,
}

impl T5Config {
    /// Parse `json` (read from `path`, which errors name), refusing what ferry does not run.
    pub fn from_json(path: &Path, json: &Value) -> Result<T5Config> {
        let bad =
            |field: &str, message: String| Error::checkpoint(path, format!("{field}: {message}"));
        fn field<T: DeserializeOwned>(path: &Path, json: &Value, name: &str) -> Result<Option<T>> {
            let v = json.get(name).cloned().unwrap_or(Value::Null);
            serde_json::from_value(v).map_err(|e| Error::Json {
                path: path.to_path_buf(),
                message: format!("T5 config field {name:?}: {e}"),
            })
        }
        match json.get("model_type").and_then(Value::as_str) {
            Some("t5") | None => {}
            Some(other) => {
                return Err(Error::UnsupportedArchitecture {
                    path: path.to_path_buf(),
                    found: other.to_string(),
                    supported: "\"t5\" for a T5 text encoder",
                })
            }
        }
        // transformers' T5Config defaults where a field is absent.
        let or = |name: &str, default: usize| -> Result<usize> {
            Ok(field::<usize>(path, json, name)?.unwrap_or(default))
        };
        let proj =
            field::<String>(path, json, "feed_forward_proj")?.unwrap_or_else(|| "relu".into());
        if !GATED_GELU.contains(&proj.as_str()) {
            return Err(bad(
                "feed_forward_proj",
                format!(
                    "{proj:?} is not supported; expected \"gated-gelu\" (T5 v1.1, as in Flux.1)"
                ),
            ));
        }
        if field::<bool>(path, json, "is_decoder")? == Some(true) {
            return Err(bad("is_decoder", "is true; expected an encoder".into()));
        }
        let c = T5Config {
            vocab_size: or("vocab_size", 32128)?,
            d_model: or("d_model", 512)?,
            d_kv: or("d_kv", 64)?,
            d_ff: or("d_ff", 2048)?,
            num_layers: or("num_layers", 6)?,
            num_heads: or("num_heads", 8)?,
            relative_attention_num_buckets: or("relative_attention_num_buckets", 32)?,
            relative_attention_max_distance: or("relative_attention_max_distance", 128)?,
            layer_norm_epsilon: field::<f32>(path, json, "layer_norm_epsilon")?.unwrap_or(1e-6),
        };
        for (name, v) in [
            ("vocab_size", c.vocab_size),
            ("d_model", c.d_model),
            ("d_kv", c.d_kv),
            ("d_ff", c.d_ff),
            ("num_layers", c.num_layers),
            ("num_heads", c.num_heads),
        ] {
            if v == 0 {
                return Err(bad(name, "is 0; expected a positive number".into()));
            }
        }
        if c.relative_attention_num_buckets < 4 || c.relative_attention_max_distance < 4 {
            return Err(bad(
                "relative_attention_num_buckets",
                format!(
                    "{} buckets up to distance {}; expected at least 4 of each",
                    c.relative_attention_num_buckets, c.relative_attention_max_distance
                ),
            ));
        }
        Ok(c)
    }

    /// Width of q, k, v: heads × d_kv.
    pub fn inner_dim(&self) -> usize {
        self.num_heads * self.d_kv
    }
}

/// The bucket of a key at `relative` positions from its query (key − query) in a
/// bidirectional encoder, as transformers' `T5Attention._relative_position_bucket`: half the
/// buckets for keys after the query; within a half, exact distances below a quarter of the
/// buckets, then logarithmic up to `max_distance`, the last bucket beyond.
pub fn relative_position_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = (num_buckets / 2) as i64;
    let mut bucket = if relative > 0 { half } else { 0 };
    let n = relative.abs();
    let max_exact = half / 2;
    if n < max_exact {
        bucket += n;
    } else {
        // In f32 as torch computes it: log(n / max_exact) / log(max_distance / max_exact)
        // · (half − max_exact), truncated.
        let ratio = (max_distance as f64 / max_exact as f64).ln() as f32;
        let large = ((n as f32 / max_exact as f32).ln() / ratio * (half - max_exact) as f32) as i64;
        bucket += (max_exact + large).min(half - 1);
    }
    bucket as usize
}

pub struct T5Encoder {
    pub config: T5Config,
    /// The token embedding's name in the checkpoint (one of [`EMBED_NAMES`]).
    embed_name: String,
    groups: Vec<WeightGroup>,
}

/// Where each part sits among the groups.
const EMBEDDING: usize = 0;

/// One block's weights (`encoder.block.N`).
struct Block<'a, W> {
    attn_norm: &'a W,
    q: &'a W,
    k: &'a W,
    v: &'a W,
    o: &'a W,
    /// `[num_buckets, heads]`: block 0 only.
    relative_attention_bias: Option<&'a W>,
    ff_norm: &'a W,
    wi_0: &'a W,
    wi_1: &'a W,
    wo: &'a W,
}

impl T5Encoder {
    /// The encoder of `config`, its token embedding called `embed_name`.
    pub fn new(config: T5Config, embed_name: &str) -> T5Encoder {
        let groups = weight_groups(&config, embed_name);
        T5Encoder {
            config,
            embed_name: embed_name.to_string(),
            groups,
        }
    }

    /// The encoder `json` (a config.json read from `path`) describes, with the usual
    /// embedding name.
    pub fn from_json(path: &Path, json: &Value) -> Result<T5Encoder> {
        Ok(T5Encoder::new(
            T5Config::from_json(path, json)?,
            EMBED_NAMES[0],
        ))
    }

    /// The encoder of `component` (a `T5EncoderModel` directory, one file or shards), its
    /// tensors checked.
    pub fn open(component: &Component) -> Result<T5Encoder> {
        let (path, json) = component.config()?;
        let config = T5Config::from_json(path, json)?;
        let embed = EMBED_NAMES
            .into_iter()
            .find(|n| component.tensors.contains_key(*n))
            .ok_or_else(|| Error::MissingTensor {
                path: component.dir.clone(),
                tensor: format!(
                    "{} (the token embedding; or {})",
                    EMBED_NAMES[0], EMBED_NAMES[1]
                ),
            })?;
        let model = T5Encoder::new(config, embed);
        model.check_tensors(component)?;
        Ok(model)
    }

    /// The encoder of one file (ComfyUI's `t5xxl_fp16.safetensors`: `T5EncoderModel`'s
    /// names), its config inferred from the shapes (the heads from the position bias table,
    /// `[num_buckets, heads]`), T5 v1.1's gated GELU, maximum distance and norm epsilon; its
    /// tensors checked.
    pub fn open_file(path: &Path) -> Result<(T5Encoder, Component)> {
        const Q: &str = "encoder.block.0.layer.0.SelfAttention.q.weight";
        let tensors = crate::checkpoint::safetensors::read_map(path)?;
        let embed = EMBED_NAMES.into_iter().find(|n| tensors.contains_key(*n));
        let (Some(embed), true) = (embed, tensors.contains_key(Q)) else {
            return Err(Error::checkpoint(
                path,
                format!("unknown layout: expected tensors {} (or {}) and {Q} (a T5 encoder, as T5EncoderModel names it)", EMBED_NAMES[0], EMBED_NAMES[1]),
            ));
        };
        let shape = |name: &str| -> Result<Vec<usize>> {
            let t = tensors.get(name).ok_or_else(|| Error::MissingTensor {
                path: path.to_path_buf(),
                tensor: name.to_string(),
            })?;
            match t.shape.len() == 2 && !t.shape.contains(&0) {
                true => Ok(t.shape.clone()),
                false => Err(Error::checkpoint(
                    path,
                    format!(
                        "tensor {name:?} is {:?}; expected 2 positive dimensions",
                        t.shape
                    ),
                )),
            }
        };
        let vocab = shape(embed)?; // [vocab, d_model]
        let q = shape(Q)?; // [heads · d_kv, d_model]
        let bias = shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")?; // [buckets, heads]
        let wi = shape("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")?; // [d_ff, d_model]
        let heads = bias[1];
        if q[0] % heads != 0 {
            return Err(Error::checkpoint(
                path,
                format!("tensor {Q:?} has {} rows; expected a multiple of the position bias's {heads} heads", q[0]),
            ));
        }
        let layers = (0..)
            .take_while(|i| {
                tensors.contains_key(&format!("encoder.block.{i}.layer.0.SelfAttention.q.weight"))
            })
            .count();
        let json = serde_json::json!({
            "model_type": "t5",
            "feed_forward_proj": "gated-gelu",
            "vocab_size": vocab[0],
            "d_model": vocab[1],
            "d_kv": q[0] / heads,
            "d_ff": wi[0],
            "num_layers": layers,
            "num_heads": heads,
            "relative_attention_num_buckets": bias[0],
            "relative_attention_max_distance": 128,
            "layer_norm_epsilon": 1e-6,
        });
        let config = T5Config::from_json(path, &json)?;
        let component = Component::from_file("text_encoder_2", path, tensors);
        let model = T5Encoder::new(config, embed);
        model.check_tensors(&component)?;
        Ok((model, component))
    }

    fn block_group(i: usize) -> usize {
        1 + i
    }
    fn final_group(&self) -> usize {
        1 + self.config.num_layers
    }

    /// `[Σ lengths, d_model]` f32: every prompt's `last_hidden_state`, prompt after prompt.
    pub fn forward<B: EncoderOps>(
        &self,
        backend: &B,
        weights: &mut impl Weights<B::Weight>,
        prompts: &[&[u32]],
    ) -> Result<Vec<f32>> {
        self.forward_traced(backend, weights, prompts, None)
    }

    /// [`forward`](Self::forward), handing `trace` the intermediates on the host: `embeds`
    /// and `blocks.{i}` (each block's output), `[Σ lengths, d_model]`.
    pub fn forward_traced<B: EncoderOps>(
        &self,
        backend: &B,
        weights: &mut impl Weights<B::Weight>,
        prompts: &[&[u32]],
        mut trace: Option<&mut Trace<'_>>,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let samples = check_prompts(prompts, c.vocab_size, None)?;
        let span = samples.iter().map(Range::len).max().unwrap_or(0);
        let mut tap = |name: &str, x: &B::Activation| -> Result<()> {
            if let Some(t) = trace.as_deref_mut() {
                t(name, backend.to_host(x)?);
            }
            Ok(())
        };
        let ids: Vec<u32> = prompts.concat();
        let mut x = {
            let w = Bound::new(&self.groups[EMBEDDING], weights.group(EMBEDDING)?);
            backend.embed(w.get(&self.embed_name), &ids)? // [rows, d_model]
        };
        tap("embeds", &x)?;
        // The bucket of every relative position −(span−1) ..= span−1.
        let buckets: Vec<u32> = (0..2 * span.max(1) - 1)
            .map(|r| {
                let rel = r as i64 - (span.max(1) as i64 - 1);
                relative_position_bucket(
                    rel,
                    c.relative_attention_num_buckets,
                    c.relative_attention_max_distance,
                ) as u32
            })
            .collect();
        let mut bias = None; // [2·span − 1, heads], from block 0
        let eps = c.layer_norm_epsilon;
        for i in 0..c.num_layers {
            let g = Self::block_group(i);
            let w = self.block(g, i, weights.group(g)?);
            if let Some(table) = w.relative_attention_bias {
                bias = Some(backend.embed(table, &buckets)?);
            }
            let bias = bias.as_ref().expect("block 0 holds the position bias");
            let h = backend.rms_norm(&x, w.attn_norm, eps)?;
            let (q, k, v) = (
                backend.linear(&h, w.q, None)?,
                backend.linear(&h, w.k, None)?,
                backend.linear(&h, w.v, None)?,
            );
            drop(h);
            let a = backend.attention_biased(&q, &k, &v, bias, &samples, c.num_heads, c.d_kv)?;
            drop((q, k, v));
            backend.linear_add(&mut x, 0, &a, w.o, None)?;
            drop(a);
            let h = backend.rms_norm(&x, w.ff_norm, eps)?;
            let mut gate = backend.linear(&h, w.wi_0, None)?; // [rows, d_ff]
            let up = backend.linear(&h, w.wi_1, None)?;
            drop(h);
            backend.gelu_tanh_mul(&mut gate, &up)?;
            drop(up);
            backend.linear_add(&mut x, 0, &gate, w.wo, None)?;
            tap(&format!("blocks.{i}"), &x)?;
        }
        let out = {
            let g = self.final_group();
            let w = Bound::new(&self.groups[g], weights.group(g)?);
            let y = backend.rms_norm(&x, w.get("encoder.final_layer_norm.weight"), eps)?;
            backend.to_host(&y)?
        };
        weights.finish_pass()?;
        Ok(out)
    }

    fn block<'a, W>(&'a self, g: usize, i: usize, ws: &'a [W]) -> Block<'a, W> {
        let w = Bound::new(&self.groups[g], ws);
        let p = |s: &str| w.get(&format!("encoder.block.{i}.{s}"));
        Block {
            attn_norm: p("layer.0.layer_norm.weight"),
            q: p("layer.0.SelfAttention.q.weight"),
            k: p("layer.0.SelfAttention.k.weight"),
            v: p("layer.0.SelfAttention.v.weight"),
            o: p("layer.0.SelfAttention.o.weight"),
            relative_attention_bias: w.opt(&format!(
                "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight"
            )),
            ff_norm: p("layer.1.layer_norm.weight"),
            wi_0: p("layer.1.DenseReluDense.wi_0.weight"),
            wi_1: p("layer.1.DenseReluDense.wi_1.weight"),
            wo: p("layer.1.DenseReluDense.wo.weight"),
        }
    }
}

/// Each prompt's rows in a pass that stacks them, checked: at least one prompt, none empty,
/// none longer than `max_len` (when there is one), every id below `vocab`.
pub(super) fn check_prompts(
    prompts: &[&[u32]],
    vocab: usize,
    max_len: Option<usize>,
) -> Result<Vec<Range<usize>>> {
    let bad = |message: String| Error::Flag {
        flag: "token ids",
        message,
    };
    if prompts.is_empty() || prompts.iter().any(|p| p.is_empty()) {
        return Err(bad(
            "expected at least one prompt, each of at least one token".into(),
        ));
    }
    let mut rows = Vec::with_capacity(prompts.len());
    let mut start = 0;
    for (n, p) in prompts.iter().enumerate() {
        if let Some(max) = max_len.filter(|&m| p.len() > m) {
            return Err(bad(format!(
                "prompt {n} has {} tokens; the model takes at most {max}",
                p.len()
            )));
        }
        if let Some(&id) = p.iter().find(|&&id| id as usize >= vocab) {
            return Err(bad(format!(
                "prompt {n} has token id {id}; the embedding has {vocab} rows"
            )));
        }
        rows.push(start..start + p.len());
        start += p.len();
    }
    Ok(rows)
}

impl Architecture for T5Encoder {
    /// The embedding (gathered on the host), the blocks, the final norm.
    fn groups(&self) -> &[WeightGroup] {
        &self.groups
    }

    /// 2 FLOPs per multiply-add: per row q, k, v, o (4·d·inner) and the feed-forward
    /// (3·d·d_ff); attention 2·tokens·inner per row for QKᵀ and as much for AV.
    fn pass_cost(&self, shape: PassShape) -> PassCost {
        let c = &self.config;
        let (rows, t) = (shape.rows() as f64, shape.tokens as f64);
        let (d, inner, ff) = (c.d_model as f64, c.inner_dim() as f64, c.d_ff as f64);
        let block = 2.0 * rows * (4.0 * d * inner + 3.0 * d * ff) + 4.0 * rows * t * inner;
        let mut flops = vec![0.0];
        flops.extend(std::iter::repeat_n(block, c.num_layers));
        flops.push(0.0);
        // bf16: the residual, the normed input, q, k, v and the attention output, or in the
        // feed-forward the residual, the normed input and gate and up; the position bias;
        // host copies of the output in f32.
        let r = shape.rows();
        let attn = (2 * c.d_model + 4 * c.inner_dim()) * r * 2;
        let ffn = (2 * c.d_model + 2 * c.d_ff) * r * 2;
        let workspace = attn.max(ffn) + 2 * shape.tokens * c.num_heads * 2 + r * c.d_model * 4;
        PassCost {
            flops,
            workspace: workspace + (1 << 20),
            cache: 0,
        }
    }
}

/// The groups with the tensors (transformers' names) and shapes each holds.
fn weight_groups(c: &T5Config, embed_name: &str) -> Vec<WeightGroup> {
    let t = |name: String, shape: &[usize]| TensorSpec::new(name, shape);
    let (d, inner, ff) = (c.d_model, c.inner_dim(), c.d_ff);
    let mut groups = vec![WeightGroup {
        host_gather: true,
        ..WeightGroup::new(
            "embedding",
            vec![t(embed_name.to_string(), &[c.vocab_size, d])],
        )
    }];
    for i in 0..c.num_layers {
        let p = |s: &str| format!("encoder.block.{i}.{s}");
        let mut tensors = vec![
            t(p("layer.0.layer_norm.weight"), &[d]),
            t(p("layer.0.SelfAttention.q.weight"), &[inner, d]),
            t(p("layer.0.SelfAttention.k.weight"), &[inner, d]),
            t(p("layer.0.SelfAttention.v.weight"), &[inner, d]),
            t(p("layer.0.SelfAttention.o.weight"), &[d, inner]),
        ];
        if i == 0 {
            tensors.push(t(
                p("layer.0.SelfAttention.relative_attention_bias.weight"),
                &[c.relative_attention_num_buckets, c.num_heads],
            ));
        }
        tensors.extend([
            t(p("layer.1.layer_norm.weight"), &[d]),
            t(p("layer.1.DenseReluDense.wi_0.weight"), &[ff, d]),
            t(p("layer.1.DenseReluDense.wi_1.weight"), &[ff, d]),
            t(p("layer.1.DenseReluDense.wo.weight"), &[d, ff]),
        ]);
        groups.push(WeightGroup::new(format!("block {i}"), tensors));
    }
    groups.push(WeightGroup::new(
        "final norm",
        vec![t("encoder.final_layer_norm.weight".into(), &[d])],
    ));
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers' buckets for 32 buckets up to distance 128 at a few distances.
    #[test]
    fn buckets_follow_t5() {
        let b = |r| relative_position_bucket(r, 32, 128);
        assert_eq!([b(0), b(-1), b(-7), b(1), b(7)], [0, 1, 7, 17, 23]);
        assert_eq!(
            [b(-8), b(-12), b(-16), b(-128), b(-500)],
            [8, 9, 10, 15, 15]
        );
        assert_eq!([b(8), b(500)], [24, 31]);
    }
}
