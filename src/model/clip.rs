//! CLIP's text model as transformers' `CLIPTextModel` runs it (CLIP-L is Flux.1's first
//! text encoder): token and learned position embeddings, pre-LayerNorm blocks of causal
//! self-attention and a quick-GELU MLP, a final LayerNorm. Flux takes `pooler_output`: the
//! final-normed row of each prompt's end-of-text token.
//!
//! A block (`text_model.encoder.layers.N`):
//! ```text
//! x = x + out_proj(causal attention(q_proj(LN1(x)), k_proj(…), v_proj(…)))   // scale 1/√d
//! x = x + fc2(quick_gelu(fc1(LN2(x))))
//! ```
//! Causal attention scaled by `1/√head_dim` is a Llama's without RoPE, so it runs on the
//! backend's [`attention`](crate::backend::Backend::attention) over a cache per prompt. No
//! padding mask: Flux passes none (the pads after the end-of-text token never reach it).

use std::ops::Range;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::t5::check_prompts;
use super::z_image::Trace;
use super::{Architecture, Bound, PassCost, PassShape, TensorSpec, WeightGroup, Weights};
use crate::backend::encoder::EncoderOps;
use crate::backend::{AttentionShape, Backend};
use crate::checkpoint::Component;
use crate::error::{Error, Result};

/// config.json of a `CLIPTextModel`, the fields the text model uses.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f32,
    /// 2 in the original CLIP configs (Flux.1's): the pooled row is then at the largest
    /// token id (the end-of-text token is the last of the vocabulary), not at this id.
    pub eos_token_id: u32,
}

/// The `eos_token_id` of legacy CLIP configs, which means "pool at the largest id".
const LEGACY_EOS: u32 = 2;

impl ClipTextConfig {
    /// Parse `json` (read from `path`, which errors name), refusing what ferry does not run.
    pub fn from_json(path: &Path, json: &Value) -> Result<ClipTextConfig> {
        let bad =
            |field: &str, message: String| Error::checkpoint(path, format!("{field}: {message}"));
        fn field<T: DeserializeOwned>(path: &Path, json: &Value, name: &str) -> Result<Option<T>> {
            let v = json.get(name).cloned().unwrap_or(Value::Null);
            serde_json::from_value(v).map_err(|e| Error::Json {
                path: path.to_path_buf(),
                message: format!("CLIP text config field {name:?}: {e}"),
            })
        }
        match json.get("model_type").and_then(Value::as_str) {
            Some("clip_text_model") | None => {}
            Some(other) => {
                return Err(Error::UnsupportedArchitecture {
                    path: path.to_path_buf(),
                    found: other.to_string(),
                    supported: "\"clip_text_model\" for a CLIP text encoder",
                })
            }
        }
        let act = field::<String>(path, json, "hidden_act")?.unwrap_or_else(|| "quick_gelu".into());
        if act != "quick_gelu" {
            return Err(bad(
                "hidden_act",
                format!("{act:?} is not supported; expected \"quick_gelu\" (CLIP-L, as in Flux.1)"),
            ));
        }
        // transformers' CLIPTextConfig defaults where a field is absent.
        let or = |name: &str, default: usize| -> Result<usize> {
            Ok(field::<usize>(path, json, name)?.unwrap_or(default))
        };
        let c = ClipTextConfig {
            vocab_size: or("vocab_size", 49408)?,
            hidden_size: or("hidden_size", 512)?,
            intermediate_size: or("intermediate_size", 2048)?,
            num_hidden_layers: or("num_hidden_layers", 12)?,
            num_attention_heads: or("num_attention_heads", 8)?,
            max_position_embeddings: or("max_position_embeddings", 77)?,
            layer_norm_eps: field::<f32>(path, json, "layer_norm_eps")?.unwrap_or(1e-5),
            eos_token_id: field::<u32>(path, json, "eos_token_id")?.unwrap_or(LEGACY_EOS),
        };
        for (name, v) in [
            ("vocab_size", c.vocab_size),
            ("hidden_size", c.hidden_size),
            ("intermediate_size", c.intermediate_size),
            ("num_hidden_layers", c.num_hidden_layers),
            ("num_attention_heads", c.num_attention_heads),
            ("max_position_embeddings", c.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(bad(name, "is 0; expected a positive number".into()));
            }
        }
        if c.hidden_size % c.num_attention_heads != 0 {
            return Err(bad(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    c.num_attention_heads, c.hidden_size
                ),
            ));
        }
        Ok(c)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

pub struct ClipText {
    pub config: ClipTextConfig,
    /// Before every tensor name: "" as transformers 4 saved `CLIPTextModel` (and
    /// FLUX.1-dev has it), "" as transformers 5 saves it.
    prefix: String,
    groups: Vec<WeightGroup>,
}

/// The token embedding, after the prefix: how [`ClipText::open`] tells the prefix.
const TOKEN_EMBEDDING: &str = "embeddings.token_embedding.weight";

/// The head size of every CLIP text model, for a file without a config.
const HEAD_DIM: usize = 64;

/// The tensor-name prefixes [`ClipText::open`] recognizes.
pub const PREFIXES: [&str; 2] = ["text_model.", ""];

/// Where each part sits among the groups.
const EMBEDDINGS: usize = 0;

/// `x @ weightᵀ + bias`.
struct Linear<'a, W> {
    weight: &'a W,
    bias: &'a W,
}

