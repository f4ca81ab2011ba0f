//! `ferry plan`: which groups stay resident, how many slots stream the rest, and how long a
//! pass will take, for a model, a VRAM budget and a pass shape. Needs no GPU: the card is
//! described by stated figures.

use clap::Args;

use ferry::checkpoint::DType;
use ferry::model::Checkpoint;
use ferry::model::{Llama, LlamaConfig, PassShape};
use ferry::runtime::{plan_request, synthetic_preset};
use ferry::stream::cost::group_bytes;
use ferry::stream::{human_bytes, parse_size, plan, CostModel, Placement, SlotSize, Vram};
use ferry::{Error, Result};

use super::at_least;

#[derive(Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["model", "synthetic"])))]
pub struct PlanArgs {
    /// A model directory, a .gguf file, or ORG/NAME from the Hugging Face cache.
    #[arg(long, short)]
    model: Option<String>,
    /// A synthetic preset instead of a checkpoint (see `ferry synth --list`); bf16.
    #[arg(long, value_name = "PRESET")]
    synthetic: Option<String>,
    /// VRAM budget: a size (6GiB, 2.5GB, 512MiB) or auto (free device memory minus 512 MiB).
    #[arg(long, value_name = "SIZE|auto", allow_negative_numbers = true)]
    vram: String,
    /// With --vram auto: the device's free memory (this command asks no GPU).
    #[arg(long, value_name = "SIZE", allow_negative_numbers = true)]
    free_vram: Option<String>,
    /// New tokens per sequence in the pass (the prompt length; 1 for decode).
    #[arg(long, value_parser = at_least(1), allow_negative_numbers = true)]
    tokens: usize,
    /// Sequences per pass.
    #[arg(long, default_value = "1", value_parser = at_least(1), allow_negative_numbers = true)]
    batch: usize,
    /// Positions already in each sequence's KV cache (decode after a prompt).
    #[arg(long, default_value = "0", value_parser = at_least(0), allow_negative_numbers = true)]
    past: usize,
    /// Host-to-device bandwidth, GB/s. Default: 25 (PCIe 4 x16).
    #[arg(long, allow_negative_numbers = true)]
    h2d_gbps: Option<f64>,
    /// Dense bf16 throughput, TFLOP/s. Default: 80.
    #[arg(long, allow_negative_numbers = true)]
    tflops: Option<f64>,
    /// Device memory bandwidth, GB/s. Default: 1000.
    #[arg(long, allow_negative_numbers = true)]
    hbm_gbps: Option<f64>,
    /// Slot size, if not the planner's choice (the typical block).
    #[arg(long, value_name = "SIZE", allow_negative_numbers = true)]
    slot_size: Option<String>,
}

