//! `ferry serve`: an OpenAI-compatible server; every pass over the weights serves every
//! request in the running batch (see ferry::serve). Beside the text model (or instead of
//! it), a Z-Image pipeline answers image requests on a thread of its own.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{ArgGroup, Args};

use ferry::backend::cuda::streaming::PassStats;
use ferry::backend::{Backend, Device};
use ferry::diffuse::pipeline::{Compute, VaeDevice};
use ferry::generate::{context_length, Generator, TextCodec};
use ferry::model::llama::Llama;
use ferry::model::PassShape;
use ferry::runtime::{open_device, StreamOptions};
use ferry::serve::engine::{self, EngineConfig, Metrics};
use ferry::serve::images::{self, ImageJob};
use ferry::serve::{ImageModel, ServerConfig, TextModel};
use ferry::stream::{human_bytes, Vram};
use ferry::{Error, Result};

use super::generation::{
    open_compute, open_model, with_generator, ComputeArgs, GeneratorTask, PlannedPass,
};
use super::image::{open_pipeline, ImageSource};
use super::{at_least, between};

#[derive(Args)]
#[command(group(ArgGroup::new("models").required(true).multiple(true).args(["model", "image_model", "image_dit"])))]
pub struct ServeArgs {
    /// The text model: a model directory, a .gguf file, or ORG/NAME from the Hugging Face
    /// cache ($HF_HOME/hub, default ~/.cache/huggingface/hub). Nothing is downloaded. May be
    /// left out when --image-model (or --image-dit) is given.
    #[arg(long, short)]
    pub model: Option<String>,
    #[command(flatten)]
    image: ImageModelArgs,
    /// Address to listen on (127.0.0.1: this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free one, printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Most sequences per pass (the running batch), at most 65536.
    #[arg(long, default_value_t = 64, value_parser = between(1, MAX_BATCH), allow_negative_numbers = true)]
    max_batch: usize,
    /// Most requests waiting for a place in the batch; more are answered 429.
    #[arg(long, default_value_t = 256, value_parser = at_least(1), allow_negative_numbers = true)]
    max_queue: usize,
    /// Require "Authorization: Bearer KEY" on every /v1 request.
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// Context length: most tokens (prompt + generated) of one request. Default: the model's
    /// maximum, at most 8192.
    #[arg(long, value_parser = at_least(1), allow_negative_numbers = true)]
    context: Option<usize>,
    /// Tokens generated for a request that gives no max_tokens.
    #[arg(long, default_value_t = 256, value_parser = at_least(1), allow_negative_numbers = true)]
    max_tokens: usize,
    /// Most prompt tokens one pass takes in, newcomers together; longer prompts go in over
    /// several passes, so that the others keep decoding. Default: 2048 when the weights
    /// stream (--vram), where a pass takes as long as its copies and prompt tokens ride
    /// them almost free; else 512.
    #[arg(long, value_parser = at_least(1), allow_negative_numbers = true)]
    prompt_chunk: Option<usize>,
    /// Largest request body, bytes.
    #[arg(long, default_value_t = 4 << 20, value_parser = at_least(1), allow_negative_numbers = true)]
    max_body: usize,
    /// Seconds a request may take, waiting in the queue included.
    #[arg(long, default_value_t = 600, value_parser = at_least(1), allow_negative_numbers = true)]
    request_timeout: usize,
    /// Seconds a connection may take to send a request's head (method, path, headers), from
    /// when it opens or its last answer went out; then it is closed.
    #[arg(long, default_value_t = 30, value_parser = at_least(1), allow_negative_numbers = true)]
    header_timeout: usize,
    /// Seconds a request's body may take to arrive once its head has; then 408 and the
    /// connection is closed.
    #[arg(long, default_value_t = 30, value_parser = at_least(1), allow_negative_numbers = true)]
    body_timeout: usize,
    /// On SIGINT/SIGTERM: seconds in-flight requests may go on before they are cancelled.
    #[arg(long, default_value_t = 10, value_parser = at_least(0), allow_negative_numbers = true)]
    shutdown_grace: usize,
    #[command(flatten)]
    compute: ComputeArgs,
}