/// A LayerNorm's weight and bias.
struct Norm<'a, W> {
    weight: &'a W,
    bias: &'a W,
}

/// One block's weights (`text_model.encoder.layers.N`).
struct Layer<'a, W> {
    layer_norm1: Norm<'a, W>,
    q_proj: Linear<'a, W>,
    k_proj: Linear<'a, W>,
    v_proj: Linear<'a, W>,
    out_proj: Linear<'a, W>,
    layer_norm2: Norm<'a, W>,
    fc1: Linear<'a, W>,
    fc2: Linear<'a, W>,
}

impl ClipText {
    /// The text model of `config`, its tensors named after `prefix` (one of [`PREFIXES`]).
    pub fn new(config: ClipTextConfig, prefix: &str) -> ClipText {
        let groups = weight_groups(&config, prefix);
        ClipText {
            config,
            prefix: prefix.to_string(),
            groups,
        }
    }

    /// The text model `json` (a config.json read from `path`) describes, its tensors named
    /// as in FLUX.1-dev (`text_model.…`).
    pub fn from_json(path: &Path, json: &Value) -> Result<ClipText> {
        Ok(ClipText::new(
            ClipTextConfig::from_json(path, json)?,
            PREFIXES[0],
        ))
    }

    /// The text model of `component` (a `CLIPTextModel` directory), its tensors checked.
    pub fn open(component: &Component) -> Result<ClipText> {
        let (path, json) = component.config()?;
        let config = ClipTextConfig::from_json(path, json)?;
        let prefix = PREFIXES
            .into_iter()
            .find(|p| {
                component
                    .tensors
                    .contains_key(&format!("{p}{TOKEN_EMBEDDING}"))
            })
            .ok_or_else(|| Error::MissingTensor {
                path: component.dir.clone(),
                tensor: format!(
                    "text_model.{TOKEN_EMBEDDING} (the token embedding of a CLIPTextModel)"
                ),
            })?;
        let model = ClipText::new(config, prefix);
        model.check_tensors(component)?;
        Ok(model)
    }

