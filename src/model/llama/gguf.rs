//! Llama-family GGUF files: the metadata read as a [`LlamaConfig`] (checked against the tensor
//! shapes), the tensors renamed to their Hugging Face names and `[out, in]` shapes, and
//! llama.cpp's permuted Q/K rows of the `llama` architecture put back in Hugging Face order.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::{Arch, Llama, Llama3RopeScaling, LlamaConfig};
use crate::checkpoint::gguf::tokenizer::tokenizer_and_generation;
use crate::checkpoint::gguf::{self, parse_header, Header, Load, Meta, TensorInfo, Weights};
use crate::checkpoint::{DType, Format, Storage};
use crate::error::{Error, Result};
use crate::model::{Architecture, Checkpoint};

/// Architectures this reader turns into a [`LlamaConfig`].
const SUPPORTED_ARCHS: &str = "llama (incl. mistral converted as llama), qwen2, qwen3";

/// Open a GGUF file: map it, read its config and tokenizer, and hold its tensors as `weights`
/// says under Hugging Face names and shapes.
pub fn open(path: &Path, weights: Weights) -> Result<Checkpoint> {
    let mut ckpt = from_storage(path, Arc::new(Storage::map(path)?), weights)?;
    ckpt.stored.files = vec![path.to_path_buf()];
    Ok(ckpt)
}

/// [`open`] on a file already in memory, every tensor dequantized to `target`; `path` is
/// only named in messages.
pub fn from_bytes(path: &Path, bytes: &[u8], target: DType) -> Result<Checkpoint> {
    let mut storage = Storage::owned(bytes.len());
    storage
        .bytes_mut()
        .expect("owned storage is writable")
        .copy_from_slice(bytes);
    from_storage(path, Arc::new(storage), Weights::Dequantized(target))
}

fn from_storage(path: &Path, storage: Arc<Storage>, weights: Weights) -> Result<Checkpoint> {
    let bytes = storage.bytes();
    let header = parse_header(bytes).map_err(|e| Error::checkpoint(path, format!("GGUF: {e}")))?;
    let meta = Meta {
        path,
        map: &header.metadata,
    };

    let (config, permute_qk) = llama_config(&meta, &header, bytes)?;
    let plan = plan_tensors(path, &header, &config, permute_qk)?;
    let (tokenizer, generation) = tokenizer_and_generation(&meta, config.vocab_size)?;

    let stored = gguf::stored(bytes.len(), &plan);
    let tensors = gguf::load_all(path, &storage, &plan, weights)?;
    let ckpt = Checkpoint {
        path: path.to_path_buf(),
        format: Format::Gguf,
        config,
        tensors,
        tokenizer,
        generation,
        stored,
    };
    crate::model::Llama::new(ckpt.config.clone()).check_tensors(&ckpt)?;
    Ok(ckpt)
}