/// The image model of `POST /v1/images/generations`.
#[derive(Args, Clone)]
struct ImageModelArgs {
    /// A diffusers Z-Image directory (or ORG/NAME in the Hugging Face cache) for
    /// POST /v1/images/generations, beside --model or alone.
    #[arg(long, value_name = "DIR|ORG/NAME", conflicts_with = "image_dit")]
    image_model: Option<String>,
    /// Instead of --image-model, ComfyUI's split files: the diffusion model, with
    /// --image-text-encoder and --image-vae (as ferry image --dit).
    #[arg(long, value_name = "FILE.safetensors", requires_all = ["image_text_encoder", "image_vae"])]
    image_dit: Option<PathBuf>,
    /// The text encoder file of the split files (as ferry image --text-encoder).
    #[arg(long, value_name = "FILE.safetensors", requires = "image_dit")]
    image_text_encoder: Option<PathBuf>,
    /// Flux.1's second text encoder file, T5's (as ferry image --text-encoder-2).
    #[arg(long, value_name = "FILE.safetensors", requires = "image_dit")]
    image_text_encoder_2: Option<PathBuf>,
    /// The VAE file of the split files.
    #[arg(long, value_name = "FILE.safetensors", requires = "image_dit")]
    image_vae: Option<PathBuf>,
    /// The tokenizer of the split files (as ferry image --tokenizer).
    #[arg(long, value_name = "DIR|tokenizer.json", requires = "image_dit")]
    image_tokenizer: Option<PathBuf>,
    /// GPU memory budget of the image model's phases (as ferry image --vram; apart from
    /// --vram, the text model's). Default: each phase's weights uploaded whole.
    #[arg(long, value_name = "SIZE|auto")]
    image_vram: Option<String>,
    /// Most images one request may ask for (n); they are denoised together, one pass over
    /// the DiT's weights per step for all of them.
    #[arg(long, default_value_t = 4, value_parser = at_least(1), allow_negative_numbers = true)]
    max_images: usize,
    /// Most image requests waiting while one generates; more are answered 429.
    #[arg(long, default_value_t = 4, value_parser = at_least(1), allow_negative_numbers = true)]
    max_image_queue: usize,
}

impl ImageModelArgs {
    /// The pipeline asked for, if any (clap makes sure the split files come whole).
    fn source(&self) -> Option<ImageSource<'_>> {
        if let Some(m) = &self.image_model {
            return Some(ImageSource::Dir(m));
        }
        let (Some(dit), Some(text_encoder), Some(vae)) =
            (&self.image_dit, &self.image_text_encoder, &self.image_vae)
        else {
            return None;
        };
        Some(ImageSource::Split {
            dit,
            text_encoder,
            text_encoder_2: self.image_text_encoder_2.as_deref(),
            vae,
            tokenizer: self.image_tokenizer.as_deref(),
        })
    }
}

/// Most `--max-batch`: far past any card's batch, and small enough that the plans' byte
/// counts cannot overflow.
const MAX_BATCH: usize = 1 << 16;

/// Prompt tokens a pass takes in by default: where it computes on resident weights (or the
/// CPU), few enough that a long prompt stalls the others' decoding little.
const PROMPT_CHUNK: usize = 512;

/// ... and where the weights stream: a streamed pass lasts as long as its copies, and a
/// 7B shape's 2048 prompt tokens take a fraction of them (estimated from their FLOPs: about
/// 0.05 s of an H200's 0.18 s pass at 2.6 GiB, 0.2 of 0.5 s on a PCIe 4 card), so newcomers
/// join in one or two passes instead of one per 512 tokens.
const STREAMED_PROMPT_CHUNK: usize = 2048;

/// Raised at the shutdown deadline: the engine ends every sequence after the pass in flight.
static CANCEL: AtomicBool = AtomicBool::new(false);

