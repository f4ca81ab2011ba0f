//! Flux.1's text encoders on the CPU against transformers f32 (the tiny CLIPTextModel and
//! T5EncoderModel of tests/fixtures/flux-text, written by scripts/make_flux_text_fixture.py):
//! every stage, T5's position buckets, the tokenizers' ids on tricky prompts, a batch against
//! each prompt alone, streamed against resident weights, and bad input.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferry::backend::cpu::{Cpu, CpuWeight};
use ferry::backend::Backend;
use ferry::checkpoint::{Component, Pipeline};
use ferry::diffuse::flux_text::{ClipTokenizer, FluxTextEncoders, T5Tokenizer};
use ferry::model::clip::ClipText;
use ferry::model::t5::{relative_position_bucket, T5Encoder};
use ferry::model::{Architecture, PassShape, ResidentWeights};
use ferry::Error;
use serde_json::{json, Value};

use common::{read_reference, rel_l2};

fn dir() -> PathBuf {
    common::fixture("flux-text")
}

fn component(name: &str) -> Component {
    Component::open(name, &dir().join(name), true).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The fixture's four components as a pipeline (it has no transformer or VAE, so no
/// model_index.json to open it by).
fn pipeline() -> Pipeline {
    let mut components = BTreeMap::new();
    for (name, weights) in [
        ("text_encoder", true),
        ("text_encoder_2", true),
        ("tokenizer", false),
        ("tokenizer_2", false),
    ] {
        let c = Component::open(name, &dir().join(name), weights).unwrap();
        components.insert(name.to_string(), c);
    }
    Pipeline {
        path: dir(),
        class_name: "FluxPipeline".into(),
        components,
    }
}

fn reference() -> BTreeMap<String, Vec<f32>> {
    read_reference(&dir().join("reference.safetensors"))
}

fn ids(r: &BTreeMap<String, Vec<f32>>, name: &str) -> Vec<u32> {
    r[name].iter().map(|&v| v as u32).collect()
}

fn resident(c: &Component, arch: &dyn Architecture) -> ResidentWeights<CpuWeight> {
    ResidentWeights::load(c, arch.groups(), |t| Cpu.weight(t)).unwrap()
}

fn close(what: &str, got: &[f32], want: &[f32]) {
    let err = rel_l2(got, want);
    eprintln!("{what}: relative L2 {err:.2e}");
    assert!(err <= 1e-4, "{what}: relative L2 {err:.3e} > 1e-4");
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn t5_buckets_match_transformers() {
    let r = reference();
    let want = &r["t5.buckets"];
    assert_eq!(want.len(), 1023);
    for (i, &b) in want.iter().enumerate() {
        let rel = i as i64 - 511;
        assert_eq!(
            relative_position_bucket(rel, 32, 128),
            b as usize,
            "relative position {rel}"
        );
    }
}

#[test]
fn t5_matches_transformers_at_every_stage() {
    let r = reference();
    let c = component("text_encoder_2");
    let t5 = T5Encoder::open(&c).unwrap();
    let mut w = resident(&c, &t5);
    for i in 0..2 {
        let prompt = ids(&r, &format!("t5.{i}.ids"));
        let mut trace = BTreeMap::new();
        let mut record = |name: &str, v: Vec<f32>| {
            trace.insert(name.to_string(), v);
        };
        let out = t5
            .forward_traced(&Cpu, &mut w, &[&prompt], Some(&mut record))
            .unwrap();
        close(
            &format!("t5 {i} embeds"),
            &trace["embeds"],
            &r[&format!("t5.{i}.embeds")],
        );
        close(
            &format!("t5 {i} block 0"),
            &trace["blocks.0"],
            &r[&format!("t5.{i}.block0")],
        );
        close(
            &format!("t5 {i} hidden"),
            &out,
            &r[&format!("t5.{i}.hidden")],
        );
    }
}

#[test]
fn clip_matches_transformers_at_every_stage() {
    let r = reference();
    let c = component("text_encoder");
    let clip = ClipText::open(&c).unwrap();
    let mut w = resident(&c, &clip);
    for i in 0..2 {
        let prompt = ids(&r, &format!("clip.{i}.ids"));
        let mut trace = BTreeMap::new();
        let mut record = |name: &str, v: Vec<f32>| {
            trace.insert(name.to_string(), v);
        };
        let out = clip
            .forward_traced(&Cpu, &mut w, &[&prompt], Some(&mut record))
            .unwrap();
        close(
            &format!("clip {i} embeds"),
            &trace["embeds"],
            &r[&format!("clip.{i}.embeds")],
        );
        close(
            &format!("clip {i} layer 0"),
            &trace["layers.0"],
            &r[&format!("clip.{i}.layer0")],
        );
        close(
            &format!("clip {i} hidden"),
            &out,
            &r[&format!("clip.{i}.hidden")],
        );
        let pooled = clip.pick_pooled(&out, &[&prompt]);
        close(
            &format!("clip {i} pooled"),
            &pooled[0],
            &r[&format!("clip.{i}.pooled")],
        );
    }
}

/// The fixture's tokenizer cases: (prompt, max_length, ids).
fn token_cases(which: &str) -> Vec<(String, usize, Vec<u32>)> {
    let e: Value =
        serde_json::from_slice(&std::fs::read(dir().join("expected.json")).unwrap()).unwrap();
    e[which]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["prompt"].as_str().unwrap().to_string(),
                c["max_length"].as_u64().unwrap_or(77) as usize,
                serde_json::from_value(c["ids"].clone()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn tokenizers_give_transformers_ids() {
    let enc = FluxTextEncoders::open(&pipeline()).unwrap();
    let clip = token_cases("clip");
    assert!(clip.len() >= 10);
    for (prompt, _, want) in &clip {
        assert_eq!(&enc.clip_tokens(prompt).unwrap(), want, "CLIP {prompt:?}");
    }
    let t5 = token_cases("t5");
    assert!(t5.len() >= 30);
    for (prompt, max_len, want) in &t5 {
        assert_eq!(
            &enc.t5_tokens(prompt, *max_len).unwrap(),
            want,
            "T5 {prompt:?} at {max_len}"
        );
    }
    // The same CLIP tokenizer with a tokenizer.json (as transformers 5 saves it) reads it.
    let fast = ClipTokenizer::open(&dir().join("tokenizer-fast")).unwrap();
    for (prompt, _, want) in &clip {
        assert_eq!(
            &fast.tokens(prompt).unwrap(),
            want,
            "CLIP tokenizer.json {prompt:?}"
        );
    }
    // What the ids mean: CLIP's BOS, EOS and pads (the EOS token), T5's EOS (1) and pads (0).
    let c = enc.clip_tokens("").unwrap();
    let (bos, eos) = (enc.clip_tokenizer.bos, enc.clip_tokenizer.eos);
    assert_eq!(c.len(), 77);
    assert_eq!((c[0], c[1], c[76]), (bos, eos, eos));
    assert_eq!(enc.t5_tokens("", 4).unwrap(), [1, 0, 0, 0]);
    let long = enc.t5_tokens(&"a photo of a cat ".repeat(50), 16).unwrap();
    assert_eq!((long.len(), long[15]), (16, 1));
    for bad in [0, 513] {
        let e = enc.t5_tokens("a", bad).unwrap_err().to_string();
        assert!(
            e.contains("--max-sequence-length") && e.contains("512"),
            "{e}"
        );
    }
}

/// The pipeline's encodes through the public API: a batch of two prompts equals each alone,
/// bit for bit, and equals transformers.
#[test]
fn a_batch_equals_each_prompt_alone() {
    let r = reference();
    let p = pipeline();
    let enc = FluxTextEncoders::open(&p).unwrap();
    let t5c = p.component("text_encoder_2").unwrap();
    let clipc = p.component("text_encoder").unwrap();
    let mut tw = resident(t5c, &enc.t5);
    let mut cw = resident(clipc, &enc.clip);

    let t5_ids = vec![ids(&r, "t5.0.ids"), ids(&r, "t5.1.ids")];
    let both = enc.encode_t5(&Cpu, &mut tw, &t5_ids).unwrap();
    assert_eq!(both[0].len(), 512 * 32);
    assert_eq!(both[1].len(), 16 * 32);
    for (i, one) in t5_ids.iter().enumerate() {
        let alone = enc
            .encode_t5(&Cpu, &mut tw, std::slice::from_ref(one))
            .unwrap();
        assert_eq!(bits(&alone[0]), bits(&both[i]), "T5 prompt {i}");
        close(
            &format!("t5 batch {i}"),
            &both[i],
            &r[&format!("t5.{i}.hidden")],
        );
    }

    let clip_ids = vec![ids(&r, "clip.0.ids"), ids(&r, "clip.1.ids")];
    let both = enc.encode_clip_pooled(&Cpu, &mut cw, &clip_ids).unwrap();
    for (i, one) in clip_ids.iter().enumerate() {
        let alone = enc
            .encode_clip_pooled(&Cpu, &mut cw, std::slice::from_ref(one))
            .unwrap();
        assert_eq!(bits(&alone[0]), bits(&both[i]), "CLIP prompt {i}");
        assert_eq!(both[i].len(), 32);
        close(
            &format!("clip batch {i}"),
            &both[i],
            &r[&format!("clip.{i}.pooled")],
        );
    }
}

/// Streamed through the engine's loop over the CPU copy engine at budgets from the least to
/// all: the bits of resident weights, for both models.
#[test]
fn streamed_equals_resident_bit_for_bit() {
    use ferry::backend::cpu_stream::{cpu_streamed_weights, HostStorage};
    use ferry::stream::{plan, BudgetAllocator, GroupTensors, Purpose};

    use ferry::synth::random_component;

    // Blocks larger than the embeddings, random bf16 weights, so that blocks stream.
    let t5_json = json!({
        "model_type": "t5", "d_model": 128, "d_kv": 32, "d_ff": 384, "num_layers": 4,
        "num_heads": 4, "vocab_size": 300, "feed_forward_proj": "gated-gelu",
    });
    let clip_json = json!({
        "model_type": "clip_text_model", "hidden_size": 128, "intermediate_size": 512,
        "num_hidden_layers": 4, "num_attention_heads": 2, "vocab_size": 300,
        "max_position_embeddings": 77,
    });
    let t5 = T5Encoder::from_json(Path::new("t5/config.json"), &t5_json).unwrap();
    let clip = ClipText::from_json(Path::new("clip/config.json"), &clip_json).unwrap();
    let t5c = random_component("text_encoder_2", "T5EncoderModel", t5_json, t5.groups(), 3);
    let clipc = random_component("text_encoder", "CLIPTextModel", clip_json, clip.groups(), 4);
    let t5_ids: [Vec<u32>; 2] = [(0..40).map(|i| i * 7 % 300).collect(), (0..16).collect()];
    let clip_ids: [Vec<u32>; 2] = [
        (0..77).map(|i| i * 3 % 299).collect(),
        (0..77).map(|i| 299 - i).collect(),
    ];
    let cases: [(&Component, &dyn Architecture, PassShape); 2] = [
        (
            &t5c,
            &t5,
            PassShape {
                tokens: 40,
                batch: 2,
                past: 0,
            },
        ),
        (
            &clipc,
            &clip,
            PassShape {
                tokens: 77,
                batch: 2,
                past: 0,
            },
        ),
    ];
    for (k, (c, arch, shape)) in cases.into_iter().enumerate() {
        let mut rw = resident(c, arch);
        let want = if k == 0 {
            let p: Vec<&[u32]> = t5_ids.iter().map(Vec::as_slice).collect();
            t5.forward(&Cpu, &mut rw, &p).unwrap()
        } else {
            let p: Vec<&[u32]> = clip_ids.iter().map(Vec::as_slice).collect();
            clip.forward(&Cpu, &mut rw, &p).unwrap()
        };
        let cost = arch.pass_cost(shape);
        let fixed = cost.cache + cost.workspace;
        let least = common::least_budget(&common::cpu_request(arch, c, shape, fixed)).budget;
        let all = fixed + c.bytes();
        let model = GroupTensors::of(c, arch).unwrap();
        let mut streamed = 0;
        for share in [0.0, 0.4, 1.0] {
            let budget = least + (share * (all - least) as f64) as usize;
            let p = plan(&common::cpu_request(arch, c, shape, budget)).unwrap();
            streamed += !p.pieces.is_empty() as usize;
            let alloc = BudgetAllocator::new(HostStorage, p.budget);
            let _ws = alloc.alloc(Purpose::Workspace, p.workspace).unwrap();
            let (mut weights, _residents) =
                cpu_streamed_weights(&model, p, &alloc, None, Some(0.2)).unwrap();
            for pass in 0..2 {
                let got = if k == 0 {
                    let p: Vec<&[u32]> = t5_ids.iter().map(Vec::as_slice).collect();
                    t5.forward(&Cpu, &mut weights, &p).unwrap()
                } else {
                    let p: Vec<&[u32]> = clip_ids.iter().map(Vec::as_slice).collect();
                    clip.forward(&Cpu, &mut weights, &p).unwrap()
                };
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "model {k}, {share} of the way, pass {pass}"
                );
            }
        }
        assert!(streamed >= 1, "model {k}: no budget streamed");
    }
}

fn with_config(c: &Component, edit: impl FnOnce(&mut Value)) -> Component {
    let mut c2 = Component::open(&c.name, &c.dir, true).unwrap();
    let (_, json) = c2.config.as_mut().unwrap();
    edit(json);
    c2
}

#[test]
fn bad_models_are_named() {
    let t5c = component("text_encoder_2");
    let clipc = component("text_encoder");
    let err = |r: Result<(), Error>| r.unwrap_err().to_string();

    // A missing tensor names itself and the component's directory.
    let mut c = component("text_encoder_2");
    c.tensors
        .remove("encoder.block.1.layer.1.DenseReluDense.wi_1.weight");
    let e = err(T5Encoder::open(&c).map(|_| ()));
    assert!(
        e.contains("encoder.block.1.layer.1.DenseReluDense.wi_1.weight")
            && e.contains("text_encoder_2"),
        "{e}"
    );
    let mut c = component("text_encoder_2");
    c.tensors.remove("shared.weight");
    let e = err(T5Encoder::open(&c).map(|_| ()));
    assert!(
        e.contains("shared.weight") && e.contains("token embedding"),
        "{e}"
    );
    let mut c = component("text_encoder");
    c.tensors.remove("text_model.final_layer_norm.bias");
    let e = err(ClipText::open(&c).map(|_| ()));
    assert!(e.contains("text_model.final_layer_norm.bias"), "{e}");

    // A config that disagrees with the tensors: the tensor, its shape and the expected one.
    let c = with_config(&t5c, |j| j["d_ff"] = json!(50));
    let e = err(T5Encoder::open(&c).map(|_| ()));
    assert!(
        e.contains("wi_0") && e.contains("[50, 32]") && e.contains("[48, 32]"),
        "{e}"
    );
    let c = with_config(&clipc, |j| j["intermediate_size"] = json!(64));
    let e = err(ClipText::open(&c).map(|_| ()));
    assert!(e.contains("fc1") && e.contains("[64, 32]"), "{e}");

    // What ferry does not run is refused by name.
    let c = with_config(&t5c, |j| j["feed_forward_proj"] = json!("relu"));
    let e = err(T5Encoder::open(&c).map(|_| ()));
    assert!(
        e.contains("feed_forward_proj") && e.contains("relu") && e.contains("gated-gelu"),
        "{e}"
    );
    assert!(e.contains("config.json"), "{e}");
    let c = with_config(&clipc, |j| j["hidden_act"] = json!("gelu"));
    let e = err(ClipText::open(&c).map(|_| ()));
    assert!(e.contains("hidden_act") && e.contains("quick_gelu"), "{e}");
    let c = with_config(&t5c, |j| j["model_type"] = json!("umt5"));
    let e = err(T5Encoder::open(&c).map(|_| ()));
    assert!(e.contains("umt5") && e.contains("t5"), "{e}");

    // Token ids outside the vocabulary or past CLIP's positions.
    let t5 = T5Encoder::open(&t5c).unwrap();
    let mut w = resident(&t5c, &t5);
    let e = err(t5.forward(&Cpu, &mut w, &[&[1, 9999]]).map(|_| ()));
    assert!(e.contains("9999"), "{e}");
    let clip = ClipText::open(&clipc).unwrap();
    let mut w = resident(&clipc, &clip);
    let e = err(clip.forward(&Cpu, &mut w, &[&[1u32; 78]]).map(|_| ()));
    assert!(e.contains("78") && e.contains("77"), "{e}");
}

/// A copy of the fixture's tokenizer `name` in a temporary directory, for spoiling.
fn tokenizer_copy(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(dir().join(name)).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, tmp.path().join(f.file_name().unwrap())).unwrap();
    }
    tmp
}

fn clip_err(d: &Path) -> String {
    match ClipTokenizer::open(d) {
        Ok(_) => panic!("{} opened", d.display()),
        Err(e) => e.to_string(),
    }
}

fn t5_err(d: &Path) -> String {
    match T5Tokenizer::open(d) {
        Ok(_) => panic!("{} opened", d.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_tokenizers_are_named() {
    // Missing files.
    let t = tokenizer_copy("tokenizer");
    std::fs::remove_file(t.path().join("merges.txt")).unwrap();
    let e = clip_err(t.path());
    assert!(e.contains("merges.txt") && e.contains("vocab.json"), "{e}");
    std::fs::remove_file(t.path().join("vocab.json")).unwrap();
    let e = clip_err(t.path());
    assert!(
        e.contains("vocab.json") && e.contains("tokenizer.json"),
        "{e}"
    );
    let t = tokenizer_copy("tokenizer_2");
    std::fs::remove_file(t.path().join("tokenizer.json")).unwrap();
    let e = t5_err(t.path());
    assert!(e.contains("tokenizer.json") && e.contains("T5"), "{e}");

    // Corrupt files: the file, and what is wrong.
    let t = tokenizer_copy("tokenizer");
    let merges = std::fs::read_to_string(t.path().join("merges.txt")).unwrap();
    std::fs::write(
        t.path().join("merges.txt"),
        merges.replacen('\n', "\nnot-a-merge\n", 2),
    )
    .unwrap();
    let e = clip_err(t.path());
    assert!(
        e.contains("merges.txt") && e.contains("line 2") && e.contains("not-a-merge"),
        "{e}"
    );
    std::fs::write(t.path().join("vocab.json"), "{\"a\": 0,").unwrap();
    let e = clip_err(t.path());
    assert!(e.contains("vocab.json"), "{e}");
    let t = tokenizer_copy("tokenizer");
    let config = std::fs::read_to_string(t.path().join("tokenizer_config.json")).unwrap();
    std::fs::write(
        t.path().join("tokenizer_config.json"),
        config.replace("\"CLIPTokenizer\"", "\"T5Tokenizer\""),
    )
    .unwrap();
    let e = clip_err(t.path());
    assert!(
        e.contains("tokenizer_class") && e.contains("CLIPTokenizer"),
        "{e}"
    );
    let t = tokenizer_copy("tokenizer_2");
    std::fs::write(
        t.path().join("tokenizer.json"),
        "{\"version\": \"1.0\", \"model\": 3}",
    )
    .unwrap();
    let e = t5_err(t.path());
    assert!(e.contains("tokenizer.json"), "{e}");
    let t = tokenizer_copy("tokenizer_2");
    std::fs::write(
        t.path().join("special_tokens_map.json"),
        "{\"eos_token\": \"<eos>\"}",
    )
    .unwrap();
    std::fs::write(t.path().join("tokenizer_config.json"), "{}").unwrap();
    let e = t5_err(t.path());
    assert!(e.contains("eos_token") && e.contains("<eos>"), "{e}");

    // A CLIP tokenizer longer than the text encoder's positions.
    let t = tokenizer_copy("tokenizer");
    let config = std::fs::read_to_string(t.path().join("tokenizer_config.json")).unwrap();
    std::fs::write(
        t.path().join("tokenizer_config.json"),
        config.replace("\"model_max_length\": 77", "\"model_max_length\": 100"),
    )
    .unwrap();
    let mut p = pipeline();
    p.components.insert(
        "tokenizer".into(),
        Component::open("tokenizer", t.path(), false).unwrap(),
    );
    let e = match FluxTextEncoders::open(&p) {
        Ok(_) => panic!("opened a tokenizer of 100 tokens for 77 positions"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("model_max_length 100") && e.contains("77"),
        "{e}"
    );

    // A pipeline without its second tokenizer names the component.
    let mut p = pipeline();
    p.components.remove("tokenizer_2");
    let e = match FluxTextEncoders::open(&p) {
        Ok(_) => panic!("opened without tokenizer_2"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("tokenizer_2"), "{e}");
}

/// The other names a checkpoint may use: T5's embedding as `encoder.embed_tokens.weight`
/// (the other side of the tie), CLIP's tensors without `text_model.` (as transformers 5
/// saves a `CLIPTextModel`). Both give the same bits.
#[test]
fn other_tensor_names_give_the_same_model() {
    let r = reference();
    let renamed = |c: &Component, f: &dyn Fn(&str) -> String| -> Component {
        let mut c2 = Component::open(&c.name, &c.dir, true).unwrap();
        c2.tensors = c
            .tensors
            .values()
            .map(|t| (f(&t.name), t.renamed(f(&t.name))))
            .collect();
        c2
    };

    let c = component("text_encoder_2");
    let t5 = T5Encoder::open(&c).unwrap();
    let prompt = ids(&r, "t5.1.ids");
    let want = t5
        .forward(&Cpu, &mut resident(&c, &t5), &[&prompt])
        .unwrap();
    let c2 = renamed(&c, &|n| {
        n.replace("shared.weight", "encoder.embed_tokens.weight")
    });
    let t5b = T5Encoder::open(&c2).unwrap();
    let got = t5b
        .forward(&Cpu, &mut resident(&c2, &t5b), &[&prompt])
        .unwrap();
    assert_eq!(bits(&got), bits(&want));

    let c = component("text_encoder");
    let clip = ClipText::open(&c).unwrap();
    let prompt = ids(&r, "clip.1.ids");
    let want = clip
        .forward(&Cpu, &mut resident(&c, &clip), &[&prompt])
        .unwrap();
    let c2 = renamed(&c, &|n| n.trim_start_matches("text_model.").to_string());
    let clipb = ClipText::open(&c2).unwrap();
    assert!(clipb.groups()[0].tensors[0].name.starts_with("embeddings."));
    let got = clipb
        .forward(&Cpu, &mut resident(&c2, &clipb), &[&prompt])
        .unwrap();
    assert_eq!(bits(&got), bits(&want));
}
