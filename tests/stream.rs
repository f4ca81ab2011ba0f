//! The streaming engine without a GPU: the planner, the budget, the schedule on the CPU copy
//! engine, and `ferry plan`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::backend::cpu_stream::{CpuCopyEngine, EngineEvent, HostStorage};
use ferry::checkpoint::{DType, HostTensor, Storage};
use ferry::model::{Llama, PassShape};
use ferry::runtime::plan_request;
use ferry::stream::budget::{BudgetAllocator, HeapMemory, Purpose, Vram};
use ferry::stream::cost::{group_bytes, CostModel};
use ferry::stream::plan::{
    plan, simulate, Group, Placement, Plan, PlanRequest, SimUnit, SlotSize, DECODE_CONTENTION,
};
use ferry::stream::schedule::{run_pass, Step, Streamer};
use ferry::synth::Preset;

const MIB: usize = 1 << 20;

fn group(label: &str, bytes: usize, compute_ms: f64) -> Group {
    Group {
        label: label.into(),
        bytes,
        compute_ms,
        granule: 1024,
        host_gather: false,
    }
}

/// An embedding gathered on the host, `blocks` blocks of `block` bytes, and a head 2.5 times
/// larger than a block.
fn model(blocks: usize, block: usize, compute_ms: impl Fn(usize) -> f64) -> Vec<Group> {
    let mut groups = vec![Group {
        host_gather: true,
        ..group("embedding", 5 * block / 2, 0.0)
    }];
    for i in 0..blocks {
        groups.push(group(&format!("block {i}"), block, compute_ms(i)));
    }
    groups.push(group("head", 5 * block / 2, compute_ms(blocks)));
    groups
}

fn request(groups: Vec<Group>, budget: usize, h2d_gbps: f64) -> PlanRequest {
    PlanRequest {
        groups,
        budget,
        kv_cache: MIB,
        workspace: 2 * MIB,
        cublas_workspace: MIB,
        reserve: 0,
        h2d_gbps,
        slot_size: SlotSize::Auto,
        compressed: None,
    }
}

const FIXED: usize = 4 * MIB; // kv + workspace + cublas of `request`

#[test]
fn residents_are_spread_evenly_and_the_head_streams_in_pieces() {
    let block = 100 * MIB;
    // Room for 4 slots' worth beyond the fixed part: 2 slots + 2 residents (or 3 + 1...).
    let p = plan(&request(model(20, block, |_| 1.0), FIXED + 6 * block, 10.0)).unwrap();
    assert_eq!(
        p.slot_bytes, block,
        "the typical block sets the slot size, not the head"
    );
    assert!(p.device_bytes() <= p.budget);
    assert_eq!(p.placement[0], Placement::HostGather);
    assert!(!p.resident.contains(0));
    // Copy-bound: the plan keeps as many bytes resident as fit beside 2 slots.
    assert_eq!(p.slots, 2);
    assert_eq!(p.resident.len(), 4);
    let blocks: Vec<usize> = p.resident.groups().to_vec();
    let gaps: Vec<usize> = blocks.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().max().unwrap() - gaps.iter().min().unwrap() <= 1,
        "evenly spread: {blocks:?}"
    );
    // The head (2.5 blocks) streams in 3 pieces that tile it on its granule.
    let head = p.groups.len() - 1;
    let Placement::Streamed(range) = &p.placement[head] else {
        panic!("head should stream: {:?}", p.placement[head]);
    };
    let pieces = &p.pieces[range.clone()];
    assert_eq!(pieces.len(), 3);
    let mut offset = 0;
    for piece in pieces {
        assert_eq!(piece.offset, offset);
        assert!(piece.bytes <= p.slot_bytes);
        assert_eq!(piece.offset % 1024, 0);
        offset += piece.bytes;
    }
    assert_eq!(offset, p.groups[head].bytes);
    let compute: f64 = pieces.iter().map(|x| x.compute_ms).sum();
    assert!(
        (compute - 1.0).abs() < 1e-9,
        "pieces share the head's compute"
    );
    // Streamed bytes: 16 blocks + the head.
    assert_eq!(p.streamed_bytes(), 16 * block + 5 * block / 2);
}