    /// The text model of one file (ComfyUI's `clip_l.safetensors`: `CLIPTextModel`'s names,
    /// behind `text_model.` or any other prefix, or none), its config inferred from the
    /// shapes with heads of 64 (every CLIP text model's: L 12 × 64, G 20 × 64), the legacy
    /// end-of-text pooling and CLIP's norm epsilon; its tensors checked.
    pub fn open_file(path: &Path) -> Result<(ClipText, Component)> {
        let tensors = crate::checkpoint::safetensors::read_map(path)?;
        let prefix =
            crate::checkpoint::safetensors::prefix_before(&tensors, TOKEN_EMBEDDING)
                .ok_or_else(|| {
                    Error::checkpoint(
                        path,
                        format!("unknown layout: expected tensor text_model.{TOKEN_EMBEDDING} (a CLIP text encoder's token embedding, as CLIPTextModel names it)"),
                    )
                })?;
        let shape = |name: &str, rank: usize| -> Result<Vec<usize>> {
            let name = format!("{prefix}{name}");
            let t = tensors.get(&name).ok_or_else(|| Error::MissingTensor {
                path: path.to_path_buf(),
                tensor: name.clone(),
            })?;
            match t.shape.len() == rank && !t.shape.contains(&0) {
                true => Ok(t.shape.clone()),
                false => Err(Error::checkpoint(
                    path,
                    format!(
                        "tensor {name:?} is {:?}; expected {rank} positive dimensions",
                        t.shape
                    ),
                )),
            }
        };
        let embed = shape(TOKEN_EMBEDDING, 2)?; // [vocab, hidden]
        let positions = shape("embeddings.position_embedding.weight", 2)?; // [positions, hidden]
        let fc1 = shape("encoder.layers.0.mlp.fc1.weight", 2)?; // [intermediate, hidden]
        let hidden = embed[1];
        if hidden % HEAD_DIM != 0 {
            return Err(Error::checkpoint(
                path,
                format!("the token embedding is {hidden} wide; expected a multiple of {HEAD_DIM} (the file carries no config, and CLIP text models have heads of {HEAD_DIM})"),
            ));
        }
        let layers = (0..)
            .take_while(|i| {
                tensors.contains_key(&format!(
                    "{prefix}encoder.layers.{i}.self_attn.q_proj.weight"
                ))
            })
            .count();
        let json = serde_json::json!({
            "model_type": "clip_text_model",
            "hidden_act": "quick_gelu",
            "vocab_size": embed[0],
            "hidden_size": hidden,
            "intermediate_size": fc1[0],
            "num_hidden_layers": layers,
            "num_attention_heads": hidden / HEAD_DIM,
            "max_position_embeddings": positions[0],
            "layer_norm_eps": 1e-5,
            "eos_token_id": LEGACY_EOS,
        });
        let config = ClipTextConfig::from_json(path, &json)?;
        let component = Component::from_file("text_encoder", path, tensors);
        let model = ClipText::new(config, &prefix);
        model.check_tensors(&component)?;
        Ok((model, component))
    }

