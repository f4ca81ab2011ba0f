//! Qwen-Image's VAE decoder (diffusers' `AutoencoderKLQwenImage`, one frame) on the CPU
//! against diffusers on the tiny random VAE of `tests/fixtures/qwen-image/vae`
//! (scripts/make_qwenimage_fixture.py): every decoder stage, the pipeline's denormalize +
//! decode + 8-bit pixels, tiling, and bad input.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{fixture, read_reference, rel_l2};
use ferry::backend::conv::ImageShape;
use ferry::backend::cpu::Cpu;
use ferry::checkpoint::{safetensors, DType};
use ferry::model::qwen_image::vae::{open_qwen_vae, QwenVae, QwenVaeConfig};
use ferry::model::vae::{to_rgb8, TileConfig, Tiling};
use ferry::Error;

fn dir() -> PathBuf {
    fixture("qwen-image")
}

fn vae_dir() -> PathBuf {
    dir().join("vae")
}

fn references() -> BTreeMap<String, Vec<f32>> {
    read_reference(&dir().join("vae_reference.safetensors"))
}

/// The shape of reference tensor `name`, from vae_expected.json.
fn shape(name: &str) -> Vec<usize> {
    let text = std::fs::read(dir().join("vae_expected.json")).unwrap();
    let exp: serde_json::Value = serde_json::from_slice(&text).unwrap();
    serde_json::from_value(exp["tensors"][name][1].clone()).unwrap()
}

fn shape4(name: &str) -> [usize; 4] {
    shape(name).try_into().expect("a 4-d tensor")
}

fn load() -> QwenVae<Cpu> {
    QwenVae::load(&Cpu, &open_qwen_vae(&vae_dir()).unwrap()).unwrap()
}

#[test]
fn config_is_read_from_the_file() {
    let c = open_qwen_vae(&vae_dir()).unwrap().config;
    assert_eq!(
        (c.base_dim, c.z_dim, c.num_res_blocks, c.input_channels),
        (8, 16, 1, 3)
    );
    assert_eq!(c.dim_mult, [1, 2, 2, 1]);
    assert_eq!(c.temperal_downsample, [false, true, true]);
    assert_eq!(c.scale_factor(), 8);
    // The fixture's own statistics (drawn by the script), not Qwen-Image's defaults.
    assert_eq!(c.latents_mean.len(), 16);
    assert_eq!(c.latents_mean[0], -0.3094);
    assert_eq!(c.latents_std[15], 1.6589);
    // An empty config is Qwen-Image's released one (diffusers' defaults).
    let real = QwenVaeConfig::from_json(Path::new("config.json"), &serde_json::json!({})).unwrap();
    assert_eq!(
        (
            real.base_dim,
            real.z_dim,
            real.num_res_blocks,
            real.scale_factor()
        ),
        (96, 16, 2, 8)
    );
    assert_eq!(real.dim_mult, [1, 2, 4, 4]);
    assert_eq!(
        (real.latents_mean[0], real.latents_std[0]),
        (-0.7571, 2.8184)
    );
}

/// Every stage of the decoder, on the odd-sized latent, against diffusers' real 3-D decode of
/// one frame: the single-frame reduction of each causal conv (last temporal slice), the
/// skipped time_convs, the channel RMS norms, the attention and the halving upsamplers.
#[test]
fn decoder_stages_match_diffusers() {
    let refs = references();
    let vae = load();
    let [_, c, h, w] = shape4("odd.z");
    let mut stages = BTreeMap::new();
    let decoded = vae
        .decode_traced(
            &Cpu,
            &refs["odd.z"],
            ImageShape::new(c, h, w),
            &mut |name, img| {
                stages.insert(name.to_string(), (img.shape, img.data.clone()));
            },
        )
        .unwrap();
    let mut names: Vec<String> = ["post_quant_conv", "conv_in", "mid_block", "norm_out"]
        .map(String::from)
        .to_vec();
    names.extend((0..4).map(|i| format!("up_blocks.{i}")));
    for name in &names {
        let key = format!("odd.{name}");
        let (s, got) = &stages[name];
        assert_eq!(
            [1, s.channels, s.height, s.width],
            shape4(&key),
            "{name} shape"
        );
        let err = rel_l2(got, &refs[&key]);
        eprintln!("{key}: rel L2 {err:.2e}");
        assert!(err <= 1e-4, "{key}: rel L2 {err}");
    }
    assert_eq!(shape4("odd.decoded"), [1, 3, 8 * h, 8 * w]);
    let err = rel_l2(&decoded, &refs["odd.decoded"]);
    eprintln!("odd.decoded: rel L2 {err:.2e}");
    assert!(err <= 1e-4, "odd.decoded: rel L2 {err}");
    // The batch entry point gives the same numbers.
    let again = vae
        .decode_unscaled(&Cpu, &refs["odd.z"], [1, c, h, w], Tiling::Whole)
        .unwrap();
    assert_eq!(again, decoded);
}