pub fn serve(args: ServeArgs) -> Result<()> {
    args.compute.start()?;
    if args.model.is_none() && args.compute.vram.is_some() {
        return Err(Error::Flag {
            flag: "--vram",
            message: "is the text model's budget, and no --model is given; the image model's is --image-vram".into(),
        });
    }
    let metrics = Arc::new(Metrics::default());
    // The image worker opens its pipeline and device first, on its own thread, so that a bad
    // --image-model fails before anything listens.
    let image = match args.image.source() {
        Some(_) => Some(start_image_worker(
            args.image.clone(),
            args.compute.device,
            metrics.clone(),
        )?),
        None => None,
    };
    let addr = format!("{}:{}", args.host, args.port);
    let listener = std::net::TcpListener::bind(&addr).map_err(|e| Error::Flag {
        flag: "--port",
        message: format!("cannot listen on {addr}: {e}"),
    })?;
    let Some(model) = &args.model else {
        // Images only: the HTTP side runs on this thread.
        let local = listener
            .local_addr()
            .map_err(|e| Error::io("listener", e))?;
        eprintln!("[ferry serve: no text model; listening on http://{local}]");
        let config = server_config(&args);
        ferry::serve::serve(listener, config, None, image, metrics, &CANCEL)
            .map_err(|e| Error::io(local.to_string(), e))?;
        eprintln!("[ferry serve: stopped]");
        return Ok(());
    };
    let gpu = open_compute(&args.compute)?;
    if let (Some(gpu), Some(_)) = (&gpu, &image) {
        let text_vram = args.compute.vram.as_deref().map(Vram::parse).transpose()?;
        let image_vram = args
            .image
            .image_vram
            .as_deref()
            .map(Vram::parse)
            .transpose()?;
        check_shared_gpu(text_vram, image_vram, gpu.info().memory_bytes)?;
    }
    let ckpt = open_model(model, &gpu)?;
    let text = TextCodec::open(&ckpt)?;
    let max = ckpt.config.max_position_embeddings;
    let context = context_length(args.context.or(Some(max.min(8192))), max)?;
    // With --vram: planned for a full batch of sequences that fill the context, each decoding
    // a token beside newcomers' prompt pieces of `prompt_chunk` tokens in all. The piece is
    // for all newcomers together, so it is not capped by one sequence's context (each one's
    // share is), only by what a full batch could hold.
    let prompt_chunk = args
        .prompt_chunk
        .unwrap_or(match args.compute.vram {
            Some(_) => STREAMED_PROMPT_CHUNK,
            None => PROMPT_CHUNK,
        })
        .min(args.max_batch.saturating_mul(context));
    let pass = PlannedPass {
        shape: PassShape {
            tokens: 1,
            batch: args.max_batch,
            past: context - 1,
        },
        workspace: Some(
            Llama::new(ckpt.config.clone()).serving_workspace(args.max_batch, prompt_chunk),
        ),
    };
    let model_id = std::path::Path::new(model)
        .file_name()
        .filter(|_| std::path::Path::new(model).exists())
        .map(|n| n.to_string_lossy().trim_end_matches(".gguf").to_string())
        .unwrap_or_else(|| model.clone());
    let task = Server {
        args: &args,
        listener,
        context,
        prompt_chunk,
        model_id,
        http_text: TextCodec::open(&ckpt)?,
        image,
        metrics,
        log: Arc::new(Mutex::new(Vec::new())),
    };
    with_generator(&ckpt, gpu, text, context, &args.compute, false, pass, task)
}

