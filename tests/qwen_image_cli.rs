//! `ferry image` end to end on the tiny Qwen-Image pipeline (tests/fixtures/qwen-image-pipeline,
//! scripts/make_qwenimage_pipeline_fixture.py): diffusers' packed initial latents in, a PNG out
//! whose every 8-bit pixel is within 1 of the image diffusers' QwenImagePipeline made (true CFG
//! with a negative prompt included); the pipeline's own defaults; and what a wrong `--noise`
//! gets.

mod common;

use common::{ferry, fixture, read_png, read_reference, write_noise};

/// `ferry image` on the fixture with `args` after the model.
fn image(args: &[&str]) -> std::process::Output {
    let model = fixture("qwen-image-pipeline");
    let mut all = vec![
        "image",
        "--device",
        "cpu",
        "--model",
        model.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    ferry(&all)
}

#[test]
fn images_match_diffusers_to_one_level_per_pixel() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixture("qwen-image-pipeline");
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.join("expected.json")).unwrap()).unwrap();
    let reference = read_reference(&f.join("reference.safetensors"));
    // The cases of one prompt (the batch case has a prompt per image).
    for case in ["plain", "cfg"] {
        let c = &expected["denoise"][case];
        let shape: Vec<usize> =
            serde_json::from_value(expected["shapes"][format!("{case}.noise")].clone()).unwrap();
        let noise = dir.path().join(format!("{case}-noise.safetensors"));
        write_noise(&noise, &reference[&format!("{case}.noise")], &shape);
        let out = dir.path().join(format!("{case}.png"));
        let size = format!("{}x{}", c["width"], c["height"]);
        let steps = c["steps"].to_string();
        let guidance = c["true_cfg_scale"].to_string();
        let mut args = vec![
            "--prompt",
            c["prompt"][0].as_str().unwrap(),
            "--size",
            &size,
            "--steps",
            &steps,
            "--guidance",
            &guidance,
            "--noise",
            noise.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--json",
        ];
        if let Some(neg) = c["negative_prompt"][0].as_str() {
            args.extend(["--negative-prompt", neg]);
        }
        let run = image(&args);
        assert!(
            run.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let summary: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
        assert_eq!(summary["model"], "Qwen-Image", "{summary}");
        let guided = c["negative_prompt"].is_array();
        assert_eq!(summary["negative_tokens"].as_u64().unwrap() > 0, guided);
        // diffusers' output_type="np" in [0, 1]; its PNG bytes are round(255 x).
        let want: Vec<f32> = reference[&format!("{case}.image")]
            .iter()
            .map(|v| (v * 255.0).round())
            .collect();
        let (got, params) = read_png(&out);
        assert_eq!(got.len(), want.len(), "{case}: image size");
        let worst = got
            .iter()
            .zip(&want)
            .map(|(&g, &w)| (g as f32 - w).abs())
            .fold(0.0, f32::max);
        assert!(worst <= 1.0, "{case}: a pixel is {worst} levels off");
        assert!(params.contains(&format!("Steps: {steps},")), "{params}");
    }
}

/// Without --steps and --guidance the pipeline's defaults apply (50 steps, true_cfg_scale 4:
/// guided once a negative prompt is given); a negative prompt with guidance that does not
/// guide is said to have no effect.
#[test]
fn the_pipelines_defaults_apply() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("d.png");
    let o = out.to_str().unwrap();
    let run = image(&[
        "--prompt",
        "a fox",
        "--negative-prompt",
        "blurry",
        "--size",
        "32x32",
        "--seed",
        "3",
        "--out",
        o,
        "--json",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(
        (s["steps"].as_u64(), s["guidance"].as_f64()),
        (Some(50), Some(4.0))
    );
    assert!(s["negative_tokens"].as_u64().unwrap() > 0, "{s}");

    let run = image(&[
        "--prompt",
        "a fox",
        "--negative-prompt",
        "blurry",
        "--guidance",
        "1",
        "--steps",
        "1",
        "--size",
        "32x32",
        "--out",
        o,
        "--json",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("--negative-prompt has no effect"),
        "{stderr}"
    );
    let s: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(s["negative_tokens"], 0, "{s}");
}

/// Noise in Z-Image's unpacked layout is refused, naming the packed one; no PNG is written.
#[test]
fn noise_of_the_wrong_layout_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let noise = dir.path().join("unpacked.safetensors");
    write_noise(&noise, &[0.0; 16 * 4 * 4], &[1, 16, 4, 4]);
    let out = dir.path().join("x.png");
    let run = image(&[
        "--prompt",
        "a fox",
        "--size",
        "32x32",
        "--steps",
        "1",
        "--noise",
        noise.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("noise") && stderr.contains("[1, 4, 64]"),
        "{stderr}"
    );
    assert!(!out.exists());
}