/// What QwenImagePipeline does after its last step, on a batch of two non-square latents:
/// denormalize with the config's statistics, decode, clamp, postprocess to 8 bits.
#[test]
fn pipeline_decode_matches_diffusers() {
    let refs = references();
    let vae = load();
    let latents = &refs["pipeline.latents"];
    let lshape = shape4("pipeline.latents");
    assert_eq!(lshape, [2, 16, 6, 10]);

    let z = vae.config().denormalize(latents, lshape).unwrap();
    let err = rel_l2(&z, &refs["pipeline.z"]);
    eprintln!("pipeline.z: rel L2 {err:.2e}");
    assert!(err <= 1e-7, "pipeline.z: rel L2 {err}");

    let image = vae.decode(&Cpu, latents, lshape, Tiling::Whole).unwrap();
    let out_shape = shape4("pipeline.decoded");
    assert_eq!(out_shape, [2, 3, 48, 80]);
    let want = &refs["pipeline.decoded"];
    let err = rel_l2(&image, want);
    eprintln!("pipeline.decoded: rel L2 {err:.2e}");
    assert!(err <= 1e-4, "pipeline.decoded: rel L2 {err}");
    // Clamped as diffusers' decode clamps (the fixture's output reaches both ends).
    assert!(image.iter().all(|v| (-1.0..=1.0).contains(v)));
    assert!(want.contains(&1.0) && want.contains(&-1.0));

    let pixels = to_rgb8(&image, out_shape);
    assert_eq!(shape("pipeline.rgb8"), [2, 48, 80, 3]);
    let rgb8: Vec<u8> = refs["pipeline.rgb8"].iter().map(|&v| v as u8).collect();
    let worst = pixels
        .iter()
        .zip(&rgb8)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    let differ = pixels.iter().zip(&rgb8).filter(|(a, b)| a != b).count();
    eprintln!(
        "pipeline.rgb8: {differ} of {} bytes differ, by at most {worst}",
        pixels.len()
    );
    assert!(worst <= 1, "pipeline.rgb8: a pixel is off by {worst}");
    // diffusers' own decoded tensor through to_rgb8 gives its PIL pixels exactly.
    assert_eq!(to_rgb8(want, out_shape), rgb8, "to_rgb8");

    // Each image of the batch is decoded on its own: sample 1 alone is the batch's second.
    let one = 16 * 6 * 10;
    let alone = vae
        .decode(&Cpu, &latents[one..], [1, 16, 6, 10], Tiling::Whole)
        .unwrap();
    assert_eq!(alone, image[image.len() / 2..]);
}