    /// `name` after the prefix.
    fn name(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    pub fn attention_shape(&self) -> AttentionShape {
        let c = &self.config;
        AttentionShape {
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_attention_heads,
            head_dim: c.head_dim(),
            sliding_window: None,
        }
    }

    /// The row of `ids` that `pooler_output` takes: with the legacy `eos_token_id` (2) the
    /// first largest id, else the first `eos_token_id`; row 0 when there is none, as
    /// transformers' `(ids == eos).int().argmax()` gives.
    pub fn pooled_row(&self, ids: &[u32]) -> usize {
        let eos = self.config.eos_token_id;
        if eos == LEGACY_EOS {
            let max = ids.iter().copied().max().unwrap_or(0);
            ids.iter().position(|&i| i == max).unwrap_or(0)
        } else {
            ids.iter().position(|&i| i == eos).unwrap_or(0)
        }
    }

    fn final_group(&self) -> usize {
        1 + self.config.num_hidden_layers
    }

    /// `[Σ lengths, hidden]` f32: every prompt's `last_hidden_state`, prompt after prompt.
    pub fn forward<B: EncoderOps>(
        &self,
        backend: &B,
        weights: &mut impl Weights<B::Weight>,
        prompts: &[&[u32]],
    ) -> Result<Vec<f32>> {
        self.forward_traced(backend, weights, prompts, None)
    }

    /// Each prompt's `pooler_output`, `[hidden]` f32.
    pub fn pooled<B: EncoderOps>(
        &self,
        backend: &B,
        weights: &mut impl Weights<B::Weight>,
        prompts: &[&[u32]],
    ) -> Result<Vec<Vec<f32>>> {
        let hidden = self.forward(backend, weights, prompts)?;
        Ok(self.pick_pooled(&hidden, prompts))
    }

    /// Each prompt's pooled row of `hidden` (`[Σ lengths, hidden]`, as [`forward`](Self::forward) gives).
    pub fn pick_pooled(&self, hidden: &[f32], prompts: &[&[u32]]) -> Vec<Vec<f32>> {
        let d = self.config.hidden_size;
        let mut start = 0;
        prompts
            .iter()
            .map(|p| {
                let row = start + self.pooled_row(p);
                start += p.len();
                hidden[row * d..(row + 1) * d].to_vec()
            })
            .collect()
    }

    /// [`forward`](Self::forward), handing `trace` the intermediates on the host: `embeds`
    /// and `layers.{i}` (each block's output), `[Σ lengths, hidden]`.
    pub fn forward_traced<B: EncoderOps>(
        &self,
        backend: &B,
        weights: &mut impl Weights<B::Weight>,
        prompts: &[&[u32]],
        mut trace: Option<&mut Trace<'_>>,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let samples = check_prompts(prompts, c.vocab_size, Some(c.max_position_embeddings))?;
        let rows = samples.last().map_or(0, |r| r.end);
        let mut tap = |name: &str, x: &B::Activation| -> Result<()> {
            if let Some(t) = trace.as_deref_mut() {
                t(name, backend.to_host(x)?);
            }
            Ok(())
        };
        let mut x = {
            let w = Bound::new(&self.groups[EMBEDDINGS], weights.group(EMBEDDINGS)?);
            let ids: Vec<u32> = prompts.concat();
            let positions: Vec<u32> = samples.iter().flat_map(|r| 0..r.len() as u32).collect();
            let mut x = backend.embed(w.get(&self.name(TOKEN_EMBEDDING)), &ids)?;
            let pos = backend.embed(
                w.get(&self.name("embeddings.position_embedding.weight")),
                &positions,
            )?;
            backend.add_assign(&mut x, 0, &pos)?;
            x // [rows, hidden]
        };
        tap("embeds", &x)?;
        let shape = self.attention_shape();
        let layers = c.num_hidden_layers;
        let mut caches = samples
            .iter()
            .map(|r| backend.kv_cache(layers, shape, r.len()))
            .collect::<Result<Vec<_>>>()?;
        let eps = c.layer_norm_eps;
        for i in 0..layers {
            let g = 1 + i;
            let w = self.layer(g, i, weights.group(g)?);
            let h = norm(backend, &x, &w.layer_norm1, eps)?;
            let (q, k, v) = (
                w.q_proj.forward(backend, &h)?,
                w.k_proj.forward(backend, &h)?,
                w.v_proj.forward(backend, &h)?,
            );
            drop(h);
            let mut a = backend.activation(rows, c.hidden_size)?;
            for (r, cache) in samples.iter().zip(caches.iter_mut()) {
                let rows: Range<usize> = r.clone();
                backend.attention(&q, &k, &v, rows, cache, i, 0, shape, &mut a)?;
            }
            drop((q, k, v));
            backend.linear_add(&mut x, 0, &a, w.out_proj.weight, Some(w.out_proj.bias))?;
            drop(a);
            let h = norm(backend, &x, &w.layer_norm2, eps)?;
            let mut f = w.fc1.forward(backend, &h)?; // [rows, intermediate]
            drop(h);
            backend.quick_gelu(&mut f)?;
            backend.linear_add(&mut x, 0, &f, w.fc2.weight, Some(w.fc2.bias))?;
            tap(&format!("layers.{i}"), &x)?;
        }
        drop(caches);
        let out = {
            let g = self.final_group();
            let w = Bound::new(&self.groups[g], weights.group(g)?);
            let n = Norm {
                weight: w.get(&self.name("final_layer_norm.weight")),
                bias: w.get(&self.name("final_layer_norm.bias")),
            };
            backend.to_host(&norm(backend, &x, &n, eps)?)?
        };
        weights.finish_pass()?;
        Ok(out)
    }

    fn layer<'a, W>(&'a self, g: usize, i: usize, ws: &'a [W]) -> Layer<'a, W> {
        let w = Bound::new(&self.groups[g], ws);
        let p = |s: &str| w.get(&self.name(&format!("encoder.layers.{i}.{s}")));
        let linear = |s: &str| Linear {
            weight: p(&format!("{s}.weight")),
            bias: p(&format!("{s}.bias")),
        };
        let norm = |s: &str| Norm {
            weight: p(&format!("{s}.weight")),
            bias: p(&format!("{s}.bias")),
        };
        Layer {
            layer_norm1: norm("layer_norm1"),
            q_proj: linear("self_attn.q_proj"),
            k_proj: linear("self_attn.k_proj"),
            v_proj: linear("self_attn.v_proj"),
            out_proj: linear("self_attn.out_proj"),
            layer_norm2: norm("layer_norm2"),
            fc1: linear("mlp.fc1"),
            fc2: linear("mlp.fc2"),
        }
    }
}

impl<W> Linear<'_, W> {
    fn forward<B: Backend<Weight = W>>(
        &self,
        backend: &B,
        x: &B::Activation,
    ) -> Result<B::Activation> {
        backend.linear(x, self.weight, Some(self.bias))
    }
}

