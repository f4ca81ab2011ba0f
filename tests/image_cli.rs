//! `ferry image` end to end on the tiny Z-Image pipeline (tests/fixtures/z-image): the
//! reference's initial noise in, a PNG out whose every 8-bit pixel is within 1 of the one
//! diffusers made; and the bad inputs a user can give, each a one-line error with no PNG.

mod common;

use std::path::{Path, PathBuf};

use common::{ferry, read_png, read_reference, write_noise};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/z-image")
}

#[test]
fn images_match_diffusers_to_one_level_per_pixel() {
    let dir = tempfile::tempdir().unwrap();
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture().join("expected.json")).unwrap()).unwrap();
    let reference = read_reference(&fixture().join("reference.safetensors"));
    let model = fixture();
    for case in ["turbo", "cfg"] {
        let c = &expected["cases"][case];
        let shape: Vec<usize> = serde_json::from_value(c["latent_shape"].clone()).unwrap();
        let noise = dir.path().join(format!("{case}-noise.safetensors"));
        write_noise(&noise, &reference[&format!("{case}.noise")], &shape);
        let out = dir.path().join(format!("{case}.png"));
        let size = format!("{}x{}", c["width"], c["height"]);
        let steps = c["num_inference_steps"].to_string();
        let guidance = c["guidance_scale"].to_string();
        let batch = shape[0].to_string();
        let mut args = vec![
            "image",
            "--device",
            "cpu",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            c["prompt"].as_str().unwrap(),
            "--size",
            &size,
            "--steps",
            &steps,
            "--guidance",
            &guidance,
            "--batch",
            &batch,
            "--noise",
            noise.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        if let Some(neg) = c["negative_prompt"].as_str() {
            args.extend(["--negative-prompt", neg]);
        }
        let run = ferry(&args);
        assert!(
            run.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let want = &reference[&format!("{case}.image")]; // [batch, h, w, 3] as 0..255
        let per_image = want.len() / shape[0];
        for b in 0..shape[0] {
            let path = match shape[0] {
                1 => out.clone(),
                _ => dir.path().join(format!("{case}-{b}.png")),
            };
            let (got, params) = read_png(&path);
            assert_eq!(got.len(), per_image, "{case}: image {b} size");
            let worst = got
                .iter()
                .zip(&want[b * per_image..(b + 1) * per_image])
                .map(|(&g, &w)| (g as f32 - w).abs())
                .fold(0.0, f32::max);
            assert!(
                worst <= 1.0,
                "{case}: image {b}: a pixel is {worst} levels off"
            );
            assert!(
                params.starts_with(c["prompt"].as_str().unwrap()),
                "{params}"
            );
            assert!(params.contains(&format!("Steps: {steps},")), "{params}");
        }
    }
}

/// `--stats` and `--json` say where and how the VAE decoded (on the CPU: whole).
#[test]
fn the_vae_decode_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fox.png");
    let m = fixture();
    let args = [
        "image",
        "--device",
        "cpu",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "a fox",
        "--size",
        "64x48",
        "--steps",
        "1",
        "--seed",
        "1",
        "--stats",
        "--json",
        "--out",
        out.to_str().unwrap(),
    ];
    let run = ferry(&args);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{err}");
    assert!(err.contains("[VAE decode: cpu, whole]"), "{err}");
    let summary: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(summary["vae"]["device"], "cpu");
    assert_eq!(summary["vae"]["tiling"], "whole");
}

/// A batch whose second file cannot be written (a directory is in its place) fails with one
/// line naming it and leaves no PNG: not the first image either.
#[test]
fn a_batch_that_cannot_be_written_leaves_no_png() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("fox-1.png")).unwrap();
    let out = dir.path().join("fox.png");
    let m = fixture();
    let args = [
        "image",
        "--device",
        "cpu",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "a fox",
        "--size",
        "64x48",
        "--steps",
        "1",
        "--seed",
        "1",
        "--batch",
        "2",
        "--out",
        out.to_str().unwrap(),
    ];
    let run = ferry(&args);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{err}");
    assert!(err.contains("fox-1.png"), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error")).count(),
        1,
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["fox-1.png"], "only the directory is left");
}

