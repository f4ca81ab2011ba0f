//! `ferry synth` for image pipelines: the tiny preset is a diffusers directory that ferry
//! opens, describes and draws with; its tensors are named and shaped as the ones diffusers
//! wrote for the fixture; the z-image-turbo preset has the real shapes (checked without
//! writing its 20 GB); the same seed writes the same bytes; bad input is a one-line error.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{ferry, stdout_of as ok};

use ferry::checkpoint::safetensors;
use ferry::generate::{Message, TextCodec};
use ferry::model::z_image::{ZImage, ZImageConfig};
use ferry::model::Architecture;
use ferry::synth::{
    check_destination, PipelineComponent, PipelinePreset, WriteOptions, DIFFUSERS_VERSION,
};

use PipelineComponent::{Scheduler, TextEncoder, Tokenizer, Transformer, Vae};

fn synth(dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["synth", "--out", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    ferry(&args)
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/z-image")
}

/// (name, shape) of every tensor in the safetensors files of `dir`, sorted by name.
fn stored_tensors(dir: &Path) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            for t in safetensors::read(&path).unwrap() {
                out.push((t.name.clone(), t.shape.clone()));
            }
        }
    }
    out.sort();
    out
}

fn sorted(mut v: Vec<(String, Vec<usize>)>) -> Vec<(String, Vec<usize>)> {
    v.sort();
    v
}

/// Every file under `dir` with its bytes, by relative path.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                out.push((path.strip_prefix(dir).unwrap().to_path_buf(), bytes));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn tiny_pipeline_is_described_and_draws_an_image() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("z");
    // 64 KiB shards: the DiT's embedders (t_embedder's 1024 × 256) alone exceed one.
    ok(&synth(
        &dir,
        &["--preset", "z-image-tiny", "--shard-size", "64KiB"],
    ));
    let index = read_json(&dir.join("model_index.json"));
    assert_eq!(index["_class_name"], "ZImagePipeline");
    assert_eq!(index["_diffusers_version"], DIFFUSERS_VERSION);
    assert_eq!(
        index["transformer"],
        serde_json::json!(["diffusers", "ZImageTransformer2DModel"])
    );
    let dit_index =
        read_json(&dir.join("transformer/diffusion_pytorch_model.safetensors.index.json"));
    let shards: std::collections::BTreeSet<&str> = dit_index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    let n = shards.len();
    assert!(n > 1, "{shards:?}");
    for k in 1..=n {
        let name = format!("diffusion_pytorch_model-{k:05}-of-{n:05}.safetensors");
        assert!(shards.contains(name.as_str()), "{name} in {shards:?}");
    }
    let preset = PipelinePreset::by_name("z-image-tiny").unwrap();
    assert_eq!(
        dit_index["metadata"]["total_size"],
        preset.parameters(Transformer) * 2
    );

    let info = ok(&ferry(&["info", "--model", dir.to_str().unwrap()]));
    for line in [
        "(ZImagePipeline)",
        "scheduler     FlowMatchEulerDiscreteScheduler",
        "text_encoder  Qwen3Model: 176.8K parameters",
        "tokenizer     Qwen2Tokenizer",
        "transformer   ZImageTransformer2DModel: 365.8K parameters",
        "vae           AutoencoderKL: 86.3K parameters",
        "noise refiner 0",
        "final layer",
    ] {
        assert!(info.contains(line), "{line:?} in\n{info}");
    }

    // The tokenizer encodes the templated prompt to ids the text encoder has.
    let text = TextCodec::from_tokenizer_dir(&dir.join("tokenizer")).unwrap();
    let ids = text
        .encode_chat_thinking(&[Message::new("user", "a red fox in the snow")], true)
        .unwrap();
    let tokenizer = text.tokenizer().unwrap();
    let vocab = preset.language_model().unwrap().config.vocab_size;
    assert!(ids.iter().all(|&id| (id as usize) < vocab), "{ids:?}");
    assert_eq!(Some(ids[0]), tokenizer.token_to_id("<|im_start|>"));
    assert_eq!(
        tokenizer.decode(&ids, false).unwrap(),
        "<|im_start|>user\na red fox in the snow<|im_end|>\n<|im_start|>assistant\n"
    );
    let te = read_json(&dir.join("text_encoder/config.json"));
    assert_eq!(
        te["eos_token_id"],
        tokenizer.token_to_id("<|im_end|>").unwrap()
    );
    let description = read_json(&dir.join("tokenizer/tokenizer_config.json"))["ferry_synthetic"]
        ["description"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        description.starts_with("Not Qwen's tokenizer"),
        "{description}"
    );

    let png = tmp.path().join("f.png");
    let summary = ok(&ferry(&[
        "image",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "x",
        "--size",
        "64x64",
        "--steps",
        "2",
        "--seed",
        "5",
        "--out",
        png.to_str().unwrap(),
        "--json",
    ]));
    let summary: serde_json::Value = serde_json::from_str(&summary).unwrap();
    let x_ids = text
        .encode_chat_thinking(&[Message::new("user", "x")], true)
        .unwrap();
    assert_eq!(summary["prompt_tokens"], x_ids.len());
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    assert_eq!((frame.width, frame.height), (64, 64));
    pixels.truncate(frame.buffer_size());
    let distinct: std::collections::BTreeSet<u8> = pixels.iter().copied().collect();
    assert!(
        distinct.len() > 16,
        "random weights still draw something: {distinct:?}"
    );
}

