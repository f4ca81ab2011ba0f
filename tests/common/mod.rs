//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

pub mod server;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The GPU (with a `--vram`-style budget of `vram` bytes), or None after saying on the real
/// stderr (not captured by the harness) why the test is skipped. Only a machine without a
/// usable CUDA device skips; any other failure to open the device fails the test.
pub fn gpu(test: &str, vram: Option<usize>) -> Option<ferry::backend::cuda::Cuda> {
    use std::io::Write;
    let budget = vram.map(ferry::stream::Vram::Bytes);
    match ferry::backend::cuda::Cuda::with_vram(0, budget) {
        Ok(c) => Some(c),
        Err(e) => {
            let e = e.to_string();
            if !e.starts_with("no usable CUDA device") {
                panic!("{test}: {e}");
            }
            let why = e.trim_start_matches("no usable CUDA device: ");
            let _ = writeln!(
                std::io::stderr(),
                "{test}: SKIPPED: no usable CUDA device: {why}"
            );
            None
        }
    }
}

pub const ARCHS: [&str; 5] = ["llama", "llama3", "mistral", "qwen2", "qwen3"];

/// ‖a − b‖₂ / ‖b‖₂
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    (num / den).sqrt()
}

/// Every tensor of a reference safetensors file, as f32 (row-major), by name: f32, i64 and
/// bool tensors (token ids and masks come as i64 and bool from torch).
#[allow(dead_code)]
pub fn read_reference(path: &std::path::Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).expect("header");
    let data = &bytes[8 + n..];
    let mut out = std::collections::BTreeMap::new();
    for (name, entry) in header.as_object().expect("header object") {
        if name == "__metadata__" {
            continue;
        }
        let range = &entry["data_offsets"];
        let (a, b) = (
            range[0].as_u64().unwrap() as usize,
            range[1].as_u64().unwrap() as usize,
        );
        let raw = &data[a..b];
        let values: Vec<f32> = match entry["dtype"].as_str().unwrap() {
            "F32" => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            "I64" => raw
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            "I32" => raw
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            "BOOL" | "U8" => raw.iter().map(|&v| v as f32).collect(),
            other => panic!("{name}: reference dtype {other}"),
        };
        out.insert(name.clone(), values);
    }
    out
}

/// `request` at the least budget that plans (found by bisection: the planner is a pure
/// function of its request, and more budget never plans worse).
pub fn least_budget(request: &ferry::stream::PlanRequest) -> ferry::stream::PlanRequest {
    use ferry::stream::{plan, PlanRequest};
    let at = |budget| PlanRequest {
        budget,
        ..request.clone()
    };
    let (mut lo, mut hi) = (request.budget, request.budget.max(1) * 2);
    while plan(&at(hi)).is_err() {
        assert!(hi < 1 << 44, "plans at no budget");
        (lo, hi) = (hi, hi * 2);
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if plan(&at(mid)).is_ok() {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    at(hi)
}

/// The planner's request for passes of `shape` of `arch` within `budget` on the CPU copy
/// engine: bytes as stored, the architecture's cache and workspace, no CUDA reserves.
pub fn cpu_request(
    arch: &dyn ferry::model::Architecture,
    tensors: &dyn ferry::checkpoint::Tensors,
    shape: ferry::model::PassShape,
    budget: usize,
) -> ferry::stream::PlanRequest {
    use ferry::stream::cost::{planner_groups, CostModel};
    let bytes: Vec<usize> = arch
        .groups()
        .iter()
        .map(|g| {
            g.tensors
                .iter()
                .map(|t| tensors.tensor(&t.name).unwrap().bytes().len())
                .sum()
        })
        .collect();
    let dtype = tensors
        .tensor(&arch.groups()[0].tensors[0].name)
        .unwrap()
        .dtype;
    let cost = arch.pass_cost(shape);
    ferry::stream::PlanRequest {
        groups: planner_groups(arch, &bytes, dtype, shape, &CostModel::ASSUMED),
        budget,
        kv_cache: cost.cache,
        workspace: cost.workspace,
        cublas_workspace: 0,
        reserve: 0,
        h2d_gbps: 25.0,
        slot_size: ferry::stream::SlotSize::Auto,
        compressed: None,
    }
}

/// The logits of a prompt pass (every position) and `steps` greedy decode steps on the CPU,
/// as bits.
pub fn passes_of(
    model: &ferry::model::Llama,
    weights: &mut impl ferry::model::Weights<ferry::backend::cpu::CpuWeight>,
    prompt: &[u32],
    steps: usize,
) -> Vec<Vec<u32>> {
    use ferry::backend::Backend;
    let cpu = ferry::backend::cpu::Cpu;
    let c = &model.config;
    let mut cache = cpu
        .kv_cache(c.num_layers, model.attention_shape(), prompt.len() + steps)
        .unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    let mut out = Vec::new();
    let logits = model
        .forward(&cpu, weights, prompt, &mut cache, ferry::model::Logits::All)
        .unwrap();
    let vocab = c.vocab_size;
    let mut next = ferry::generate::argmax(&logits[logits.len() - vocab..]);
    out.push(bits(&logits));
    for _ in 0..steps {
        let logits = model
            .forward(
                &cpu,
                weights,
                &[next],
                &mut cache,
                ferry::model::Logits::Last,
            )
            .unwrap();
        next = ferry::generate::argmax(&logits);
        out.push(bits(&logits));
    }
    out
}

/// A safetensors file holding `data` as the f32 tensor `noise` of `shape`.
pub fn write_noise(path: &std::path::Path, data: &[f32], shape: &[usize]) {
    let header = serde_json::json!({
        "noise": {"dtype": "F32", "shape": shape, "data_offsets": [0, data.len() * 4]}
    })
    .to_string();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

pub fn ferry(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .expect("ferry runs")
}

/// The standard output of a `ferry` run that must succeed (its standard error if not).
pub fn stdout_of(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The pixels of a PNG, `[h, w, 3]`.
pub fn read_png(path: &std::path::Path) -> (Vec<u8>, String) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    let params = reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
        .map(|t| t.text.clone())
        .unwrap_or_default();
    (buf, params)
}