#[test]
fn small_groups_take_the_room_left_beside_the_spread_blocks() {
    // A DiT's shape: small embedders, 12 blocks, a small final layer. Beside 2 slots there is
    // room for 2 blocks and 0.4 of a block: the embedders (0.05) and the final layer (0.01)
    // fit what the two spread blocks leave, so neither holds a slot every pass.
    let block = 100 * MIB;
    let mut groups = vec![group("embedders", 5 * MIB, 1.0)];
    groups.extend((0..12).map(|i| group(&format!("block {i}"), block, 1.0)));
    groups.push(group("final layer", MIB, 0.2));
    let budget = FIXED + 2 * block + 24 * block / 10;
    let p = plan(&request(groups, budget, 10.0)).unwrap();
    assert!(p.device_bytes() <= p.budget);
    let last = p.groups.len() - 1;
    assert!(p.resident.contains(0), "embedders: {:?}", p.resident);
    assert!(p.resident.contains(last), "final layer: {:?}", p.resident);
    let blocks = p.resident.groups().iter().filter(|&&g| g != 0 && g != last);
    assert_eq!(blocks.count(), 2, "{:?}", p.resident);
    assert_eq!(p.streamed_bytes(), 10 * block);
}

#[test]
fn a_resident_head_when_it_fits_saves_the_most_bytes() {
    let block = 100 * MIB;
    // Beside 2 slots there is room for 2.6 blocks: the head (2.5 blocks) saves more bytes
    // than 2 blocks.
    let budget = FIXED + 2 * block + 26 * block / 10;
    let p = plan(&request(model(20, block, |_| 1.0), budget, 10.0)).unwrap();
    let head = p.groups.len() - 1;
    assert!(p.resident.contains(head), "{:?}", p.resident);
    assert_eq!(p.streamed_bytes(), 20 * block);
}

#[test]
fn budgets_below_the_minimum_are_refused_with_the_minimum() {
    let block = 100 * MIB;
    let minimum = FIXED + 2 * block;
    let e = plan(&request(model(8, block, |_| 1.0), minimum - 1, 10.0))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("--vram: "), "{e}");
    assert!(e.contains("below the minimum of 204.0 MiB"), "{e}");
    assert!(e.contains("2 slots × 100.0 MiB"), "{e}");
    let p = plan(&request(model(8, block, |_| 1.0), minimum, 10.0)).unwrap();
    assert_eq!((p.slots, p.resident.len()), (2, 0));
    assert_eq!(p.device_bytes(), minimum);
}

#[test]
fn more_budget_never_streams_more_or_predicts_slower() {
    let block = 50 * MIB;
    let groups = model(12, block, |i| 2.0 + (i % 3) as f64);
    let mut last: Option<Plan> = None;
    for extra in 2..=20 {
        let budget = FIXED + extra * block;
        let p = plan(&request(groups.clone(), budget, 10.0)).unwrap();
        assert!(
            p.device_bytes() <= budget,
            "{extra}: {} > {budget}",
            p.device_bytes()
        );
        let bound = p.prediction.bound_ms();
        assert!(
            p.prediction.pass_ms >= bound - 1e-6,
            "faster than the bound"
        );
        assert!(p.prediction.cold_pass_ms >= p.prediction.pass_ms - 1e-6);
        if let Some(prev) = &last {
            assert!(p.streamed_bytes() <= prev.streamed_bytes(), "{extra}");
            assert!(
                p.prediction.pass_ms <= prev.prediction.pass_ms * 1.001,
                "{extra}"
            );
        }
        last = Some(p);
    }
    // At 20 blocks of room everything fits: no slots, nothing streamed, the pass is compute.
    let p = last.unwrap();
    assert_eq!((p.slots, p.streamed_bytes()), (0, 0));
    let compute: f64 = groups.iter().map(|g| g.compute_ms).sum();
    assert!((p.prediction.pass_ms - compute).abs() < 1e-9);
}

#[test]
fn the_prediction_reaches_the_bound_when_copy_or_compute_dominates() {
    let block = 64 * MIB;
    let copy_ms = block as f64 / 10e6; // at 10 GB/s
    for (compute, bound_is_copy) in [(copy_ms * 0.3, true), (copy_ms * 3.0, false)] {
        let p = plan(&request(
            model(24, block, |_| compute),
            FIXED + 6 * block,
            10.0,
        ))
        .unwrap();
        let pred = p.prediction;
        assert_eq!(pred.copy_ms > pred.compute_ms, bound_is_copy);
        assert!(pred.efficiency() > 0.97, "{pred:?}");
    }
}

#[test]
fn the_simulation_plays_the_cyclic_schedule() {
    // Two streamed units (copy 10 ms, compute 5 ms) and a resident one (compute 20 ms), 2
    // slots. Cold: copy 0 ends at 10 (stall 10), compute 0 at 15; copy 1 ends at 20 (stall
    // 5), compute 1 at 25; the resident computes to 45 while the copies of the next pass
    // fill both slots (to 35). Then each pass takes 5 + 5 + 20 = 30 ms, no stall: the copies
    // hide behind the resident's compute.
    let units = [
        unit(5.0, Some(10.0), 0.0),
        unit(5.0, Some(10.0), 0.0),
        unit(20.0, None, 0.0),
    ];
    let ends = simulate(&units, 2, 0, 3);
    assert_eq!(ends[0], (45.0, 15.0));
    assert_eq!(ends[1], (75.0, 0.0));
    assert_eq!(ends[2].0 - ends[1].0, 30.0);
    // With one slot the copy of unit 1 waits for the compute of unit 0: 10 + 5 + 10 + 5 + 20.
    assert_eq!(simulate(&units, 1, 0, 1)[0].0, 50.0);
}

