//! The Flux / Z-Image VAE decoder on the CPU against diffusers' `AutoencoderKL` on the tiny
//! random Z-Image pipeline of `tests/fixtures/z-image` (scripts/make_zimage_fixture.py):
//! every decoder stage, the pipelines' decode of their final latents, the 8-bit pixels,
//! tiling, BFL single-file naming, and bad input.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{fixture, rel_l2};
use ferry::backend::conv::ImageShape;
use ferry::backend::cpu::Cpu;
use ferry::backend::cuda::IMAGE_MEMORY;
use ferry::checkpoint::{safetensors, DType};
use ferry::model::vae::{
    bfl_name, choose_tiling, open_vae, open_vae_file, to_rgb8, TileConfig, Tiling, Vae, VaeConfig,
    MIN_TILE,
};
use ferry::Error;

fn vae_dir() -> PathBuf {
    fixture("z-image").join("vae")
}

/// A reference tensor: dtype as safetensors names it, shape, raw bytes.
struct Reference {
    dtype: String,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl Reference {
    fn f32(&self) -> Vec<f32> {
        assert_eq!(self.dtype, "F32");
        self.bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }
    fn shape4(&self) -> [usize; 4] {
        self.shape.clone().try_into().expect("a 4-d tensor")
    }
}

/// Every tensor of reference.safetensors (it holds u8 and i64 too, which ferry's reader
/// rejects by design, so it is parsed here).
fn references() -> BTreeMap<String, Reference> {
    let bytes = std::fs::read(fixture("z-image").join("reference.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, v)| {
            let range = v["data_offsets"].as_array().unwrap();
            let (a, b) = (
                range[0].as_u64().unwrap() as usize,
                range[1].as_u64().unwrap() as usize,
            );
            let r = Reference {
                dtype: v["dtype"].as_str().unwrap().to_string(),
                shape: serde_json::from_value(v["shape"].clone()).unwrap(),
                bytes: bytes[8 + n + a..8 + n + b].to_vec(),
            };
            (k, r)
        })
        .collect()
}

fn expected() -> serde_json::Value {
    let text = std::fs::read(fixture("z-image").join("expected.json")).unwrap();
    serde_json::from_slice(&text).unwrap()
}

fn load() -> Vae<Cpu> {
    Vae::load(&Cpu, &open_vae(&vae_dir()).unwrap()).unwrap()
}

#[test]
fn decoder_stages_match_diffusers() {
    let refs = references();
    let vae = load();
    let z = &refs["vae.z"];
    let [_, c, h, w] = z.shape4();
    let mut stages = BTreeMap::new();
    let decoded = vae
        .decode_traced(
            &Cpu,
            &z.f32(),
            ImageShape::new(c, h, w),
            &mut |name, img| {
                stages.insert(name.to_string(), (img.shape, img.data.clone()));
            },
        )
        .unwrap();
    let mut names: Vec<String> = ["conv_in", "mid_block", "conv_norm_out"]
        .map(String::from)
        .to_vec();
    names.extend((0..4).map(|i| format!("up_blocks.{i}")));
    for name in &names {
        let want = &refs[&format!("vae.{name}")];
        let (shape, got) = &stages[name];
        assert_eq!(
            [1, shape.channels, shape.height, shape.width],
            want.shape4(),
            "{name} shape"
        );
        let err = rel_l2(got, &want.f32());
        eprintln!("vae.{name}: rel L2 {err:.2e}");
        assert!(err <= 1e-4, "vae.{name}: rel L2 {err}");
    }
    let err = rel_l2(&decoded, &refs["vae.decoded"].f32());
    eprintln!("vae.decoded: rel L2 {err:.2e}");
    assert!(err <= 1e-4, "vae.decoded: rel L2 {err}");
    // The same through the batch entry point (no scaling).
    let again = vae
        .decode_unscaled(&Cpu, &z.f32(), z.shape4(), Tiling::Whole)
        .unwrap();
    assert_eq!(again, decoded);
}

#[test]
fn pipeline_decodes_match_diffusers() {
    let refs = references();
    let exp = expected();
    let vae = load();
    assert_eq!(vae.config().scale_factor(), 8);
    for (case, settings) in exp["cases"].as_object().unwrap() {
        let steps = settings["num_inference_steps"].as_u64().unwrap();
        let latents = &refs[&format!("{case}.latents.{}", steps - 1)];
        let shape = latents.shape4();
        // decode() applies latents / scaling_factor + shift_factor itself: check that step
        // against the pipeline's own vae_input.
        let (s, t) = (0.3611f32, 0.1159f32);
        let z: Vec<f32> = latents.f32().iter().map(|v| v / s + t).collect();
        let err_in = rel_l2(&z, &refs[&format!("{case}.vae_input")].f32());
        assert!(err_in <= 1e-6, "{case}.vae_input: rel L2 {err_in}");

        let image = vae
            .decode(&Cpu, &latents.f32(), shape, Tiling::Whole)
            .unwrap();
        let decoded = &refs[&format!("{case}.decoded")];
        let err = rel_l2(&image, &decoded.f32());
        eprintln!("{case}.decoded {:?}: rel L2 {err:.2e}", decoded.shape);
        assert!(err <= 1e-4, "{case}.decoded: rel L2 {err}");

        let out_shape = decoded.shape4();
        let pixels = to_rgb8(&image, out_shape);
        let want = &refs[&format!("{case}.image")];
        assert_eq!(want.dtype, "U8");
        assert_eq!(
            want.shape,
            [out_shape[0], out_shape[2], out_shape[3], out_shape[1]]
        );
        let worst = pixels
            .iter()
            .zip(&want.bytes)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        let differ = pixels
            .iter()
            .zip(&want.bytes)
            .filter(|(a, b)| a != b)
            .count();
        eprintln!(
            "{case}.image: {differ} of {} bytes differ, by at most {worst}",
            pixels.len()
        );
        assert!(worst <= 1, "{case}.image: a pixel is off by {worst}");
        // diffusers' own decoded tensor through to_rgb8 gives its pixels exactly.
        assert_eq!(
            to_rgb8(&decoded.f32(), out_shape),
            want.bytes,
            "{case}: to_rgb8"
        );
    }
}

#[test]
fn tiled_decode_is_close_to_whole() {
    let refs = references();
    let vae = load();
    // trunc: latent 14 × 10 → 112 × 80 px.
    let z = &refs["trunc.vae_input"];
    let shape = z.shape4();
    let whole = vae
        .decode_unscaled(&Cpu, &z.f32(), shape, Tiling::Whole)
        .unwrap();

    // Tiles that cover the whole latent: one tile, weight 1, the same numbers.
    let cover = TileConfig::new(16, 4).unwrap();
    let one = vae
        .decode_unscaled(&Cpu, &z.f32(), shape, Tiling::Tiles(cover))
        .unwrap();
    assert_eq!(one, whole);

    // Real tiles (8 × 8 latent, 2 overlapping: 2 × 2 tiles). Not identical by nature: each
    // tile's GroupNorms take their statistics over the tile, its attention sees only the
    // tile, and its convs see zero padding at tile edges; the blend hides seams, not those.
    // Random weights make tiles differ far more than a trained VAE's would: diffusers' own
    // tiled_decode at this tile size and overlap (tile_latent_min_size 8, overlap factor
    // 0.25) is 0.226 from its whole decode on this latent; ours must do no worse than 0.2.
    let tiles = TileConfig::new(8, 2).unwrap();
    let tiled = vae
        .decode_unscaled(&Cpu, &z.f32(), shape, Tiling::Tiles(tiles))
        .unwrap();
    let err = rel_l2(&tiled, &whole);
    eprintln!("tiled 8/2 vs whole: rel L2 {err:.3}");
    assert!(err < 0.2, "tiled vs whole: rel L2 {err}");
    // The 8-bit images mostly agree.
    let (a, b) = (
        to_rgb8(&tiled, [1, 3, 112, 80]),
        to_rgb8(&whole, [1, 3, 112, 80]),
    );
    let mean = a
        .iter()
        .zip(&b)
        .map(|(x, y)| x.abs_diff(*y) as f64)
        .sum::<f64>()
        / a.len() as f64;
    eprintln!("tiled vs whole: mean |Δ| {mean:.2} of 255");
    assert!(mean < 8.0, "mean pixel difference {mean}");
}

/// The decoder's peak memory on the GPU (bf16, 64 MiB blocks) as the replay of its forward
/// pass estimates it, checked by hand at 1024² for Flux's VAE, and the tiling chosen from it
/// for a budget: whole when it fits, else the largest tiles that fit, else the bytes of the
/// smallest.
#[test]
fn tiling_follows_the_decoders_peak_memory() {
    let flux = VaeConfig::flux();
    let m = IMAGE_MEMORY;
    const MIB: usize = 1 << 20;
    // At 1024² the peak is the last up block's first resnet (256 → 128 channels over 1024²
    // positions) at its shortcut: the block's input and the resnet's normed input (256
    // channels, 512 MiB each), its two convs' outputs, the second norm's and the shortcut's
    // (128 channels, 256 MiB each); beside them the conv_in output (512 channels over 128²,
    // 16 MiB) and the latent (16 channels, 0.5 MiB).
    let whole = flux.decode_peak_bytes(128, 128, m);
    assert_eq!(whole, (512 + 512 + 4 * 256 + 16) * MIB + MIB / 2);
    // More pixels, more memory.
    assert!(flux.decode_peak_bytes(64, 64, m) < whole);
    assert!(flux.decode_peak_bytes(128, 96, m) < whole);
    assert_eq!(choose_tiling(&flux, 128, 128, whole, m), Ok(Tiling::Whole));
    let tiles = |available| match choose_tiling(&flux, 128, 128, available, m) {
        Ok(Tiling::Tiles(t)) => t,
        other => panic!("{available} bytes: {other:?}"),
    };
    for available in [whole - 1, whole / 4, 300 * MIB] {
        let t = tiles(available);
        assert!(t.tile() < 128 && t.tile() >= MIN_TILE && t.overlap() == t.tile() / 4);
        assert!(flux.decode_peak_bytes(t.tile(), t.tile(), m) <= available);
        assert!(flux.decode_peak_bytes(t.tile() + 1, t.tile() + 1, m) > available);
    }
    assert!(tiles(whole / 4).tile() < tiles(whole - 1).tile());
    // Too little for the smallest tile: the bytes it needs.
    let smallest = flux.decode_peak_bytes(MIN_TILE, MIN_TILE, m);
    assert_eq!(
        choose_tiling(&flux, 128, 128, smallest - 1, m),
        Err(smallest)
    );
    assert!(choose_tiling(&flux, 128, 128, smallest, m).is_ok());
    // A latent no larger than the smallest tile decodes whole or not at all.
    let small = flux.decode_peak_bytes(12, 8, m);
    assert_eq!(choose_tiling(&flux, 12, 8, small - 1, m), Err(small));
}

/// Write `tensors` as a safetensors file.
fn write(path: &Path, tensors: Vec<(String, DType, Vec<usize>, Vec<u8>)>) {
    safetensors::write(path, &tensors).unwrap();
}

/// The fixture's tensors as (name, dtype, shape, bytes), `edit` applied.
fn fixture_tensors() -> Vec<(String, DType, Vec<usize>, Vec<u8>)> {
    let file = vae_dir().join("diffusion_pytorch_model.safetensors");
    safetensors::read(&file)
        .unwrap()
        .into_iter()
        .map(|t| (t.name.clone(), t.dtype, t.shape.clone(), t.bytes().to_vec()))
        .collect()
}

#[test]
fn bfl_single_file_decodes_the_same() {
    // The fixture's weights renamed as in BFL's ae.safetensors (attention projections as
    // 1×1 convs), behind ComfyUI's full-checkpoint prefix.
    let config = open_vae(&vae_dir()).unwrap().config;
    let up_blocks = config.block_out_channels.len();
    let tensors = fixture_tensors()
        .into_iter()
        .map(|(name, dtype, mut shape, bytes)| {
            if name.contains(".attentions.0.to_") && shape.len() == 2 {
                shape.extend([1, 1]);
            }
            let bfl = format!("first_stage_model.{}", bfl_name(&name, up_blocks));
            (bfl, dtype, shape, bytes)
        })
        .collect::<Vec<_>>();
    assert!(tensors
        .iter()
        .any(|t| t.0 == "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"));
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("ae.safetensors");
    write(&file, tensors);

    let bfl = Vae::load(&Cpu, &open_vae_file(&file, config).unwrap()).unwrap();
    let refs = references();
    let z = &refs["vae.z"];
    let ours = bfl
        .decode_unscaled(&Cpu, &z.f32(), z.shape4(), Tiling::Whole)
        .unwrap();
    let diffusers = load()
        .decode_unscaled(&Cpu, &z.f32(), z.shape4(), Tiling::Whole)
        .unwrap();
    assert_eq!(ours, diffusers);

    // The Flux.1 config on these tiny weights: a shape error naming the BFL tensor.
    let err = Vae::load(&Cpu, &open_vae_file(&file, VaeConfig::flux()).unwrap())
        .err()
        .expect("Flux shapes do not fit the tiny VAE");
    assert!(
        matches!(&err, Error::Shape { tensor, expected, .. }
            if tensor == "first_stage_model.decoder.conv_in.weight" && expected == &[512, 16, 3, 3]),
        "{err}"
    );
}

/// A scratch copy of the fixture's vae/ with its config edited and its tensors edited.
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
    let mut tensors = fixture_tensors();
    edit_tensors(&mut tensors);
    write(&dir.join("diffusion_pytorch_model.safetensors"), tensors);
    (tmp, dir)
}