/// diffusers wrote the fixture's components; the tiny preset has their shapes, so its
/// tensors must be exactly those (the text encoder's under the `model.` prefix of a
/// `Qwen3ForCausalLM` checkpoint, as Z-Image-Turbo stores it).
#[test]
fn tiny_tensors_are_the_ones_diffusers_writes() {
    let preset = PipelinePreset::by_name("z-image-tiny").unwrap();
    let fixture = fixture();
    assert_eq!(
        sorted(preset.tensors(Transformer)),
        stored_tensors(&fixture.join("transformer"))
    );
    assert_eq!(
        sorted(preset.tensors(Vae)),
        stored_tensors(&fixture.join("vae"))
    );
    let te: Vec<_> = stored_tensors(&fixture.join("text_encoder"))
        .into_iter()
        .map(|(n, s)| (format!("model.{n}"), s))
        .collect();
    assert_eq!(sorted(preset.tensors(TextEncoder)), te);
    assert!(preset.tensors(Tokenizer).is_empty() && preset.tensors(Scheduler).is_empty());
}

#[test]
fn turbo_has_the_real_shapes() {
    let preset = PipelinePreset::by_name("z-image-turbo").unwrap();
    let bf16 = ferry::checkpoint::DType::BF16;
    let config = preset.config(Transformer, bf16);
    for (key, value) in [
        ("_class_name", serde_json::json!("ZImageTransformer2DModel")),
        ("dim", 3840.into()),
        ("n_layers", 30.into()),
        ("n_refiner_layers", 2.into()),
        ("n_heads", 30.into()),
        ("n_kv_heads", 30.into()),
        ("cap_feat_dim", 2560.into()),
        ("in_channels", 16.into()),
        ("axes_dims", serde_json::json!([32, 48, 48])),
        ("axes_lens", serde_json::json!([1536, 512, 512])),
        ("rope_theta", 256.0.into()),
        ("t_scale", 1000.0.into()),
        ("qk_norm", true.into()),
        ("norm_eps", 1e-5.into()),
        ("all_patch_size", serde_json::json!([2])),
        ("all_f_patch_size", serde_json::json!([1])),
    ] {
        assert_eq!(config[key], value, "{key}");
    }
    // The tensors are the DiT's groups, in pass order.
    let dit = ZImage::new(ZImageConfig::from_json(Path::new("config.json"), &config).unwrap());
    let groups: Vec<_> = dit
        .groups()
        .iter()
        .flat_map(|g| &g.tensors)
        .map(|t| (t.name.clone(), t.shape.clone()))
        .collect();
    let tensors = preset.tensors(Transformer);
    assert_eq!(tensors, groups);
    assert_eq!(tensors.len(), 521);
    // By hand: embedders (t_embedder 256→1024→256, x_embedder 64→3840, cap_embedder norm and
    // 2560→3840, two pad tokens), 32 blocks with adaLN (30 layers, 2 noise refiners), 2
    // context refiners without, the final layer.
    let (d, ffn) = (3840, 10240);
    let embed =
        (1024 * 256 + 1024 + 256 * 1024 + 256) + (d * 64 + d) + (2560 + d * 2560 + d) + 2 * d;
    let block = 4 * d * d + 4 * d + 3 * d * ffn + 2 * 128;
    let adaln = 4 * d * 256 + 4 * d;
    let last = d * 256 + d + 64 * d + 64;
    let params = embed + 32 * (block + adaln) + 2 * block + last;
    assert_eq!(params, 6_154_908_736);
    assert_eq!(preset.parameters(Transformer), params);
    assert_eq!(params * 2, 12_309_817_472, "12.31 GB in bf16");

    // Qwen3-4B with tied embeddings (no lm_head stored), as Z-Image-Turbo's text encoder.
    let te = preset.config(TextEncoder, bf16);
    for (key, value) in [
        ("architectures", serde_json::json!(["Qwen3ForCausalLM"])),
        ("hidden_size", 2560.into()),
        ("num_hidden_layers", 36.into()),
        ("num_attention_heads", 32.into()),
        ("num_key_value_heads", 8.into()),
        ("head_dim", 128.into()),
        ("intermediate_size", 9728.into()),
        ("vocab_size", 151936.into()),
        ("rope_theta", 1e6.into()),
        ("rms_norm_eps", 1e-6.into()),
        ("tie_word_embeddings", true.into()),
    ] {
        assert_eq!(te[key], value, "{key}");
    }
    let layer = 2560 * 4096 * 2 + 2 * 1024 * 2560 + 3 * 9728 * 2560 + 2 * 2560 + 2 * 128;
    assert_eq!(
        preset.parameters(TextEncoder),
        151936 * 2560 + 36 * layer + 2560
    );
    assert!(!preset
        .tensors(TextEncoder)
        .iter()
        .any(|(n, _)| n == "lm_head.weight"));

    // Flux's VAE: 83.8 M parameters, encoder and decoder.
    let vae = preset.config(Vae, bf16);
    assert_eq!(
        vae["block_out_channels"],
        serde_json::json!([128, 256, 512, 512])
    );
    assert_eq!(vae["latent_channels"], 16);
    assert_eq!(vae["scaling_factor"], 0.3611);
    assert_eq!(vae["shift_factor"], 0.1159);
    assert_eq!(vae["use_quant_conv"], false);
    assert_eq!(preset.parameters(Vae), 83_819_683);
    let vae_tensors = preset.tensors(Vae);
    assert!(vae_tensors
        .iter()
        .any(|(n, _)| n == "encoder.conv_in.weight"));
    assert!(vae_tensors
        .iter()
        .any(|(n, s)| n == "decoder.conv_out.weight" && s == &[3, 128, 3, 3]));

    let scheduler = preset.config(Scheduler, bf16);
    assert_eq!(scheduler["_class_name"], "FlowMatchEulerDiscreteScheduler");
    assert_eq!(scheduler["num_train_timesteps"], 1000);
    assert_eq!(scheduler["shift"], 3.0);
    assert_eq!(scheduler["use_dynamic_shifting"], false);
}