fn unit(compute_ms: f64, copy_ms: Option<f64>, decode_ms: f64) -> SimUnit {
    SimUnit {
        compute_ms,
        copy_ms,
        decode_ms,
        decoded_whole: decode_ms > 0.0,
    }
}

#[test]
fn decoding_overlaps_the_compute_before_with_two_decode_buffers() {
    // Four streamed units, each copied in 4 ms, decoded in 3 and computed in 5, 4 slots (the
    // copies never wait for a slot). One decode buffer: a unit decodes once the one before
    // has computed, so a pass costs 4 × (3 + 5) = 32 ms in steady state. Two: unit j decodes
    // while unit j - 1 computes, and the pass is compute-bound, 4 × 5 = 20 ms.
    let units = [unit(5.0, Some(4.0), 3.0); 4];
    let steady = |buffers| {
        let ends = simulate(&units, 4, buffers, 6);
        ends[5].0 - ends[4].0
    };
    assert_eq!(steady(1), 32.0);
    assert_eq!(steady(2), 20.0);
    // Cold, with two buffers: copy 0 ends at 4, its decoding at 7 (stall 7); unit 1 is
    // copied by 8, decoded by 11 while unit 0 computes to 12; then 5 ms a unit: 27.
    assert_eq!(simulate(&units, 4, 2, 1)[0], (27.0, 7.0));
    // A unit decoded whole frees its slot when its decoding ends. With 2 slots and two
    // buffers, copy 2 starts at 8 (unit 0 decoded at 7) and the cold pass still ends at 27;
    // were the slots freed by compute, copy 2 would wait for unit 0's compute (12), copy 3
    // for unit 1's (17), and unit 3 would decode 21–24 and compute 24–29.
    assert_eq!(simulate(&units, 2, 2, 1)[0].0, 27.0);
    let mut late = units;
    for u in &mut late {
        u.decoded_whole = false;
    }
    assert_eq!(simulate(&late, 2, 2, 1)[0].0, 29.0);
}

#[test]
fn qwen_7b_on_an_h100_at_2_6_gib() {
    let preset = Preset::by_name("qwen2.5-7b").unwrap();
    let model = Llama::new(preset.config.clone());
    let bytes = group_bytes(&model, DType::BF16);
    assert_eq!(bytes.iter().sum::<usize>(), 15_231_233_024);
    let cost = CostModel {
        h2d_gbps: 55.0,
        tflops: 850.0,
        hbm_gbps: 3000.0,
    };
    let shape = PassShape {
        tokens: 4096,
        batch: 1,
        past: 0,
    };
    let budget = Vram::parse("2.6GiB").unwrap().resolve(None).unwrap();
    let request = PlanRequest {
        reserve: 0,
        ..plan_request(&model, &bytes, budget, shape, &cost, false)
    };
    let p = plan(&request).unwrap();
    assert!(p.device_bytes() <= budget);
    // Nothing resident would be 15.23 GB / 55 GB/s = 277 ms; the plan streams less.
    assert!(p.prediction.pass_ms < 277.0, "{}", p.prediction.pass_ms);
    assert!(p.prediction.efficiency() > 0.99);
}

#[test]
fn the_budget_is_a_hard_cap() {
    let alloc = BudgetAllocator::new(HeapMemory, 10 * MIB);
    let a = alloc.alloc(Purpose::KvCache, 4 * MIB).unwrap();
    let b = alloc.alloc(Purpose::Slot(0), 4 * MIB).unwrap();
    assert_eq!(a.len(), 4 * MIB);
    let e = alloc
        .alloc(Purpose::Resident("block 3".into()), 3 * MIB)
        .err()
        .expect("over the budget")
        .to_string();
    assert_eq!(
        e,
        "--vram: cannot allocate 3.0 MiB (3145728 bytes) for resident block 3: 8.0 MiB of the 10.0 MiB budget are in use, 2.0 MiB free"
    );
    assert_eq!(
        alloc.in_use(),
        8 * MIB,
        "a refused allocation takes nothing"
    );
    drop(b);
    let c = alloc
        .alloc(Purpose::Resident("block 3".into()), 6 * MIB)
        .unwrap();
    assert_eq!(alloc.in_use(), 10 * MIB);
    assert_eq!(alloc.peak(), 10 * MIB);
    assert_eq!(
        alloc.breakdown(),
        vec![
            (Purpose::Resident("block 3".into()), 6 * MIB),
            (Purpose::KvCache, 4 * MIB)
        ]
    );
    drop((a, c));
    assert_eq!((alloc.in_use(), alloc.peak()), (0, 10 * MIB));
}