/// Opening and loading `dir` fails; the error.
fn load_error(dir: &Path) -> Error {
    match open_vae(dir) {
        Err(e) => e,
        Ok(w) => {
            let e = Vae::load(&Cpu, &w).err().expect("loading should fail");
            // The check at open (no weight converted) finds the same.
            let checked = w.check().expect_err("the check should fail");
            assert_eq!(checked.to_string(), e.to_string());
            e
        }
    }
}

#[test]
fn missing_tensor_is_named() {
    const NAME: &str = "decoder.up_blocks.3.resnets.0.conv_shortcut.weight";
    let (_tmp, dir) = broken_vae(|_| {}, |t| t.retain(|t| t.0 != NAME));
    let err = load_error(&dir);
    assert!(
        matches!(&err, Error::MissingTensor { tensor, .. } if tensor == NAME),
        "{err}"
    );
    assert!(
        err.to_string().contains(NAME) && err.to_string().contains("vae"),
        "{err}"
    );
}

#[test]
fn wrong_shape_is_named() {
    const NAME: &str = "decoder.mid_block.attentions.0.to_k.weight";
    let (_tmp, dir) = broken_vae(
        |_| {},
        |t| {
            for (name, _, shape, bytes) in t.iter_mut() {
                if name == NAME {
                    *shape = vec![8, 32]; // same bytes, wrong shape
                    assert_eq!(bytes.len(), 8 * 32 * 4);
                }
            }
        },
    );
    let err = load_error(&dir);
    assert!(
        matches!(&err, Error::Shape { tensor, expected, found } if tensor == NAME && expected == &[16, 16] && found == &[8, 32]),
        "{err}"
    );
}