/// The real preset's small components are cheap to write: --only writes just those, and
/// later calls add more to the same directory.
#[test]
fn only_writes_the_named_components() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("turbo");
    let args = ["--preset", "z-image-turbo", "--only", "scheduler,tokenizer"];
    ok(&synth(&dir, &args));
    let mut written: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    written.sort();
    assert_eq!(written, ["model_index.json", "scheduler", "tokenizer"]);
    let text = TextCodec::from_tokenizer_dir(&dir.join("tokenizer")).unwrap();
    let ids = text
        .encode_chat_thinking(&[Message::new("user", "a lighthouse at dusk")], true)
        .unwrap();
    assert!(ids.iter().all(|&id| id < 151936));

    // The same components again are refused; others are added.
    let again = synth(&dir, &args);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--out"));
    let preset = PipelinePreset::by_name("z-image-turbo").unwrap();
    let opts = WriteOptions::default();
    check_destination(&preset, &dir, &[Transformer, Vae], &opts).unwrap();
    let other_seed = WriteOptions {
        seed: 1,
        ..WriteOptions::default()
    };
    assert!(check_destination(&preset, &dir, &[Vae], &other_seed).is_err());
}

#[test]
fn same_seed_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    ok(&synth(&a, &["--preset", "z-image-tiny", "--seed", "3"]));
    ok(&synth(&b, &["--preset", "z-image-tiny", "--seed", "3"]));
    ok(&synth(&c, &["--preset", "z-image-tiny", "--seed", "4"]));
    let (fa, fb, fc) = (files(&a), files(&b), files(&c));
    assert_eq!(fa.len(), 14);
    assert_eq!(fa, fb);
    let differ: Vec<_> = fa
        .iter()
        .zip(&fc)
        .filter(|(x, y)| x.1 != y.1)
        .map(|(x, _)| x.0.display().to_string())
        .collect();
    assert_eq!(
        differ,
        [
            "model_index.json",
            "text_encoder/model-00001-of-00001.safetensors",
            "transformer/diffusion_pytorch_model-00001-of-00001.safetensors",
            "vae/diffusion_pytorch_model-00001-of-00001.safetensors",
        ]
    );
}