/// The model config from the metadata, checked against the tensor shapes; and whether Q and
/// K rows are stored permuted (llama.cpp's `llama` architecture).
fn llama_config(meta: &Meta, header: &Header, bytes: &[u8]) -> Result<(LlamaConfig, bool)> {
    let path = meta.path;
    let arch_name = meta
        .opt_str("general.architecture")?
        .ok_or_else(|| meta.bad("general.architecture is missing".into()))?;
    // llama.cpp's converter permutes Q/K rows for the architectures whose rotary embedding is
    // the interleaved (GPT-J) kind: llama, and mistral which it writes as llama. qwen2 and
    // qwen3 use the NeoX (rotate-half) layout, the same as Hugging Face: no permutation.
    let (arch, permute_qk) = match arch_name {
        "llama" => (Arch::Llama, true),
        "qwen2" => (Arch::Qwen2, false),
        "qwen3" => (Arch::Qwen3, false),
        other => {
            return Err(Error::UnsupportedArchitecture {
                path: path.to_path_buf(),
                found: other.to_string(),
                supported: SUPPORTED_ARCHS,
            })
        }
    };
    let key = |k: &str| format!("{arch_name}.{k}");
    let tensor = |name: &str| header.tensors.iter().find(|t| t.name == name);

    let hidden_size = meta.usize(&key("embedding_length"))?;
    let num_layers = meta.usize(&key("block_count"))?;
    let intermediate_size = meta.usize(&key("feed_forward_length"))?;
    let num_heads = meta.usize(&key("attention.head_count"))?;
    let num_kv_heads = meta
        .opt_usize(&key("attention.head_count_kv"))?
        .unwrap_or(num_heads);
    let max_position_embeddings = meta.usize(&key("context_length"))?;
    let rms_norm_eps = meta
        .opt_f64(&key("attention.layer_norm_rms_epsilon"))?
        .ok_or_else(|| {
            meta.bad(format!(
                "{} is missing",
                key("attention.layer_norm_rms_epsilon")
            ))
        })?;
    let rope_theta = meta.opt_f64(&key("rope.freq_base"))?.unwrap_or(10000.0);

    for (k, v) in [
        ("embedding_length", hidden_size),
        ("block_count", num_layers),
        ("feed_forward_length", intermediate_size),
        ("context_length", max_position_embeddings),
    ] {
        if v == 0 {
            return Err(meta.bad(format!("{} is 0; expected a positive size", key(k))));
        }
    }
    for (k, v) in [
        ("attention.layer_norm_rms_epsilon", rms_norm_eps),
        ("rope.freq_base", rope_theta),
    ] {
        if !(v.is_finite() && v > 0.0) {
            return Err(meta.bad(format!("{} is {v}; expected a positive number", key(k))));
        }
    }
    // Every block has at least 9 tensors; a larger count would only make the model describe
    // tensors that cannot be there (and allocate for them).
    if num_layers > header.tensors.len() / 9 {
        return Err(meta.bad(format!(
            "{} is {num_layers} but the file has only {} tensors (each block has at least 9)",
            key("block_count"),
            header.tensors.len()
        )));
    }
    // Shapes the metadata implies for the embedding, checked here so that the message can
    // name the metadata; every other tensor is checked in `plan_tensors`.
    let embd = tensor("token_embd.weight").ok_or_else(|| Error::MissingTensor {
        path: path.to_path_buf(),
        tensor: "token_embd.weight".into(),
    })?;
    if embd.dims.len() != 2 || embd.dims[0] != hidden_size {
        return Err(Error::checkpoint(
            path,
            format!(
                "GGUF metadata contradicts the tensors: {} is {hidden_size} but token_embd.weight has shape {:?}, expected [vocab, {hidden_size}]",
                key("embedding_length"),
                embd.shape()
            ),
        ));
    }
    let vocab_size = embd.dims[1];
    if vocab_size == 0 {
        return Err(Error::checkpoint(
            path,
            "GGUF: token_embd.weight has 0 rows",
        ));
    }
    if let Some(n) = meta.opt_usize(&key("vocab_size"))? {
        if n != vocab_size {
            return Err(Error::checkpoint(
                path,
                format!(
                    "GGUF metadata contradicts the tensors: {} is {n} but token_embd.weight has {vocab_size} rows",
                    key("vocab_size")
                ),
            ));
        }
    }

    if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(meta.bad(format!(
            "{} ({num_heads}) must be a positive multiple of {} ({num_kv_heads})",
            key("attention.head_count"),
            key("attention.head_count_kv")
        )));
    }
    let head_dim = match meta.opt_usize(&key("attention.key_length"))? {
        Some(d) => d,
        None if hidden_size % num_heads == 0 => hidden_size / num_heads,
        None => {
            return Err(meta.bad(format!(
                "{} ({hidden_size}) is not divisible by {} ({num_heads}) and {} is not given",
                key("embedding_length"),
                key("attention.head_count"),
                key("attention.key_length")
            )))
        }
    };
    // No tensor dimension can exceed twice the file size (the densest type stores 32
    // elements in 18 bytes), so larger head sizes contradict the file.
    let limit = bytes.len().saturating_mul(2);
    for (what, n) in [
        (
            "query width (heads × head dimension)",
            num_heads.checked_mul(head_dim),
        ),
        ("feed-forward width", Some(intermediate_size)),
    ] {
        if n.is_none_or(|n| n > limit) {
            return Err(meta.bad(format!(
                "the {what} implied by the metadata is larger than anything a {}-byte file can hold",
                bytes.len()
            )));
        }
    }
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(meta.bad(format!(
            "head dimension {head_dim} must be positive and even for rotary embeddings"
        )));
    }
    if let Some(v) = meta.opt_usize(&key("attention.value_length"))? {
        if v != head_dim {
            return Err(meta.bad(format!(
                "{} ({v}) differs from the key length ({head_dim}); ferry needs them equal",
                key("attention.value_length")
            )));
        }
    }
    if let Some(d) = meta.opt_usize(&key("rope.dimension_count"))? {
        if d != head_dim {
            return Err(meta.bad(format!(
                "{} is {d} but the head dimension is {head_dim}; partial rotary embeddings are not supported",
                key("rope.dimension_count")
            )));
        }
    }
    if let Some(kind) = meta.opt_str(&key("rope.scaling.type"))? {
        let factor = meta.opt_f64(&key("rope.scaling.factor"))?.unwrap_or(1.0);
        if kind != "none" && !(kind == "linear" && factor == 1.0) {
            return Err(meta.bad(format!(
                "{} is {kind:?} (factor {factor}); ferry supports none, or llama3 scaling given as rope_freqs.weight",
                key("rope.scaling.type")
            )));
        }
    }

    let has = |suffix: &str| tensor(&format!("blk.0.{suffix}")).is_some();
    let rope_scaling = match tensor("rope_freqs.weight") {
        Some(t) if arch == Arch::Llama => {
            llama3_scaling_from_factors(meta, t, bytes, rope_theta, head_dim)?
        }
        _ => None,
    };
    let config = LlamaConfig {
        arch,
        hidden_size,
        intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size,
        rms_norm_eps,
        rope_theta,
        rope_scaling,
        max_position_embeddings,
        tie_word_embeddings: tensor("output.weight").is_none(),
        qkv_bias: arch == Arch::Qwen2 || has("attn_q.bias"),
        o_bias: has("attn_output.bias"),
        qk_norm: arch == Arch::Qwen3,
        // llama.cpp does not record mistral's sliding window for the llama architecture.
        sliding_window: None,
    };
    Ok((config, permute_qk))
}