/// The text and image models share one GPU: their budgets must fit in its `memory` bytes
/// together, and neither may be `auto` (all the memory free when it starts, which the other
/// then needs). Without --image-vram each image phase is uploaded whole, beside the text
/// model's budget; that is not checked here.
fn check_shared_gpu(text: Option<Vram>, image: Option<Vram>, memory: usize) -> Result<()> {
    let shared = "the text and image models share the GPU";
    match (text, image) {
        (Some(Vram::Auto), _) => Err(Error::Flag {
            flag: "--vram",
            message: format!("auto would take all the GPU's free memory, and {shared}; give sizes to --vram and --image-vram that fit in it together"),
        }),
        (_, Some(Vram::Auto)) => Err(Error::Flag {
            flag: "--image-vram",
            message: format!("auto would take all the GPU's free memory, and {shared}; give sizes to --vram and --image-vram that fit in it together"),
        }),
        (Some(Vram::Bytes(t)), Some(Vram::Bytes(i))) if t.saturating_add(i) > memory => {
            Err(Error::Flag {
                flag: "--image-vram",
                message: format!(
                    "{} and --vram {} together exceed the GPU's {}, and {shared}; give budgets that fit in it together",
                    human_bytes(i),
                    human_bytes(t),
                    human_bytes(memory)
                ),
            })
        }
        _ => Ok(()),
    }
}

fn server_config(a: &ServeArgs) -> ServerConfig {
    ServerConfig {
        api_key: a.api_key.clone(),
        max_body_bytes: a.max_body,
        request_timeout: Duration::from_secs(a.request_timeout as u64),
        header_timeout: Duration::from_secs(a.header_timeout as u64),
        body_timeout: Duration::from_secs(a.body_timeout as u64),
        shutdown_grace: Duration::from_secs(a.shutdown_grace as u64),
    }
}

/// Start the image worker's thread: it opens the pipeline and its device (`device`, with
/// `--image-vram`), says so (or fails, and so does this), then generates what its queue
/// brings until the queue is dropped. It is not joined: at shutdown the process may end
/// while it finishes a job whose client is gone.
fn start_image_worker(
    args: ImageModelArgs,
    device: Device,
    metrics: Arc<Metrics>,
) -> Result<ImageModel> {
    let vram = args
        .image_vram
        .as_deref()
        .map(Vram::parse)
        .transpose()
        .map_err(|e| renamed(e, "--image-vram"))?;
    if device == Device::Cpu && vram.is_some() {
        return Err(Error::Flag {
            flag: "--image-vram",
            message: "a GPU memory budget needs --device cuda (or auto with a GPU)".into(),
        });
    }
    let (jobs, queue) = std::sync::mpsc::sync_channel(args.max_image_queue);
    let (ready, started) = std::sync::mpsc::channel();
    let max_images = args.max_images;
    std::thread::Builder::new()
        .name("ferry-images".into())
        .spawn(move || image_worker(&args, device, vram, queue, &metrics, ready))
        .map_err(|e| Error::io("the image worker's thread", e))?;
    let id = started.recv().unwrap_or_else(|_| {
        Err(Error::Device(
            "the image worker ended while starting".into(),
        ))
    })?;
    Ok(ImageModel {
        id,
        jobs,
        max_images,
    })
}

/// The image worker's thread: open, report `ready` (the model's id, or why not), serve.
fn image_worker(
    args: &ImageModelArgs,
    device: Device,
    vram: Option<Vram>,
    queue: Receiver<ImageJob>,
    metrics: &Metrics,
    ready: std::sync::mpsc::Sender<Result<String>>,
) {
    let source = args
        .source()
        .expect("the worker starts only with an image model");
    let opened = open_pipeline(&source)
        .map_err(|e| renamed(e, "--image-tokenizer"))
        .and_then(|p| {
            Ok((
                p,
                open_device(device, vram).map_err(|e| renamed(e, "--image-vram"))?,
            ))
        });
    let ((pipe, png_model), gpu) = match opened {
        Ok(o) => o,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let compute = match &gpu {
        None => Compute::Cpu,
        Some(gpu) => Compute::Cuda {
            gpu,
            stream: vram.map(|_| StreamOptions::default()),
            vae: VaeDevice::Gpu,
        },
    };
    // The id requests name: the directory's name, or the DiT file's without .safetensors.
    let id = png_model.trim_end_matches(".safetensors").to_string();
    eprintln!(
        "[ferry serve: image model {id} on {}, up to {} images a request, {} waiting]",
        compute.name(),
        args.max_images,
        args.max_image_queue
    );
    if ready.send(Ok(id)).is_err() {
        return;
    }
    images::run(&pipe, &compute, &png_model, queue, metrics);
}

/// `e` naming `flag` where it named the `ferry image` flag that `flag` stands for here
/// (`--vram` → `--image-vram`, `--tokenizer` → `--image-tokenizer`).
fn renamed(e: Error, flag: &'static str) -> Error {
    match e {
        Error::Flag { message, .. } => Error::Flag { flag, message },
        e => e,
    }
}

struct Server<'a> {
    args: &'a ServeArgs,
    listener: std::net::TcpListener,
    context: usize,
    prompt_chunk: usize,
    model_id: String,
    /// The HTTP side's own codec, to encode prompts while the engine runs.
    http_text: TextCodec,
    image: Option<ImageModel>,
    metrics: Arc<Metrics>,
    log: Arc<Mutex<Vec<PassStats>>>,
}