pub fn plan_command(args: PlanArgs) -> Result<()> {
    // The model's shape is all a plan needs: a preset's config, or a checkpoint's.
    let (name, config) = match (&args.model, &args.synthetic) {
        (Some(model), _) => {
            let ckpt = Checkpoint::open(model)?;
            let name = format!("{} ({})", ckpt.path.display(), ckpt.config.arch.name());
            (name, ckpt.config.clone())
        }
        (None, Some(preset)) => {
            let p = synthetic_preset(preset)?;
            let name = format!("{} (synthetic {})", p.name, p.config.arch.name());
            (name, p.config)
        }
        (None, None) => unreachable!("clap requires --model or --synthetic"),
    };
    check_shape(&args, &config)?;
    let model = Llama::new(config);
    // Every weight streams as bf16, whatever the checkpoint stores (as on the GPU).
    let dtype = DType::BF16;
    let bytes = group_bytes(&model, dtype);

    let stated = |v: Option<f64>, flag: &'static str, default: f64| -> Result<f64> {
        match v {
            None => Ok(default),
            Some(x) if x.is_finite() && x > 0.0 => Ok(x),
            Some(x) => Err(Error::Flag {
                flag,
                message: format!("{x} is not a rate; expected a number > 0"),
            }),
        }
    };
    let d = CostModel::ASSUMED;
    let cost = CostModel {
        h2d_gbps: stated(args.h2d_gbps, "--h2d-gbps", d.h2d_gbps)?,
        tflops: stated(args.tflops, "--tflops", d.tflops)?,
        hbm_gbps: stated(args.hbm_gbps, "--hbm-gbps", d.hbm_gbps)?,
    };
    let free = args
        .free_vram
        .as_deref()
        .map(|s| parse_size(s, "--free-vram"))
        .transpose()?;
    let vram = Vram::parse(&args.vram)?;
    if free.is_some() && vram != Vram::Auto {
        return Err(Error::Flag {
            flag: "--free-vram",
            message: format!(
                "acts only with --vram auto (the budget is the free memory less a headroom); --vram {} is the budget itself",
                args.vram
            ),
        });
    }
    let budget = vram.resolve(free)?;
    let slot_size = match &args.slot_size {
        Some(s) => SlotSize::Bytes(parse_size(s, "--slot-size")?),
        None => SlotSize::Auto,
    };
    let shape = PassShape {
        tokens: args.tokens,
        batch: args.batch,
        past: args.past,
    };
    let mut request = plan_request(&model, &bytes, budget, shape, &cost, false);
    request.slot_size = slot_size;
    // Plan before printing, so that an error is all a failed run prints.
    let plan = plan(&request)?;
    let total: usize = bytes.iter().sum();
    println!(
        "model        {name}: {} groups, {} {dtype}",
        bytes.len(),
        if total >= 100_000_000 {
            format!("{:.2} GB", total as f64 / 1e9)
        } else {
            human_bytes(total)
        }
    );
    let figure = |v: Option<f64>| if v.is_some() { "stated" } else { "assumed" };
    println!(
        "card         host→device {} GB/s ({}), {} TFLOP/s ({}), device memory {} GB/s ({})",
        cost.h2d_gbps,
        figure(args.h2d_gbps),
        cost.tflops,
        figure(args.tflops),
        cost.hbm_gbps,
        figure(args.hbm_gbps),
    );
    let assumed: Vec<&str> = [
        (args.h2d_gbps, "--h2d-gbps"),
        (args.tflops, "--tflops"),
        (args.hbm_gbps, "--hbm-gbps"),
    ]
    .iter()
    .filter(|(v, _)| v.is_none())
    .map(|&(_, flag)| flag)
    .collect();
    if !assumed.is_empty() {
        println!(
            "             (assumed figures are a PCIe 4 x16 consumer card's; state yours with {})",
            assumed.join(", ")
        );
    }
    println!(
        "pass         {} tokens × batch {} after {} positions",
        args.tokens, args.batch, args.past
    );
    print!("{plan}");
    let map: String = plan
        .placement
        .iter()
        .map(|p| match p {
            Placement::HostGather => 'e',
            Placement::Resident => 'R',
            Placement::Streamed(r) if r.len() > 1 => 'p',
            Placement::Streamed(_) => 's',
        })
        .collect();
    println!("map          {map}  (e: in host memory, rows sent per pass, R: resident, s: streamed, p: streamed in pieces)");
    if plan.slots == 0 {
        println!(
            "             everything fits: {} of {} used",
            human_bytes(plan.device_bytes()),
            human_bytes(budget)
        );
    }
    Ok(())
}

fn check_shape(args: &PlanArgs, config: &LlamaConfig) -> Result<()> {
    // Checked: a huge --past or --tokens must not wrap around into "everything fits".
    let positions = args.past.checked_add(args.tokens);
    if positions.is_none_or(|p| p > config.max_position_embeddings) {
        return Err(Error::Flag {
            flag: "--tokens",
            message: format!(
                "--past {} + --tokens {} exceeds the model's max_position_embeddings {}",
                args.past, args.tokens, config.max_position_embeddings
            ),
        });
    }
    // Bytes per row stay far below 16 MiB: a count whose bytes would overflow is no pass.
    if positions
        .and_then(|p| p.checked_mul(args.batch))
        .and_then(|rows| rows.checked_mul(1 << 24))
        .is_none()
    {
        return Err(Error::Flag {
            flag: "--batch",
            message: format!(
                "{} sequences of {} positions is more than any device holds",
                args.batch,
                args.past.saturating_add(args.tokens)
            ),
        });
    }
    Ok(())
}
