//! The front door: everything a command needs before it computes, set up one way for every
//! command — the checkpoint (a path or a synthetic preset), the device and its budget, the
//! planner's request, and the weights (resident or streamed).
//!
//! One rule for the planner's request ([`plan_request`]) serves `ferry plan` (figures
//! stated, no GPU) and a CUDA run (figures measured), so both plan identically for the same
//! budget, shape and figures.

use crate::backend::cuda::streaming::{measure_h2d, HostMemory, HostTier, StreamedWeights};
use crate::backend::cuda::{Cuda, CUBLAS_WORKSPACE, DRIVER_RESERVE, STAGING_RESERVE};
use crate::backend::Device;
use crate::checkpoint::{DType, Tensors};
use crate::error::{Error, Result};
use crate::model::Checkpoint;
use crate::model::{Architecture, PassShape};
use std::sync::Arc;

use crate::backend::cuda::streaming::SLOT_ALIGN;
use crate::checkpoint::gguf::Weights;
use crate::stream::compress::{encode_jobs, Compress, Compressed, DecodeSpeeds};
use crate::stream::cost::{planner_groups, CostModel};
use crate::stream::encoding_cache::{CacheMode, EncodingCache};
use crate::stream::{GroupTensors, Placement, PlanRequest, SlotSize, Vram};
use crate::synth::{synthetic_checkpoint, Preset};

/// Open `--model PATH` (a GGUF's tensors held as `gguf` says) or `--synthetic PRESET`
/// (random bf16 weights of a real shape, made in memory), with a label for reports.
pub fn open_checkpoint(
    model: Option<&str>,
    synthetic: Option<&str>,
    gguf: Weights,
) -> Result<(Checkpoint, String)> {
    match (model, synthetic) {
        (Some(m), _) => Ok((Checkpoint::open_as(m, gguf)?, m.to_string())),
        (None, Some(p)) => {
            let preset = synthetic_preset(p)?;
            Ok((
                synthetic_checkpoint(&preset, 0, DType::BF16)?,
                format!("synthetic {p} (random bf16 weights)"),
            ))
        }
        (None, None) => Err(Error::Flag {
            flag: "--model",
            message: "give --model or --synthetic".into(),
        }),
    }
}

/// The preset `--synthetic NAME` names, or an error naming `--synthetic` and the presets.
pub fn synthetic_preset(name: &str) -> Result<Preset> {
    Preset::by_name(name).map_err(|e| match e {
        Error::Flag { message, .. } => Error::Flag {
            flag: "--synthetic",
            message,
        },
        e => e,
    })
}

/// The GPU a command computes on, by `--device` and `--vram`: `None` for the CPU. A budget
/// needs a GPU; `auto` without one falls back to the CPU only when no budget was asked for.
pub fn open_device(device: Device, vram: Option<Vram>) -> Result<Option<Cuda>> {
    match (device, vram) {
        (Device::Cpu, Some(_)) => Err(Error::Flag {
            flag: "--vram",
            message: "a GPU memory budget needs --device cuda (or auto with a GPU)".into(),
        }),
        (Device::Cpu, None) => Ok(None),
        (Device::Auto, None) => Ok(Cuda::new(0).ok()),
        (device, vram) => open_gpu(device, vram).map(Some),
    }
}

/// The GPU `--device` names (auto: cuda:0) with the `--vram` budget, or an error that names
/// the flag that asked for it: `--device` for a CUDA device that is not usable, `--vram`
/// where only the budget asked for a GPU (`--device auto`).
pub fn open_gpu(device: Device, vram: Option<Vram>) -> Result<Cuda> {
    let ordinal = match device {
        Device::Cuda(n) => n,
        Device::Auto | Device::Cpu => 0,
    };
    Cuda::with_vram(ordinal, vram).map_err(|e| {
        let Error::Device(msg) = e else { return e };
        let why = msg.strip_prefix("no usable CUDA device: ").unwrap_or(&msg);
        match (device, vram) {
            (Device::Auto, Some(_)) => Error::Flag {
                flag: "--vram",
                message: format!(
                    "a GPU memory budget needs a CUDA GPU, and --device auto found none usable ({why}); leave --vram out to run on the CPU"
                ),
            },
            _ if msg.starts_with("cuda:") => Error::Flag {
                flag: "--device",
                message: msg,
            },
            _ => Error::Flag {
                flag: "--device",
                message: format!("cuda:{ordinal} is not usable: {why}"),
            },
        }
    })
}

/// Device memory the plan leaves aside for what the CUDA driver holds beyond the ledger, by
/// how streamed bytes reach the device.
pub fn driver_reserve(staged: bool) -> usize {
    if staged {
        DRIVER_RESERVE + STAGING_RESERVE
    } else {
        DRIVER_RESERVE
    }
}