/// llama.cpp writes Llama 3's rope scaling as `rope_freqs.weight`: one divisor per rotary
/// frequency (1 for high frequencies, `factor` for low ones, a smooth ramp between).
/// Recover the parameters from the ramp; `original_max_position_embeddings` only scales
/// all of them together, so it is taken from the metadata or set to Llama 3's 8192.
fn llama3_scaling_from_factors(
    meta: &Meta,
    t: &TensorInfo,
    bytes: &[u8],
    rope_theta: f64,
    head_dim: usize,
) -> Result<Option<Llama3RopeScaling>> {
    let bad = |message: String| {
        Error::checkpoint(meta.path, format!("GGUF: rope_freqs.weight: {message}"))
    };
    let n = head_dim / 2;
    if t.dims != [n] {
        return Err(bad(format!(
            "shape {:?}, expected [{n}] (half the head dimension)",
            t.shape()
        )));
    }
    let f = gguf::read_f32(t, bytes);
    if f.iter().all(|&x| (x - 1.0).abs() < 1e-6) {
        return Ok(None);
    }
    if f.iter().any(|&x| !(x.is_finite() && x >= 1.0 - 1e-6)) {
        return Err(bad(format!(
            "factors {f:?} are not all ≥ 1, as llama3 rope scaling writes them"
        )));
    }
    let factor = f.iter().copied().fold(1f32, f32::max) as f64;
    let old = meta
        .opt_usize("llama.rope.scaling.original_context_length")?
        .unwrap_or(8192) as f64;
    // 1 / wavelength of each frequency, as transformers computes the frequencies.
    let x: Vec<f64> = (0..n)
        .map(|i| {
            let inv = (1.0 / rope_theta.powf((2 * i) as f64 / head_dim as f64)) as f32 as f64;
            inv / (2.0 * std::f64::consts::PI)
        })
        .collect();
    let ramp: Vec<usize> = (0..n)
        .filter(|&i| f[i] as f64 > 1.0 + 1e-6 && (f[i] as f64) < factor * (1.0 - 1e-6))
        .collect();
    let (low_freq_factor, high_freq_factor) = match ramp.as_slice() {
        // No frequency on the ramp: put its ends in the gap between the last unscaled and the
        // first fully scaled frequency (x decreases with i).
        [] => {
            let last_one = (0..n).rev().find(|&i| (f[i] - 1.0).abs() < 1e-6);
            let first_full = (0..n).find(|&i| f[i] as f64 >= factor * (1.0 - 1e-6));
            match (last_one, first_full) {
                (Some(a), Some(b)) if a < b => {
                    let (hi, lo) = (x[a], x[b]);
                    (old * (lo + (hi - lo) / 3.0), old * (lo + 2.0 * (hi - lo) / 3.0))
                }
                _ => return Err(bad(format!("factors {f:?} do not follow llama3 rope scaling"))),
            }
        }
        [_] => {
            return Err(bad(format!(
                "factors {f:?}: only one frequency lies on the llama3 ramp, too few to recover its parameters"
            )))
        }
        [a, .., b] => {
            // On the ramp 1/f = (1 - s)/factor + s, with s = (old·x - low)/(high - low).
            let s = |i: usize| (1.0 / f[i] as f64 - 1.0 / factor) / (1.0 - 1.0 / factor);
            let slope = (s(*b) - s(*a)) / (x[*b] - x[*a]);
            let intercept = s(*a) - slope * x[*a];
            let low = -intercept * old / slope;
            (low, low + old / slope)
        }
    };
    let scaling = Llama3RopeScaling {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings: old as usize,
    };
    // Check the recovered parameters reproduce every factor.
    let probe = LlamaConfig {
        arch: Arch::Llama,
        hidden_size: head_dim,
        intermediate_size: 1,
        num_layers: 1,
        num_heads: 1,
        num_kv_heads: 1,
        head_dim,
        vocab_size: 1,
        rms_norm_eps: 1e-5,
        rope_theta,
        rope_scaling: Some(scaling.clone()),
        max_position_embeddings: 1,
        tie_word_embeddings: true,
        qkv_bias: false,
        o_bias: false,
        qk_norm: false,
        sliding_window: None,
    };
    for (i, got) in probe.rope_inv_freq().into_iter().enumerate() {
        let want = x[i] * 2.0 * std::f64::consts::PI / f[i] as f64;
        let rel = ((got as f64 - want) / want).abs();
        if rel.is_nan() || rel > 1e-4 {
            return Err(bad(format!(
                "factors {f:?} do not follow llama3 rope scaling (frequency {i}: recovered {got}, file implies {want})"
            )));
        }
    }
    Ok(Some(scaling))
}

