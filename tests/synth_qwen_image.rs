//! `ferry synth`, `ferry info` and `ferry bench` for the Qwen-Image DiT alone: the tiny preset
//! writes the tensors diffusers wrote for the fixture, in a directory that `ferry info`
//! describes and `ferry bench` times; the qwen-image preset has the real shapes (checked
//! without writing its 41 GB); bad input is a one-line error.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ferry::checkpoint::safetensors;
use ferry::model::qwen_image::{QwenImage, QwenImageConfig};
use ferry::model::Architecture;
use ferry::synth::{DitPreset, SynthPreset};

fn ferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .expect("ferry runs")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The one-line error of a failed run.
fn err(out: &Output) -> String {
    assert!(!out.status.success(), "expected a failure");
    let e = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(e.lines().count(), 1, "{e}");
    e
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
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

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn tiny_preset_is_the_fixtures_shape_and_benches() {
    let dir = scratch("qwen-image-tiny");
    let d = dir.to_str().unwrap();
    ok(&ferry(&[
        "synth",
        "--preset",
        "qwen-image-tiny",
        "--out",
        d,
        "--seed",
        "3",
    ]));
    let index = read_json(&dir.join("model_index.json"));
    assert_eq!(index["_class_name"], "QwenImagePipeline");
    assert_eq!(
        index["transformer"],
        serde_json::json!(["diffusers", "QwenImageTransformer2DModel"])
    );
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen-image");
    assert_eq!(
        stored_tensors(&dir.join("transformer")),
        stored_tensors(&fixture.join("transformer"))
    );
    // The config says what diffusers' does, field for field (plus what wrote it).
    let config = read_json(&dir.join("transformer/config.json"));
    let theirs = read_json(&fixture.join("transformer/config.json"));
    for (k, v) in theirs.as_object().unwrap() {
        if !["zero_cond_t", "use_additional_t_cond", "use_layer3d_rope"].contains(&k.as_str()) {
            assert_eq!(&config[k], v, "{k}");
        }
    }

    // Described with the DiT's groups.
    let info = ok(&ferry(&["info", "--model", d]));
    assert!(
        info.contains("QwenImagePipeline")
            && info.contains("embedders")
            && info.contains("block 1")
            && info.contains("final layer"),
        "{info}"
    );

    // Timed from the directory and from memory, on the CPU, at a non-square size.
    for source in [vec!["--model", d], vec!["--synthetic", "qwen-image-tiny"]] {
        let mut args = vec!["bench", "--device", "cpu", "--size", "80x48"];
        args.extend(&source);
        args.extend([
            "--caption-tokens",
            "7",
            "--batch",
            "1,2",
            "--runs",
            "1",
            "--warmup",
            "0",
            "--json",
            "-",
        ]);
        let out: serde_json::Value = serde_json::from_str(&ok(&ferry(&args))).unwrap();
        let results = out["results"].as_array().unwrap();
        assert_eq!(results.len(), 2, "{out}");
        assert!(results.iter().all(|r| r["step_s"].as_f64().unwrap() > 0.0));
        // The modulation made once before the steps, by default.
        assert_eq!(out["modulation"], "precomputed", "{out}");
        assert!(out["modulation_precompute_s"].as_f64().unwrap() > 0.0);
    }
    let mut args = vec!["bench", "--device", "cpu", "--size", "32x32", "--model", d];
    args.extend(["--modulation", "in-steps", "--runs", "1", "--json", "-"]);
    let out: serde_json::Value = serde_json::from_str(&ok(&ferry(&args))).unwrap();
    assert_eq!(out["modulation"], "in steps", "{out}");
    assert!(out["modulation_precompute_s"].is_null());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn qwen_image_preset_has_the_real_shapes() {
    let Ok(SynthPreset::Dit(p)) = SynthPreset::by_name("qwen-image") else {
        panic!("qwen-image is a DiT preset");
    };
    assert_eq!(p, DitPreset::by_name("qwen-image").unwrap());
    let config = p.config();
    let c = QwenImageConfig::from_json(Path::new("config.json"), &config).unwrap();
    assert_eq!(
        (
            c.num_layers,
            c.num_attention_heads,
            c.attention_head_dim,
            c.joint_attention_dim,
            c.in_channels,
            c.out_channels,
            c.axes_dims_rope.clone(),
        ),
        (60, 24, 128, 3584, 64, 16, vec![16, 56, 56])
    );
    assert_eq!(config["patch_size"], 2);
    let dit = QwenImage::new(c);
    assert_eq!(dit.groups().len(), 62);
    let n = p.parameters();
    assert!((20.42e9..20.44e9).contains(&(n as f64)), "{n}");
    // A block: two modulation linears (dim → 6·dim), eight attention linears, two norms per
    // stream, two MLPs of 4·dim, all with biases.
    let d = 3072;
    let block = 2 * (6 * d * d + 6 * d) + 8 * (d * d + d) + 4 * 128 + 2 * (8 * d * d + 5 * d);
    let first: usize = dit.groups()[1].tensors.iter().map(|t| t.numel()).sum();
    assert_eq!(first, block);
}

#[test]
fn bad_input_is_one_line_naming_the_flag() {
    let dir = scratch("qwen-image-bad");
    let d = dir.to_str().unwrap();
    let e = err(&ferry(&[
        "synth",
        "--preset",
        "qwen-image",
        "--only",
        "vae",
        "--out",
        d,
    ]));
    assert!(e.contains("--only") && e.contains("transformer"), "{e}");
    let e = err(&ferry(&[
        "synth",
        "--preset",
        "qwen-image",
        "--layers",
        "2",
        "--out",
        d,
    ]));
    assert!(e.contains("--layers"), "{e}");
    assert!(!dir.exists(), "nothing written");
    // 72 pixels wide: not a multiple of 16.
    let e = err(&ferry(&[
        "bench",
        "--synthetic",
        "qwen-image-tiny",
        "--device",
        "cpu",
        "--size",
        "72x64",
    ]));
    assert!(e.contains("--size") && e.contains("16"), "{e}");
    let e = err(&ferry(&[
        "bench",
        "--synthetic",
        "z-image-tiny",
        "--device",
        "cpu",
        "--modulation",
        "precomputed",
    ]));
    assert!(
        e.contains("--modulation") && e.contains("Qwen-Image"),
        "{e}"
    );
    let e = err(&ferry(&["synth", "--preset", "qwen-imag", "--out", d]));
    assert!(e.contains("qwen-image"), "{e}");
}
