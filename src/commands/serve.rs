//! `ferry serve`: an OpenAI-compatible server; every pass over the weights serves every
//! request in the running batch (see ferry::serve).

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;

use ferry::backend::cuda::streaming::PassStats;
use ferry::backend::Backend;
use ferry::generate::{context_length, Generator, TextCodec};
use ferry::model::PassShape;
use ferry::serve::engine::{self, EngineConfig, Metrics};
use ferry::serve::ServerConfig;
use ferry::{Error, Result};

use super::generation::{open_compute, open_model, with_generator, ComputeArgs, GeneratorTask};
use super::{at_least, ModelArg};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Address to listen on (127.0.0.1: this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free one, printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Most sequences per pass (the running batch).
    #[arg(long, default_value_t = 64, value_parser = at_least(1), allow_negative_numbers = true)]
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
    /// several passes, so that the others keep decoding.
    #[arg(long, default_value_t = 512, value_parser = at_least(1), allow_negative_numbers = true)]
    prompt_chunk: usize,
    /// Largest request body, bytes.
    #[arg(long, default_value_t = 4 << 20, value_parser = at_least(1), allow_negative_numbers = true)]
    max_body: usize,
    /// Seconds a request may take, waiting in the queue included.
    #[arg(long, default_value_t = 600, value_parser = at_least(1), allow_negative_numbers = true)]
    request_timeout: usize,
    /// On SIGINT/SIGTERM: seconds in-flight requests may go on before they are cancelled.
    #[arg(long, default_value_t = 10, value_parser = at_least(0), allow_negative_numbers = true)]
    shutdown_grace: usize,
    #[command(flatten)]
    compute: ComputeArgs,
}

/// Raised at the shutdown deadline: the engine ends every sequence after the pass in flight.
static CANCEL: AtomicBool = AtomicBool::new(false);

pub fn serve(args: ServeArgs) -> Result<()> {
    args.compute.start()?;
    let gpu = open_compute(&args.compute)?;
    let ckpt = open_model(&args.model.model, &gpu)?;
    let text = TextCodec::open(&ckpt)?;
    let max = ckpt.config.max_position_embeddings;
    let context = context_length(args.context.or(Some(max.min(8192))), max)?;
    let addr = format!("{}:{}", args.host, args.port);
    let listener = std::net::TcpListener::bind(&addr).map_err(|e| Error::Flag {
        flag: "--port",
        message: format!("cannot listen on {addr}: {e}"),
    })?;
    // With --vram: planned for a full batch of sequences that fill the context, taking in a
    // prompt piece each (the engine takes in at most one piece's tokens a pass, all together).
    let piece = args.prompt_chunk.min(context);
    let shape = PassShape {
        tokens: piece,
        batch: args.max_batch,
        past: context - piece,
    };
    let model_id = std::path::Path::new(&args.model.model)
        .file_name()
        .filter(|_| std::path::Path::new(&args.model.model).exists())
        .map(|n| n.to_string_lossy().trim_end_matches(".gguf").to_string())
        .unwrap_or_else(|| args.model.model.clone());
    let task = Server {
        args: &args,
        listener,
        context,
        model_id,
        http_text: TextCodec::open(&ckpt)?,
        log: Arc::new(Mutex::new(Vec::new())),
    };
    with_generator(&ckpt, gpu, text, context, &args.compute, false, shape, task)
}

struct Server<'a> {
    args: &'a ServeArgs,
    listener: std::net::TcpListener,
    context: usize,
    model_id: String,
    /// The HTTP side's own codec, to encode prompts while the engine runs.
    http_text: TextCodec,
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
        let (jobs, queue) = std::sync::mpsc::sync_channel(a.max_queue);
        let metrics = Arc::new(Metrics::default());
        let addr = self
            .listener
            .local_addr()
            .map_err(|e| Error::io("listener", e))?;
        let config = ServerConfig {
            model_id: self.model_id,
            api_key: a.api_key.clone(),
            context: self.context,
            default_max_tokens: a.max_tokens,
            max_body_bytes: a.max_body,
            request_timeout: Duration::from_secs(a.request_timeout as u64),
            shutdown_grace: Duration::from_secs(a.shutdown_grace as u64),
        };
        eprintln!(
            "[ferry serve: {} on {device}, context {}, up to {} sequences a pass; listening on http://{addr}]",
            config.model_id, self.context, a.max_batch
        );
        let http_metrics = metrics.clone();
        let listener = self.listener;
        let text = self.http_text;
        let http = std::thread::spawn(move || {
            ferry::serve::serve(listener, config, text, jobs, http_metrics, &CANCEL)
        });
        let engine_config = EngineConfig {
            max_batch: a.max_batch,
            prompt_chunk: a.prompt_chunk,
        };
        engine::run(gen, engine_config, queue, metrics, &CANCEL, Some(self.log));
        let served = http.join().expect("the HTTP thread ends");
        served.map_err(|e| Error::io(addr.to_string(), e))?;
        eprintln!("[ferry serve: stopped]");
        Ok(())
    }
}