/// The planner's request for passes of `shape` of `arch` within `budget` (bytes the plan may
/// allocate, the cuBLAS workspace included): group bytes as they will stream, compute from
/// `cost` or, where given, measured per group (ms), the cache and workspace the architecture
/// states, and the CUDA backend's fixed allocations.
pub fn plan_request(
    arch: &dyn Architecture,
    bytes: &[usize],
    budget: usize,
    shape: PassShape,
    cost: &CostModel,
    staged: bool,
) -> PlanRequest {
    let pass = arch.pass_cost(shape);
    PlanRequest {
        groups: planner_groups(arch, bytes, DType::BF16, shape, cost),
        budget,
        kv_cache: pass.cache,
        workspace: pass.workspace,
        cublas_workspace: CUBLAS_WORKSPACE,
        reserve: driver_reserve(staged),
        h2d_gbps: cost.h2d_gbps,
        slot_size: SlotSize::Auto,
        compressed: None,
    }
}

/// Decoding speeds the planner assumes, GB/s of bf16 written: exponent-coded weights
/// (`decompress.cu`) and ggml blocks (`dequantize.cu`); bench/NOTES.md has the measured
/// figures.
pub const ASSUMED_DECODE: DecodeSpeeds = DecodeSpeeds {
    exponents_gbps: 700.0,
    blocks_gbps: 1500.0,
};

/// Compute figures the first plan assumes before a pass has been measured: an H100-class
/// card (DESIGN.md). The prediction printed after a measured pass uses measured times.
pub const ASSUMED_COMPUTE: CostModel = CostModel {
    h2d_gbps: 55.0,
    tflops: 600.0,
    hbm_gbps: 3000.0,
};

/// How streamed weights reach the device: `--host-memory`, `--compress` and
/// `--encoding-cache`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamOptions {
    pub host: HostMemory,
    pub compress: Compress,
    pub encoding_cache: CacheMode,
}

impl From<HostMemory> for StreamOptions {
    /// `host`, compressed where the engine can, the encodings cached.
    fn from(host: HostMemory) -> StreamOptions {
        StreamOptions {
            host,
            compress: Compress::Auto,
            encoding_cache: CacheMode::On,
        }
    }
}

/// How a streamed run is set up beyond the model: the pass to plan for and how host memory
/// reaches the device.
#[derive(Clone, Copy)]
pub struct StreamSetup<'a> {
    pub shape: PassShape,
    /// Activation bytes of one pass, when not the architecture's own figure (every
    /// position's logits, say).
    pub workspace: Option<usize>,
    /// Per-group compute, ms, measured on this card; else from the assumed figures.
    pub measured_ms: Option<&'a [f64]>,
    pub host: HostMemory,
    /// Whether streamed weights cross the link compressed (`--compress`).
    pub compress: Compress,
    /// Whether their encodings are kept in a file between loads (`--encoding-cache`).
    pub encoding_cache: CacheMode,
    /// Other models over the same tensors, loaded later (a DiT after its modulation
    /// model): a cache miss encodes and writes what they could stream too.
    pub siblings: &'a [&'a dyn Architecture],
}

impl StreamSetup<'static> {
    /// Passes of `shape`, the architecture's own workspace, compute from the assumed figures.
    pub fn new(shape: PassShape, options: impl Into<StreamOptions>) -> StreamSetup<'static> {
        let options = options.into();
        StreamSetup {
            shape,
            workspace: None,
            measured_ms: None,
            host: options.host,
            compress: options.compress,
            encoding_cache: options.encoding_cache,
            siblings: &[],
        }
    }
}