#[test]
fn tiled_decode_is_close_to_whole() {
    let refs = references();
    let vae = load();
    let shape = shape4("pipeline.z");
    let z = &refs["pipeline.z"];
    let whole = vae.decode_unscaled(&Cpu, z, shape, Tiling::Whole).unwrap();
    // One tile that covers the latent: the same numbers.
    let cover = TileConfig::new(10, 2).unwrap();
    let one = vae
        .decode_unscaled(&Cpu, z, shape, Tiling::Tiles(cover))
        .unwrap();
    assert_eq!(one, whole);
    // 4 × 4 tiles overlapping by 2 (2 × 4 tiles of a 6 × 10 latent). Not identical by
    // nature: the convs see zero padding at tile edges and the mid-block attention sees only
    // its tile, and random weights make tiles differ far more than a trained VAE's would.
    // diffusers' own tiled_decode at this tile size and overlap (tile_sample_min 32 px,
    // stride 16 px) is 0.485 from its whole decode on this latent; ours must do no worse.
    let tiles = TileConfig::new(4, 2).unwrap();
    let tiled = vae
        .decode_unscaled(&Cpu, z, shape, Tiling::Tiles(tiles))
        .unwrap();
    let err = rel_l2(&tiled, &whole);
    eprintln!("tiled 4/2 vs whole: rel L2 {err:.3}");
    assert!(err > 0.0 && err < 0.485, "tiled vs whole: rel L2 {err}");
    // Larger tiles (6 × 6, overlap 2: 1 × 2 tiles) come closer.
    let tiles = TileConfig::new(6, 2).unwrap();
    let larger = vae
        .decode_unscaled(&Cpu, z, shape, Tiling::Tiles(tiles))
        .unwrap();
    let err6 = rel_l2(&larger, &whole);
    eprintln!("tiled 6/2 vs whole: rel L2 {err6:.3}");
    assert!(err6 < err, "6/2 tiles {err6} vs 4/2 tiles {err}");
    assert!(tiled.iter().all(|v| (-1.0..=1.0).contains(v)));
}

/// Write `tensors` as a safetensors file.
fn write(path: &Path, tensors: Vec<(String, DType, Vec<usize>, Vec<u8>)>) {
    safetensors::write(path, &tensors).unwrap();
}

/// A scratch copy of the fixture's vae/ with its config and its tensors edited.
fn broken_vae(
    edit_config: impl FnOnce(&mut serde_json::Value),
    edit_tensors: impl FnOnce(&mut Vec<(String, DType, Vec<usize>, Vec<u8>)>),
) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vae");
    std::fs::create_dir(&dir).unwrap();
    let text = std::fs::read(vae_dir().join("config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_slice(&text).unwrap();
    edit_config(&mut config);
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec(&config).unwrap(),
    )
    .unwrap();
    let file = vae_dir().join("diffusion_pytorch_model.safetensors");
    let mut tensors: Vec<_> = safetensors::read(&file)
        .unwrap()
        .into_iter()
        .map(|t| (t.name.clone(), t.dtype, t.shape.clone(), t.bytes().to_vec()))
        .collect();
    edit_tensors(&mut tensors);
    write(&dir.join("diffusion_pytorch_model.safetensors"), tensors);
    (tmp, dir)
}

/// Opening and loading `dir` fails; the error (the check at open, which converts no weight,
/// finds the same one).
fn load_error(dir: &Path) -> Error {
    match open_qwen_vae(dir) {
        Err(e) => e,
        Ok(w) => {
            let e = QwenVae::load(&Cpu, &w).err().expect("loading should fail");
            let checked = w.check().expect_err("the check should fail");
            assert_eq!(checked.to_string(), e.to_string());
            e
        }
    }
}

#[test]
fn missing_dir_and_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-vae");
    let err = load_error(&missing);
    assert!(
        matches!(&err, Error::NotFound { path, .. } if path == &missing),
        "{err}"
    );
    // A directory without config.json.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = load_error(&empty);
    assert!(err.to_string().contains("config.json"), "{err}");
    // config.json but no weights.
    std::fs::copy(vae_dir().join("config.json"), empty.join("config.json")).unwrap();
    let err = load_error(&empty);
    assert!(
        err.to_string()
            .contains("diffusion_pytorch_model.safetensors"),
        "{err}"
    );
}

#[test]
fn missing_tensor_is_named() {
    // The shortcut conv of the first up block that changes channels (4 → 16).
    const NAME: &str = "decoder.up_blocks.1.resnets.0.conv_shortcut.weight";
    let (_tmp, dir) = broken_vae(|_| {}, |t| t.retain(|t| t.0 != NAME));
    let err = load_error(&dir);
    assert!(
        matches!(&err, Error::MissingTensor { tensor, .. } if tensor == NAME),
        "{err}"
    );
    assert!(err.to_string().contains(NAME), "{err}");
}