#[test]
fn bad_input_is_one_line_naming_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("x");
    let occupied = tmp.path().join("occupied");
    std::fs::create_dir(&occupied).unwrap();
    std::fs::write(occupied.join("notes.txt"), "mine").unwrap();
    let out = dir.to_str().unwrap();
    for (args, flag, says) in [
        (
            vec!["--preset", "z-image-large", "--out", out],
            "--preset",
            "expected one of tiny,",
        ),
        (
            vec!["--preset", "z-image-tiny", "--only", "transformer,unet", "--out", out],
            "--only",
            "unknown component \"unet\"; expected some of transformer, text_encoder, tokenizer, vae, scheduler",
        ),
        (
            vec!["--preset", "tiny", "--only", "transformer", "--out", out],
            "--only",
            "tiny is a language model",
        ),
        (
            vec!["--preset", "z-image-tiny", "--arch", "qwen2", "--out", out],
            "--arch",
            "z-image-tiny is an image pipeline",
        ),
        (
            vec!["--preset", "z-image-tiny", "--layers", "4", "--out", out],
            "--layers",
            "z-image-tiny is an image pipeline",
        ),
        (
            vec!["--preset", "z-image-tiny", "--shard-size", "0B", "--out", out],
            "--shard-size",
            "positive",
        ),
        (
            vec!["--preset", "z-image-tiny", "--out", occupied.to_str().unwrap()],
            "--out",
            "is not empty and not a z-image-tiny pipeline",
        ),
    ] {
        let mut full = vec!["synth"];
        full.extend(args.iter().copied());
        let o = ferry(&full);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with(&format!("error: {flag}: ")), "{err}");
        assert!(err.contains(says), "{err}");
    }
    assert!(!dir.exists(), "nothing written on bad input");
    // --force writes over what is there.
    ok(&ferry(&[
        "synth",
        "--preset",
        "z-image-tiny",
        "--only",
        "scheduler",
        "--out",
        occupied.to_str().unwrap(),
        "--force",
    ]));
    assert!(occupied.join("scheduler/scheduler_config.json").is_file());
}