/// Everything `--vram` needs: make the host tier, measure H2D, plan passes of the setup's
/// shape within the GPU's budget, upload the residents and start the streamer.
pub fn stream_weights(
    gpu: &Cuda,
    tensors: &dyn Tensors,
    arch: &dyn Architecture,
    setup: StreamSetup<'_>,
) -> Result<StreamedWeights> {
    let model = GroupTensors::of(tensors, arch)?;
    let tier = HostTier::new(gpu, &model, setup.host)?;
    let h2d_gbps = measure_h2d(gpu, &tier)?;
    let cost = CostModel {
        h2d_gbps,
        ..ASSUMED_COMPUTE
    };
    let bytes: Vec<usize> = (0..arch.groups().len())
        .map(|g| tier.group_bytes(g))
        .collect();
    // What is allocated already beyond the cuBLAS workspace is not the plan's to use.
    let in_use = gpu.memory().in_use();
    let budget = gpu
        .memory()
        .budget()
        .saturating_sub(in_use.saturating_sub(CUBLAS_WORKSPACE));
    let mut request = plan_request(arch, &bytes, budget, setup.shape, &cost, tier.is_staged());
    let mut tier = tier;
    if let Some(w) = setup.workspace {
        request.workspace = w;
    }
    if let Some(ms) = setup.measured_ms {
        for (g, &m) in request.groups.iter_mut().zip(ms) {
            g.compute_ms = m;
        }
    }
    // Tensors held as ggml blocks stream as their blocks, whatever --compress says: the
    // host holds nothing else of them.
    let blocks = Compressed::blocks(&model.groups, true, SLOT_ALIGN, ASSUMED_DECODE);
    if !blocks.is_empty() && tier.is_staged() {
        return Err(Error::Device(format!(
            "a GGUF's quantized blocks stream only from host memory the driver page-locks, \
             and this run uses the {}; allow more locked memory (ulimit -l) and leave \
             --host-memory at auto or registered",
            tier.mode
        )));
    }
    let blocks = (!blocks.is_empty()).then(|| Arc::new(blocks));
    request.compressed = blocks.clone();
    let mut plan = crate::stream::plan(&request)?;
    let mut compressed = blocks.clone();
    let streams =
        |plan: &crate::stream::Plan, g: usize| matches!(plan.placement[g], Placement::Streamed(_));
    let wanted = match setup.compress {
        Compress::Off => false,
        Compress::On => true,
        Compress::Auto => !tier.is_staged(),
    };
    if wanted && !plan.pieces.is_empty() {
        // Exponent-code every group that may stream (all but those read from host memory),
        // not only those that stream uncoded at this budget: coded, the plan keeps other
        // groups resident, and it sizes the slots by the largest piece of any group that may
        // stream, an uncoded group's bf16 bytes otherwise (a third more than a coded block).
        // The codes of what stays resident are dropped once planned.
        let mut encoded = match &blocks {
            Some(b) => Compressed::clone(b),
            None => Compressed::blocks(&model.groups, true, SLOT_ALIGN, ASSUMED_DECODE),
        };
        let cache = match setup.encoding_cache {
            CacheMode::On => EncodingCache::for_files(tensors.files()),
            CacheMode::Off => None,
        };
        // The siblings' tensors, for the cache to write ahead (not placed by this load;
        // without a cache, nothing is written ahead).
        let wanted_ahead = match cache {
            Some(_) => setup.siblings,
            None => &[],
        };
        let siblings = wanted_ahead
            .iter()
            .map(|&a| Ok((a, GroupTensors::of(tensors, a)?)))
            .collect::<Result<Vec<_>>>()?;
        let sibling_codes: Vec<Compressed> = siblings
            .iter()
            .map(|(_, s)| Compressed::blocks(&s.groups, true, SLOT_ALIGN, ASSUMED_DECODE))
            .collect();
        let may_stream = |g: usize| !arch.groups()[g].host_gather;
        let jobs = encoded.exponent_jobs(&model.groups, &model.splits, may_stream, true);
        let encodings = match &cache {
            Some(cache) => {
                let mut ahead = Vec::new();
                for ((a, s), codes) in siblings.iter().zip(&sibling_codes) {
                    ahead.extend(codes.exponent_jobs(
                        &s.groups,
                        &s.splits,
                        |g| !a.groups()[g].host_gather,
                        true,
                    ));
                }
                let (encodings, used) = cache.encodings_ahead(&jobs, &ahead)?;
                for line in used.messages() {
                    eprintln!("{line}");
                }
                encodings
            }
            None => encode_jobs(&jobs)?,
        };
        encoded.put_exponents(&jobs, encodings);
        request.compressed = Some(Arc::new(encoded));
        let planned = crate::stream::plan(&request);
        match planned {
            // Auto keeps the faster of the two plans: where a pass is compute-bound, decoding
            // only adds to it; and where the decode buffer puts the budget below the minimum,
            // it streams as stored.
            Ok(p)
                if setup.compress == Compress::Auto
                    && p.prediction.pass_ms > plan.prediction.pass_ms => {}
            Err(_) if setup.compress == Compress::Auto => {}
            Err(e) => return Err(e),
            Ok(p) => {
                plan = p;
                compressed = request.compressed.take();
            }
        }
    }
    let Some(chosen) = compressed else {
        return StreamedWeights::new(gpu, &model, plan, tier, None, h2d_gbps);
    };
    let mut chosen = Arc::try_unwrap(chosen).unwrap_or_else(|shared| Compressed::clone(&shared));
    chosen.retain(|g| streams(&plan, g));
    match tier.register_compressed(&chosen) {
        Ok(()) => {}
        // The driver may page-lock the file and refuse more (a memlock limit): auto then
        // streams what it can as stored, planned for that.
        Err(_) if setup.compress == Compress::Auto && chosen.has_exponents() => {
            request.compressed = blocks;
            plan = crate::stream::plan(&request)?;
            let Some(blocks) = request.compressed.take() else {
                return StreamedWeights::new(gpu, &model, plan, tier, None, h2d_gbps);
            };
            chosen = Compressed::clone(&blocks);
            chosen.retain(|g| streams(&plan, g));
            tier.register_compressed(&chosen)?;
        }
        Err(e) => return Err(e),
    }
    let compressed = (!chosen.is_empty()).then(|| Arc::new(chosen));
    StreamedWeights::new(gpu, &model, plan, tier, compressed, h2d_gbps)
}