#[test]
fn unsupported_config_values_are_named() {
    for (field, value, says) in [
        ("act_fn", serde_json::json!("gelu"), "act_fn"),
        (
            "up_block_types",
            serde_json::json!(vec!["AttnUpDecoderBlock2D"; 4]),
            "up_block_types",
        ),
        ("norm_num_groups", serde_json::json!(3), "norm_num_groups"),
        (
            "latents_mean",
            serde_json::json!(vec![0.0; 16]),
            "latents_mean",
        ),
        (
            "_class_name",
            serde_json::json!("AutoencoderKLWan"),
            "_class_name",
        ),
        (
            "block_out_channels",
            serde_json::json!([]),
            "block_out_channels",
        ),
        ("scaling_factor", serde_json::json!(0.0), "scaling_factor"),
    ] {
        let (_tmp, dir) = broken_vae(|c| c[field] = value.clone(), |_| {});
        let err = load_error(&dir);
        let msg = err.to_string();
        assert!(matches!(err, Error::Checkpoint { .. }), "{field}: {msg}");
        assert!(
            msg.contains("config.json") && msg.contains(says),
            "{field}: {msg}"
        );
    }
    // A value of the wrong type is a JSON error naming the file.
    let (_tmp, dir) = broken_vae(|c| c["layers_per_block"] = serde_json::json!("two"), |_| {});
    let err = load_error(&dir);
    assert!(
        matches!(&err, Error::Json { path, .. } if path.ends_with("config.json")),
        "{err}"
    );
}

#[test]
fn missing_files_and_bad_latents() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(matches!(open_vae(tmp.path()), Err(Error::NotFound { .. })));
    std::fs::copy(
        vae_dir().join("config.json"),
        tmp.path().join("config.json"),
    )
    .unwrap();
    let err = open_vae(tmp.path()).err().unwrap();
    assert!(
        matches!(&err, Error::NotFound { path, .. } if path.ends_with("diffusion_pytorch_model.safetensors")),
        "{err}"
    );
    // Latents with 4 channels, or fewer values than the shape says.
    let vae = load();
    let err = vae
        .decode(&Cpu, &[0.0; 4 * 3 * 4], [1, 4, 3, 4], Tiling::Whole)
        .unwrap_err();
    assert!(
        matches!(&err, Error::Shape { tensor, .. } if tensor == "latents"),
        "{err}"
    );
    let err = vae
        .decode(&Cpu, &[0.0; 10], [1, 16, 3, 4], Tiling::Whole)
        .unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err}");
}