#[test]
fn wrong_shape_is_named() {
    // The attention's qkv conv, reshaped (same bytes): [24, 8, 1, 1] → [8, 24, 1, 1].
    const NAME: &str = "decoder.mid_block.attentions.0.to_qkv.weight";
    let (_tmp, dir) = broken_vae(
        |_| {},
        |t| {
            let entry = t.iter_mut().find(|t| t.0 == NAME).expect("in the fixture");
            assert_eq!(entry.2, [24, 8, 1, 1]);
            entry.2 = vec![8, 24, 1, 1];
        },
    );
    let err = load_error(&dir);
    assert!(
        matches!(&err, Error::Shape { tensor, expected, found }
            if tensor == NAME && expected == &[24, 8, 1, 1] && found == &[8, 24, 1, 1]),
        "{err}"
    );
    // A causal conv stored as 2-D (no temporal axis) is refused too, naming it.
    const CONV: &str = "decoder.conv_in.weight";
    let (_tmp, dir) = broken_vae(
        |_| {},
        |t| {
            let entry = t.iter_mut().find(|t| t.0 == CONV).expect("in the fixture");
            entry.2 = vec![8, 16, 9, 3];
        },
    );
    let err = load_error(&dir);
    assert!(
        matches!(&err, Error::Shape { tensor, expected, .. } if tensor == CONV && expected == &[8, 16, 3, 3, 3]),
        "{err}"
    );
}

#[test]
fn malformed_and_unsupported_configs_are_named() {
    use serde_json::json;
    for (key, value) in [
        ("_class_name", json!("AutoencoderKL")),
        ("base_dim", json!("eight")),
        ("base_dim", json!(0)),
        ("z_dim", json!(-16)),
        ("dim_mult", json!([])),
        ("dim_mult", json!([1, 2, 0, 1])),
        ("num_res_blocks", json!(1.5)),
        ("temperal_downsample", json!([false, true])),
        ("temperal_downsample", json!("yes")),
        ("attn_scales", json!({})),
        ("latents_mean", json!(vec![0.0; 15])),
        ("latents_std", json!(vec![1.0; 17])),
        ("input_channels", json!(0)),
    ] {
        let (_tmp, dir) = broken_vae(|c| c[key] = value.clone(), |_| {});
        let err = load_error(&dir);
        let text = err.to_string();
        eprintln!("{key} = {value}: {text}");
        assert!(
            text.contains(&format!("{key}:")) && text.contains("config.json"),
            "{key} = {value}: {text}"
        );
    }
    // A std of 0 cannot be undone, nor a config that is not an object.
    let (_tmp, dir) = broken_vae(|c| c["latents_std"][3] = json!(0.0), |_| {});
    assert!(load_error(&dir).to_string().contains("latents_std:"));
    let (_tmp, dir) = broken_vae(|c| *c = json!([1, 2]), |_| {});
    assert!(load_error(&dir).to_string().contains("config.json"));
    // Not JSON at all.
    let (_tmp, dir) = broken_vae(|_| {}, |_| {});
    std::fs::write(dir.join("config.json"), b"{ base_dim: 8").unwrap();
    let err = load_error(&dir);
    assert!(matches!(err, Error::Json { .. }), "{err}");
}

#[test]
fn wrong_latents_are_refused() {
    let vae = load();
    let refs = references();
    let z = &refs["pipeline.z"];
    // 8 channels instead of 16 (same number of values as [2, 8, 6, 20]).
    let err = vae
        .decode(&Cpu, z, [2, 8, 6, 20], Tiling::Whole)
        .expect_err("wrong channel count");
    assert!(
        matches!(&err, Error::Shape { tensor, expected, found }
            if tensor == "latents" && expected == &[2, 16, 6, 20] && found == &[2, 8, 6, 20]),
        "{err}"
    );
    // Fewer values than the shape says.
    let err = vae
        .decode_unscaled(&Cpu, &z[1..], [2, 16, 6, 10], Tiling::Whole)
        .expect_err("short data");
    assert!(
        matches!(&err, Error::Shape { tensor, .. } if tensor == "latents"),
        "{err}"
    );
    let err = vae
        .config()
        .denormalize(&z[..100], [2, 16, 6, 10])
        .expect_err("short data");
    assert!(
        matches!(&err, Error::Shape { tensor, .. } if tensor == "latents"),
        "{err}"
    );
    // An empty latent.
    assert!(vae
        .decode(&Cpu, &[], [1, 16, 0, 10], Tiling::Whole)
        .is_err());
}