/// The Hugging Face name of a GGUF tensor, or None if ferry does not know it.
fn hf_name(name: &str, num_layers: usize) -> Option<String> {
    let top = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = top {
        return Some(n.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty()
        || !layer.bytes().all(|b| b.is_ascii_digit())
        || (layer.len() > 1 && layer.starts_with('0'))
    {
        return None;
    }
    let layer: usize = layer.parse().ok()?;
    if layer >= num_layers {
        return None;
    }
    let (module, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Map every tensor to its HF name and check it against what the model needs: nothing
/// missing, nothing unknown or unused, every shape as the metadata implies.
fn plan_tensors<'a>(
    path: &Path,
    header: &'a Header,
    config: &LlamaConfig,
    permute_qk: bool,
) -> Result<Vec<Load<'a>>> {
    let bad = |message: String| Error::checkpoint(path, format!("GGUF: {message}"));
    let mut by_hf: HashMap<String, Load> = HashMap::new();
    for info in &header.tensors {
        if info.name == "rope_freqs.weight" && config.arch == Arch::Llama {
            continue; // folded into config.rope_scaling
        }
        let hf = hf_name(&info.name, config.num_layers).ok_or_else(|| {
            bad(format!(
                "tensor {:?} is not part of a {} model with {} layers as ferry knows it",
                info.name,
                config.arch.name(),
                config.num_layers
            ))
        })?;
        let unpermute_heads = match info.name.rsplit('.').nth(1) {
            Some("attn_q") if permute_qk => Some(config.num_heads),
            Some("attn_k") if permute_qk => Some(config.num_kv_heads),
            _ => None,
        };
        by_hf.insert(
            hf.clone(),
            Load {
                info,
                name: hf,
                unpermute_heads,
            },
        );
    }

    let model = Llama::new(config.clone());
    let summary = format!(
        "hidden {}, ffn {}, heads {}/{} kv, head_dim {}, vocab {}",
        config.hidden_size,
        config.intermediate_size,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.vocab_size
    );
    let mut plan = Vec::with_capacity(by_hf.len());
    let mut needed = std::collections::HashSet::new();
    for spec in model.groups().iter().flat_map(|g| &g.tensors) {
        if !needed.insert(spec.name.clone()) {
            continue; // tied embedding listed twice
        }
        let p = by_hf
            .remove(&spec.name)
            .ok_or_else(|| Error::MissingTensor {
                path: path.to_path_buf(),
                tensor: format!("{} (GGUF name of {})", gguf_name(&spec.name), spec.name),
            })?;
        if p.info.shape() != spec.shape {
            return Err(bad(format!(
                "metadata contradicts the tensors: {} ({}) has shape {:?}, but the metadata ({summary}) implies {:?}",
                p.info.name,
                spec.name,
                p.info.shape(),
                spec.shape
            )));
        }
        plan.push(p);
    }
    if let Some(extra) = by_hf.values().next() {
        return Err(bad(format!(
            "tensor {:?} ({}) is not used by a {} model with this metadata; refusing to ignore it",
            extra.info.name,
            extra.name,
            config.arch.name()
        )));
    }
    Ok(plan)
}

/// The GGUF name of a Hugging Face tensor name (the inverse of `hf_name`): for messages about
/// missing tensors, and for writing GGUF files (`ferry synth --gguf`).
pub fn gguf_name(hf: &str) -> String {
    let pairs = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
        ("model.layers.", "blk."),
        (".input_layernorm", ".attn_norm"),
        (".self_attn.q_proj", ".attn_q"),
        (".self_attn.k_proj", ".attn_k"),
        (".self_attn.v_proj", ".attn_v"),
        (".self_attn.o_proj", ".attn_output"),
        (".self_attn.q_norm", ".attn_q_norm"),
        (".self_attn.k_norm", ".attn_k_norm"),
        (".post_attention_layernorm", ".ffn_norm"),
        (".mlp.gate_proj", ".ffn_gate"),
        (".mlp.up_proj", ".ffn_up"),
        (".mlp.down_proj", ".ffn_down"),
    ];
    pairs
        .iter()
        .fold(hf.to_string(), |s, (from, to)| s.replace(from, to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.11.attn_q.bias", 12).as_deref(),
            Some("model.layers.11.self_attn.q_proj.bias")
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight", 1).as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(hf_name("blk.12.attn_q.weight", 12), None);
        assert_eq!(hf_name("blk.01.attn_q.weight", 12), None);
        assert_eq!(hf_name("blk.0.attn_qkv.weight", 12), None);
        assert_eq!(
            gguf_name("model.layers.3.mlp.down_proj.weight"),
            "blk.3.ffn_down.weight"
        );
    }
}