#[test]
fn vram_flag() {
    assert_eq!(Vram::parse("6GiB").unwrap(), Vram::Bytes(6 << 30));
    assert_eq!(Vram::parse("2.5GB").unwrap(), Vram::Bytes(2_500_000_000));
    assert_eq!(Vram::parse("512MiB").unwrap(), Vram::Bytes(512 << 20));
    assert_eq!(Vram::parse("auto").unwrap(), Vram::Auto);
    assert_eq!(
        Vram::Auto.resolve(Some(8 << 30)).unwrap(),
        (8 << 30) - (512 << 20)
    );
    assert!(Vram::Auto
        .resolve(None)
        .unwrap_err()
        .to_string()
        .contains("auto needs a GPU"));
    assert!(Vram::parse("6")
        .unwrap_err()
        .to_string()
        .starts_with("--vram:"));
}

/// FNV-1a, continued over pieces in order.
fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01B3);
    }
    h
}
const FNV0: u64 = 0xCBF2_9CE4_8422_2325;

fn sleep_until(deadline: Instant) {
    let now = Instant::now();
    if deadline > now {
        std::thread::sleep(deadline - now);
    }
}

#[test]
fn the_streamer_on_the_cpu_engine() {
    // 10 blocks of 256 KiB and a head of 640 KiB at 0.025 GB/s: a block copies in 10.5 ms.
    // Compute alternates 4, 8 and 16 ms: some blocks hide their copies, some do not.
    let block = 256 * 1024;
    let groups = model(10, block, |i| [4.0, 8.0, 16.0][i % 3]);
    let h2d_gbps = 0.025;
    let p = plan(&request(groups, FIXED + 5 * block, h2d_gbps)).unwrap();
    assert!(
        p.slots >= 2 && !p.resident.is_empty() && p.pieces.len() > 8,
        "{p}"
    );

    // Host bytes of every group (one bf16 tensor of 1024-byte rows each), and what a fully
    // resident run computes: one checksum per group.
    let host: Vec<Vec<u8>> = p
        .groups
        .iter()
        .enumerate()
        .map(|(g, grp)| {
            (0..grp.bytes)
                .map(|i| (i * 31 + g * 7 + i / 251) as u8)
                .collect()
        })
        .collect();
    let expected: Vec<u64> = host.iter().map(|b| fnv(FNV0, b)).collect();
    let tensors: Vec<Vec<HostTensor>> = host
        .iter()
        .enumerate()
        .map(|(g, bytes)| {
            let mut storage = Storage::owned(bytes.len());
            storage.bytes_mut().unwrap().copy_from_slice(bytes);
            let shape = vec![bytes.len() / 1024, 512];
            let t = HostTensor::new(
                format!("g{g}"),
                DType::BF16,
                shape,
                Arc::new(storage),
                0,
                bytes.len(),
            );
            vec![t]
        })
        .collect();

    // Every device allocation through the budget.
    let alloc = BudgetAllocator::new(HostStorage, p.budget);
    let _kv = alloc.alloc(Purpose::KvCache, p.kv_cache).unwrap();
    let _ws = alloc.alloc(Purpose::Workspace, p.workspace).unwrap();
    let _cublas = alloc
        .alloc(Purpose::CublasWorkspace, p.cublas_workspace)
        .unwrap();
    let mut resident = Vec::new();
    for &g in p.resident.groups() {
        let mut a = alloc
            .alloc(
                Purpose::Resident(p.groups[g].label.clone()),
                p.groups[g].bytes,
            )
            .unwrap();
        Arc::get_mut(&mut a)
            .and_then(Storage::bytes_mut)
            .unwrap()
            .copy_from_slice(&host[g]);
        resident.push((g, a));
    }
    let engine = CpuCopyEngine::new(&alloc, &p, tensors, None, Some(h2d_gbps)).unwrap();
    let mut streamer = Streamer::new(engine, &p).unwrap();

    let passes = 4;
    let mut pass_ms = Vec::new();
    for pass in 0..passes {
        let start = Instant::now();
        let mut sums = vec![FNV0; p.groups.len()];
        run_pass(&p, &mut streamer, |step, engine| {
            let begin = Instant::now();
            let ms = match step {
                Step::Group(g) => {
                    sums[g] = match resident.iter().find(|(r, _)| *r == g) {
                        Some((_, a)) => fnv(FNV0, Storage::bytes(a)),
                        None => fnv(FNV0, &host[g]), // gathered on the host
                    };
                    p.groups[g].compute_ms
                }
                Step::Piece(acquired) => {
                    let piece = &p.pieces[acquired.piece];
                    let read = || {
                        fnv(
                            FNV0,
                            &Storage::bytes(&engine.slot(acquired.slot))[..piece.bytes],
                        )
                    };
                    let before = read();
                    sums[piece.group] = fnv(
                        sums[piece.group],
                        &Storage::bytes(&engine.slot(acquired.slot))[..piece.bytes],
                    );
                    sleep_until(begin + Duration::from_secs_f64(piece.compute_ms / 1e3));
                    assert_eq!(
                        read(),
                        before,
                        "slot {} changed while in use",
                        acquired.slot
                    );
                    piece.compute_ms
                }
            };
            sleep_until(begin + Duration::from_secs_f64(ms / 1e3));
            Ok(())
        })
        .unwrap();
        pass_ms.push(start.elapsed().as_secs_f64() * 1e3);
        assert_eq!(
            sums, expected,
            "pass {pass}: checksums equal a fully resident run's"
        );
    }
    let engine = streamer.finish().unwrap();
    assert!(alloc.peak() <= p.budget, "{} > {}", alloc.peak(), p.budget);
    assert_eq!(alloc.peak(), p.device_bytes());

    let log = engine.log();
    assert_slots_used_in_order(&log, p.slots);
    // Copies follow the pass order, wrapping into the next pass.
    let copies: Vec<(usize, usize)> = log
        .iter()
        .filter_map(|(_, e)| match *e {
            EngineEvent::CopyBegin { group, index, .. } => Some((group, index)),
            _ => None,
        })
        .collect();
    assert_eq!(copies.len(), passes * p.pieces.len() + p.slots);
    for (i, c) in copies.iter().enumerate() {
        let want = &p.pieces[i % p.pieces.len()];
        assert_eq!(*c, (want.group, want.index), "copy {i}");
    }
    // How the simulation's prediction compares with the wall clock is for benchmarks (it
    // depends on the machine's load), so it is printed, not asserted.
    let steady = pass_ms[1..].iter().sum::<f64>() / (passes - 1) as f64;
    eprintln!(
        "{p}measured {pass_ms:?} ms per pass; steady {steady:.1} ms, predicted {:.1} ms",
        p.prediction.pass_ms
    );
    assert!(engine.stall() > Duration::ZERO);
}