impl GeneratorTask for Server<'_> {
    fn pass_log(&self) -> Option<Arc<Mutex<Vec<PassStats>>>> {
        Some(self.log.clone())
    }

    fn run<B: Backend>(self, gen: Generator<B>, device: &str) -> Result<()>
    where
        B::Weight: 'static,
    {
        let a = self.args;
        let (jobs, queue): (SyncSender<_>, _) = std::sync::mpsc::sync_channel(a.max_queue);
        let metrics = self.metrics;
        let addr = self
            .listener
            .local_addr()
            .map_err(|e| Error::io("listener", e))?;
        eprintln!(
            "[ferry serve: {} on {device}, context {}, up to {} sequences and {} prompt tokens a pass; listening on http://{addr}]",
            self.model_id, self.context, a.max_batch, self.prompt_chunk
        );
        let text = TextModel {
            id: self.model_id,
            codec: self.http_text,
            jobs,
            context: self.context,
            default_max_tokens: a.max_tokens,
        };
        let config = server_config(a);
        let http_metrics = metrics.clone();
        let listener = self.listener;
        let image = self.image;
        let http = std::thread::spawn(move || {
            ferry::serve::serve(listener, config, Some(text), image, http_metrics, &CANCEL)
        });
        let engine_config = EngineConfig {
            max_batch: a.max_batch,
            prompt_chunk: self.prompt_chunk,
        };
        engine::run(gen, engine_config, queue, metrics, &CANCEL, Some(self.log));
        let served = http.join().expect("the HTTP thread ends");
        served.map_err(|e| Error::io(addr.to_string(), e))?;
        eprintln!("[ferry serve: stopped]");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: usize = 1 << 30;

    #[test]
    fn budgets_on_a_shared_gpu_must_fit_together_and_not_be_auto() {
        let memory = 24 * GIB;
        let b = |g: usize| Some(Vram::Bytes(g * GIB));
        assert!(check_shared_gpu(b(12), b(12), memory).is_ok());
        assert!(check_shared_gpu(None, b(20), memory).is_ok());
        assert!(check_shared_gpu(b(20), None, memory).is_ok());
        let flag = |r: Result<()>| match r {
            Err(Error::Flag { flag, message }) => (flag, message),
            other => panic!("expected a flag error, got {other:?}"),
        };
        let (f, m) = flag(check_shared_gpu(b(16), b(12), memory));
        assert_eq!(f, "--image-vram");
        assert!(
            m.contains("12.00 GiB") && m.contains("--vram 16.00 GiB") && m.contains("24.00 GiB"),
            "{m}"
        );
        assert_eq!(
            flag(check_shared_gpu(Some(Vram::Auto), b(4), memory)).0,
            "--vram"
        );
        assert_eq!(
            flag(check_shared_gpu(b(4), Some(Vram::Auto), memory)).0,
            "--image-vram"
        );
    }
}