#[test]
fn bad_inputs_get_one_line_errors_and_leave_no_png() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let model = fixture();
    let m = model.to_str().unwrap();
    let o = out.to_str().unwrap();
    let wrong_noise = dir.path().join("wrong.safetensors");
    write_noise(&wrong_noise, &[0.0; 16 * 4 * 4], &[1, 16, 4, 4]);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--size", "60x48"], "multiples of 16"),
        (vec!["--size", "big"], "WIDTHxHEIGHT"),
        (vec!["--steps", "0"], "--steps"),
        (vec!["--batch", "0"], "--batch"),
        (vec!["--guidance", "-1"], "--guidance"),
        (vec!["--device", "cpu", "--vram", "1GiB"], "--vram"),
        (
            vec!["--device", "cpu", "--vae-device", "cuda"],
            "--vae-device",
        ),
        (
            vec!["--size", "64x48", "--noise", wrong_noise.to_str().unwrap()],
            "expected shape [1, 16, 6, 8]",
        ),
        (
            vec!["--size", "64x48", "--noise", "/no/such.safetensors"],
            "/no/such.safetensors",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["image", "--model", m, "--prompt", "a fox", "--out", o];
        args.extend(extra.iter().copied());
        let run = ferry(&args);
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{extra:?} succeeded");
        assert!(err.contains(want), "{extra:?}: {err}");
        assert_eq!(
            err.trim()
                .lines()
                .filter(|l| l.starts_with("error"))
                .count(),
            1,
            "{err}"
        );
        assert!(!out.exists(), "{extra:?} left a PNG");
    }
    // A model that is not a pipeline, and an output folder that does not exist.
    let llm = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3");
    let run = ferry(&[
        "image",
        "--model",
        llm.to_str().unwrap(),
        "--prompt",
        "x",
        "--out",
        o,
    ]);
    assert!(String::from_utf8_lossy(&run.stderr).contains("model_index.json"));
    let run = ferry(&[
        "image",
        "--model",
        m,
        "--prompt",
        "x",
        "--out",
        "/no/such/dir/x.png",
    ]);
    assert!(String::from_utf8_lossy(&run.stderr).contains("/no/such/dir"));
    // A pipeline missing its VAE.
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    for entry in std::fs::read_dir(&model).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_owned();
        if name != "vae" {
            std::os::unix::fs::symlink(&p, broken.join(name)).unwrap();
        }
    }
    let run = ferry(&[
        "image",
        "--model",
        broken.to_str().unwrap(),
        "--prompt",
        "x",
        "--out",
        o,
    ]);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && err.contains("vae"), "{err}");
    assert!(!out.exists());
}

#[test]
fn info_describes_a_pipeline_and_its_dit_groups() {
    let run = ferry(&["info", "--model", fixture().to_str().unwrap()]);
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for want in [
        "ZImagePipeline",
        "AutoencoderKL",
        "Qwen3Model",
        "embedders",
        "noise refiner 0",
        "block 1",
        "final layer",
    ] {
        assert!(out.contains(want), "{want} missing from:\n{out}");
    }
}

/// `ferry bench` on a pipeline times denoising steps of its DiT: one row per batch size in
/// the table and the JSON; a bad --size is refused.
#[test]
fn bench_times_dit_steps_of_a_pipeline() {
    let model = fixture();
    let m = model.to_str().unwrap();
    let args = [
        "bench",
        "--model",
        m,
        "--device",
        "cpu",
        "--size",
        "64x48",
        "--caption-tokens",
        "20",
        "--batch",
        "1,3",
        "--runs",
        "2",
        "--json",
    ];
    let run = ferry(&args);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&run.stdout).expect("JSON");
    let rows = v["results"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0]["batch"].as_u64(), rows[1]["batch"].as_u64()),
        (Some(1), Some(3))
    );
    for r in rows {
        let (step, per) = (
            r["step_s"].as_f64().unwrap(),
            r["per_image_s"].as_f64().unwrap(),
        );
        assert!(
            step > 0.0 && (per * r["batch"].as_f64().unwrap() - step).abs() < 1e-12,
            "{r}"
        );
        assert!(r["streamed"].is_null(), "nothing streams on the CPU");
    }
    assert_eq!(
        (v["width"].as_u64(), v["height"].as_u64()),
        (Some(64), Some(48))
    );
    let bad = ferry(&["bench", "--model", m, "--device", "cpu", "--size", "50x50"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--size"));
}