fn ferry(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn ferry_plan_prints_the_plan() {
    let out = ferry(&[
        "plan",
        "--synthetic",
        "qwen2.5-7b",
        "--vram",
        "2.6GiB",
        "--tokens",
        "4096",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "qwen2.5-7b (synthetic qwen2): 30 groups, 15.23 GB bf16",
        "host→device 25 GB/s (assumed), 80 TFLOP/s (assumed)",
        "budget       2.60 GiB = resident",
        "4 slots × 444.5 MiB",
        "resident     0 of 30 groups",
        "embedding: stays in host memory, only the pass's rows go to the device",
        "14.14 GB per pass",
        "PCIe bound 565.6 ms (14.14 GB at 25 GB/s)",
        "map          essssssssssssssssssssssssssssp",
    ] {
        assert!(stdout.contains(needle), "{needle:?} not in\n{stdout}");
    }

    // Decode with a batch: residents spread through the blocks, the head in pieces.
    let out = ferry(&[
        "plan",
        "--synthetic",
        "qwen2.5-7b",
        "--vram",
        "auto",
        "--free-vram",
        "8.5GiB",
        "--tokens",
        "1",
        "--batch",
        "64",
        "--past",
        "1024",
        "--h2d-gbps",
        "55",
        "--tflops",
        "850",
        "--hbm-gbps",
        "3000",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("55 GB/s (stated), 850 TFLOP/s (stated)"),
        "{stdout}"
    );
    assert!(stdout.contains("budget       8.00 GiB"), "{stdout}");
    // Copy-bound: the head (1.09 GB, no compute to hide its copy behind) stays resident.
    assert!(
        stdout.contains("resident     6 of 30 groups") && stdout.contains(", head\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("map          essRsssssRsssssRssssRsssssRssR"),
        "{stdout}"
    );

    // A long prompt in a small budget: the head streams in pieces no larger than a slot.
    let out = ferry(&[
        "plan",
        "--synthetic",
        "qwen2.5-7b",
        "--vram",
        "2.6GiB",
        "--tokens",
        "16384",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("head (1.09 GB) streams in 3 pieces of ≤ 444.5 MiB"),
        "{stdout}"
    );
    assert!(stdout.contains("KV cache 896.0 MiB"), "{stdout}");

    // A checkpoint on disk: everything fits in 1 GiB.
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/qwen2");
    let out = ferry(&[
        "plan", "--model", fixture, "--vram", "1GiB", "--tokens", "8",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("no slots") && stdout.contains("everything fits"),
        "{stdout}"
    );
}

#[test]
fn ferry_plan_refuses_bad_budgets_in_one_line() {
    for (args, needle) in [
        (
            vec!["--vram", "1GiB", "--tokens", "4096"],
            "error: --vram: 1.00 GiB is below the minimum of 1.62 GiB for this model and pass: 2 slots × 444.5 MiB + KV cache 224.0 MiB",
        ),
        (vec!["--vram", "auto", "--tokens", "1"], "error: --vram: auto needs a GPU"),
        (vec!["--vram", "lots", "--tokens", "1"], "error: --vram: \"lots\" is not a size"),
        (vec!["--vram", "6GiB", "--tokens", "0"], "error: --tokens: expected a whole number ≥ 1"),
        (
            vec!["--vram", "6GiB", "--tokens", "1", "--past", "18446744073709551615"],
            "error: --tokens: --past 18446744073709551615 + --tokens 1 exceeds",
        ),
        (
            vec!["--vram", "6GiB", "--tokens", "1", "--batch", "18446744073709551615"],
            "error: --batch: 18446744073709551615 sequences",
        ),
        (
            vec!["--vram", "6GiB", "--tokens", "1", "--h2d-gbps", "0"],
            "error: --h2d-gbps",
        ),
    ] {
        let mut all = vec!["plan", "--synthetic", "qwen2.5-7b"];
        all.extend(args);
        let out = ferry(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{all:?}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(stderr.starts_with(needle), "{all:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(out.stdout.is_empty(), "{all:?} printed a partial plan");
    }
    let out = ferry(&[
        "plan",
        "--synthetic",
        "gpt-5",
        "--vram",
        "6GiB",
        "--tokens",
        "1",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("unknown preset \"gpt-5\"; expected one of tiny"));
}

/// Per slot, strictly: copied, then used, then copied again — never written while in use,
/// never used before its copy ended, never a copy over a view still alive. The last copy
/// into a slot may be the unused prefetch of the next pass.
fn assert_slots_used_in_order(log: &[(Instant, EngineEvent)], slots: usize) {
    for slot in 0..slots {
        let events: Vec<EngineEvent> = log
            .iter()
            .map(|(_, e)| *e)
            .filter(|e| e.slot() == slot)
            .collect();
        for (i, e) in events.iter().enumerate() {
            let ok = match i % 4 {
                0 => matches!(e, EngineEvent::CopyBegin { .. }),
                1 => matches!(e, EngineEvent::CopyEnd { .. }),
                2 => matches!(e, EngineEvent::UseBegin { .. }),
                _ => matches!(e, EngineEvent::UseEnd { .. }),
            };
            assert!(
                ok,
                "slot {slot}, event {i}: {e:?} out of order in {events:?}"
            );
        }
        assert_eq!(
            events.len() % 4,
            2,
            "slot {slot} ends with its prefetch copied"
        );
    }
}

/// The model's passes through the streamed weights that ship on the GPU, here over the CPU
/// copy engine: a prompt pass (every position's logits) and greedy decode steps; the logits
/// of each pass, as bits.
#[test]
fn streamed_on_the_cpu_equals_resident_bit_for_bit() {
    use ferry::backend::cpu::Cpu;
    use ferry::backend::cpu_stream::cpu_streamed_weights;
    use ferry::backend::Backend;
    use ferry::model::Checkpoint;
    use ferry::model::{Architecture, ResidentWeights};

    // The fixtures (f32), and a bf16 Llama whose head is large enough to stream in pieces.
    let mut cases: Vec<(String, Checkpoint)> = common::ARCHS
        .iter()
        .map(|a| {
            let dir = common::fixture(a);
            let ckpt = Checkpoint::open(dir.to_str().unwrap()).unwrap();
            (a.to_string(), ckpt)
        })
        .collect();
    let mut wide = Preset::by_name("tiny").unwrap();
    wide.config.vocab_size = 4096;
    cases.push((
        "tiny, vocab 4096 (bf16)".into(),
        ferry::synth::synthetic_checkpoint(&wide, 7, DType::BF16).unwrap(),
    ));

    let mut split_heads = 0;
    for (name, ckpt) in &cases {
        let model = Llama::new(ckpt.config.clone());
        let tensors = ferry::stream::GroupTensors::of(ckpt, &model).unwrap();
        let vocab = ckpt.config.vocab_size as u32;
        let prompt: Vec<u32> = (0..9).map(|i| (i * 37 + 5) % vocab).collect();
        let steps = 3;
        let mut resident = ResidentWeights::load(ckpt, model.groups(), |t| Cpu.weight(t)).unwrap();
        let want = common::passes_of(&model, &mut resident, &prompt, steps);

        let bytes: Vec<usize> = model.groups().iter().map(|g| g.bytes(ckpt)).collect();
        let total: usize = bytes.iter().sum();
        let shape = PassShape {
            tokens: prompt.len(),
            batch: 1,
            past: 0,
        };
        let cost = model.pass_cost(shape);
        let fixed = cost.cache + cost.workspace;
        let request = |budget| common::cpu_request(&model, ckpt, shape, budget);
        let least = common::least_budget(&request(fixed)).budget;
        let mut streamed_plans = 0;
        // From the least that plans to all resident; without and with a copy speed (so that
        // the compute side waits, and copies queue behind releases).
        for (share, h2d_gbps) in [
            (0.0, None),
            (0.25, Some(0.5)),
            (0.5, None),
            (0.75, Some(0.5)),
            (1.0, None),
        ] {
            let budget = least + (share * (fixed + total - least) as f64) as usize;
            let p = plan(&request(budget))
                .unwrap_or_else(|e| panic!("{name}: {budget} bytes do not plan: {e}"));
            let streams = !p.pieces.is_empty();
            streamed_plans += streams as usize;
            let head = model.groups().len() - 1;
            split_heads +=
                matches!(&p.placement[head], Placement::Streamed(r) if r.len() > 1) as usize;

            let alloc = BudgetAllocator::new(HostStorage, p.budget);
            let _kv = alloc.alloc(Purpose::KvCache, p.kv_cache).unwrap();
            let _ws = alloc.alloc(Purpose::Workspace, p.workspace).unwrap();
            let slots = p.slots;
            let pieces = p.pieces.clone();
            let (mut weights, _residents) =
                cpu_streamed_weights(&tensors, p, &alloc, None, h2d_gbps).unwrap();
            // Two sequences, one after the other, through the same weights: passes wrap.
            for run in 0..2 {
                let got = common::passes_of(&model, &mut weights, &prompt, steps);
                assert!(
                    got == want,
                    "{name}, {share} of the weights, run {run}: streamed logits differ from resident"
                );
            }
            assert!(alloc.peak() <= alloc.budget(), "{name}: over the budget");
            // The last prefetch may still be copying.
            ferry::stream::CopyEngine::synchronize(weights.engine_mut()).unwrap();
            let log = weights.engine().log();
            assert_slots_used_in_order(&log, slots);
            // Copies follow the pass order, wrapping into the next pass.
            let copies: Vec<(usize, usize)> = log
                .iter()
                .filter_map(|(_, e)| match *e {
                    EngineEvent::CopyBegin { group, index, .. } => Some((group, index)),
                    _ => None,
                })
                .collect();
            let passes = 2 * (1 + steps);
            if streams {
                assert_eq!(copies.len(), passes * pieces.len() + slots, "{name}");
            }
            for (i, c) in copies.iter().enumerate() {
                let want = &pieces[i % pieces.len()];
                assert_eq!(*c, (want.group, want.index), "{name}: copy {i}");
            }
        }
        assert!(
            streamed_plans >= 3,
            "{name}: only {streamed_plans} budgets streamed"
        );
    }
    assert!(split_heads > 0, "some plan streams the head in pieces");
}

#[test]
fn compressed_streaming_on_the_cpu_equals_resident_bit_for_bit() {
    use ferry::backend::cpu::Cpu;
    use ferry::backend::cpu_stream::{cpu_streamed_weights, SLOT_ALIGN};
    use ferry::backend::Backend;
    use ferry::model::{Architecture, ResidentWeights};
    use ferry::stream::compress::Compressed;

    // bf16 weights large enough to compress: hidden 256, 8 blocks, vocab 8192 (the head
    // compresses in rows, so that it can stream in pieces).
    let mut p = Preset::by_name("tiny").unwrap();
    p.config.hidden_size = 256;
    p.config.intermediate_size = 768;
    p.config.num_layers = 8;
    p.config.head_dim = 64;
    p.config.vocab_size = 8192;
    let ckpt = ferry::synth::synthetic_checkpoint(&p, 3, DType::BF16).unwrap();
    let model = Llama::new(ckpt.config.clone());
    let tensors = ferry::stream::GroupTensors::of(&ckpt, &model).unwrap();
    let prompt: Vec<u32> = (0..7).map(|i| (i * 131 + 3) % 8192).collect();
    let steps = 2;
    let mut resident = ResidentWeights::load(&ckpt, model.groups(), |t| Cpu.weight(t)).unwrap();
    let want = common::passes_of(&model, &mut resident, &prompt, steps);

    let host_gather: Vec<bool> = model.groups().iter().map(|g| g.host_gather).collect();
    let encoded = Compressed::encode(
        &tensors.groups,
        &tensors.splits,
        |g| !host_gather[g],
        false,
        SLOT_ALIGN,
        ferry::runtime::ASSUMED_DECODE,
    )
    .unwrap();
    let (enc, raw) = encoded.sizes();
    assert!(
        (enc as f64) < 0.8 * raw as f64,
        "{enc} encoded of {raw} bf16 bytes"
    );
    let encoded = Arc::new(encoded);
    let shape = PassShape {
        tokens: prompt.len(),
        batch: 1,
        past: 0,
    };
    let request = |budget| PlanRequest {
        compressed: Some(encoded.clone()),
        ..common::cpu_request(&model, &ckpt, shape, budget)
    };
    let cost = model.pass_cost(shape);
    let least = common::least_budget(&request(cost.cache + cost.workspace)).budget;
    let total: usize = model.groups().iter().map(|g| g.bytes(&ckpt)).sum();
    let mut split_pieces = 0;
    for (share, h2d_gbps) in [(0.0, None), (0.3, Some(0.5)), (0.6, None)] {
        let budget = least + (share * total as f64) as usize;
        let p = plan(&request(budget)).unwrap();
        assert!(p.compressed(), "{budget} bytes: nothing streams compressed");
        assert!(
            (p.streamed_bytes() as f64) < 0.85 * p.streamed_bf16_bytes() as f64,
            "{budget} bytes: {} cross the link for {} of bf16",
            p.streamed_bytes(),
            p.streamed_bf16_bytes()
        );
        assert!(p.device_bytes() <= budget);
        split_pieces += p.pieces.iter().filter(|q| q.index > 0).count();
        let alloc = BudgetAllocator::new(HostStorage, p.budget);
        let _kv = alloc.alloc(Purpose::KvCache, p.kv_cache).unwrap();
        let _ws = alloc.alloc(Purpose::Workspace, p.workspace).unwrap();
        let (mut weights, _residents) =
            cpu_streamed_weights(&tensors, p, &alloc, Some(encoded.clone()), h2d_gbps).unwrap();
        for run in 0..2 {
            let got = common::passes_of(&model, &mut weights, &prompt, steps);
            assert!(
                got == want,
                "{budget} bytes, run {run}: compressed streaming changed the logits"
            );
        }
        assert!(alloc.peak() <= alloc.budget(), "over the budget");
    }
    assert!(split_pieces > 0, "no plan streamed a group in pieces");

    // Decoding as slow as the compute: one decode buffer serializes the two, a second lets a
    // piece decode while the one before computes, and the planner takes it where it fits.
    let mut slow = (*encoded).clone();
    slow.speeds = ferry::stream::compress::DecodeSpeeds {
        exponents_gbps: 1.0,
        blocks_gbps: 1.0,
    };
    let slow = Arc::new(slow);
    let request = |budget| {
        let mut r = PlanRequest {
            compressed: Some(slow.clone()),
            h2d_gbps: 1e4,
            ..common::cpu_request(&model, &ckpt, shape, budget)
        };
        for g in &mut r.groups {
            // About a block's decoding at 1 GB/s.
            g.compute_ms = g.bytes as f64 / 1e6;
        }
        r
    };
    let least = plan(&request(least)).unwrap();
    assert_eq!(least.decode_buffers, 1, "at the least budget only one fits");
    let roomy = least.budget + total / 2;
    let p = plan(&request(roomy)).unwrap();
    assert_eq!(p.decode_buffers, 2, "{p}");
    assert!(p.device_bytes() <= roomy);
    assert!(p.to_string().contains("2 decode buffers ×"), "{p}");
    // With one buffer a piece waits for its decoding and the decoding's work slows the
    // compute too (DECODE_CONTENTION); on its own lane into two only the work is left.
    let (compute, decode) = (p.prediction.compute_ms, p.prediction.decode_ms);
    let serial = compute + (1.0 + DECODE_CONTENTION) * decode;
    assert!(
        p.prediction.pass_ms < 0.8 * serial
            && p.prediction.pass_ms >= compute + DECODE_CONTENTION * decode - 1e-6,
        "predicted {} ms with decoding overlapped, {serial} ms serial",
        p.prediction.pass_ms
    );
}