fn norm<B: EncoderOps>(
    backend: &B,
    x: &B::Activation,
    n: &Norm<'_, B::Weight>,
    eps: f32,
) -> Result<B::Activation> {
    backend.layer_norm_affine(x, n.weight, n.bias, eps)
}

impl Architecture for ClipText {
    /// The embeddings (gathered on the host), the blocks, the final norm.
    fn groups(&self) -> &[WeightGroup] {
        &self.groups
    }

    /// 2 FLOPs per multiply-add: per row q, k, v, out (4·d²) and the MLP (2·d·ffn);
    /// causal attention about tokens·d per row for QKᵀ and as much for AV.
    fn pass_cost(&self, shape: PassShape) -> PassCost {
        let c = &self.config;
        let (rows, t) = (shape.rows() as f64, shape.tokens as f64);
        let (d, ff) = (c.hidden_size as f64, c.intermediate_size as f64);
        let block = 2.0 * rows * (4.0 * d * d + 2.0 * d * ff) + 2.0 * rows * t * d;
        let mut flops = vec![0.0];
        flops.extend(std::iter::repeat_n(block, c.num_hidden_layers));
        flops.push(0.0);
        let r = shape.rows();
        let attn = 6 * r * c.hidden_size * 2;
        let mlp = (2 * c.hidden_size + c.intermediate_size) * r * 2;
        PassCost {
            flops,
            workspace: attn.max(mlp) + r * c.hidden_size * 4 + (1 << 20),
            // Keys and values of every layer for every row, bf16.
            cache: c.num_hidden_layers * r * 2 * c.hidden_size * 2,
        }
    }
}

/// The groups with the tensors (transformers' names) and shapes each holds.
fn weight_groups(c: &ClipTextConfig, prefix: &str) -> Vec<WeightGroup> {
    let t = |name: String, shape: &[usize]| TensorSpec::new(format!("{prefix}{name}"), shape);
    let (d, ff) = (c.hidden_size, c.intermediate_size);
    let mut groups = vec![WeightGroup {
        host_gather: true,
        ..WeightGroup::new(
            "embeddings",
            vec![
                t(TOKEN_EMBEDDING.into(), &[c.vocab_size, d]),
                t(
                    "embeddings.position_embedding.weight".into(),
                    &[c.max_position_embeddings, d],
                ),
            ],
        )
    }];
    for i in 0..c.num_hidden_layers {
        let p = |s: &str| format!("encoder.layers.{i}.{s}");
        let mut tensors = Vec::new();
        // A LayerNorm is `[d]` weight and bias; a linear `[rows, cols]` and `[rows]`.
        let mut add = |s: &str, shape: &[usize]| {
            tensors.push(t(p(&format!("{s}.weight")), shape));
            tensors.push(t(p(&format!("{s}.bias")), &shape[..1]));
        };
        add("layer_norm1", &[d]);
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            add(&format!("self_attn.{proj}"), &[d, d]);
        }
        add("layer_norm2", &[d]);
        add("mlp.fc1", &[ff, d]);
        add("mlp.fc2", &[d, ff]);
        groups.push(WeightGroup::new(format!("layer {i}"), tensors));
    }
    groups.push(WeightGroup::new(
        "final norm",
        vec![
            t("final_layer_norm.weight".into(), &[d]),
            t("final_layer_norm.bias".into(), &[d]),
        ],
    ));
    groups
}
