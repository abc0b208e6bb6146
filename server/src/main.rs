//! `zimage-server`: an OpenAI-compatible image server for zimage model packages.
//!
//! It binds first (printing `zimage-server listening on http://ADDR` on stdout), loads the
//! models on worker threads (`/ready` and the API answer 503 meanwhile), then serves. SIGTERM
//! or Ctrl-C drains: no new work (503), queued and running generations finish, then the
//! process exits 0; a second signal ends it at once.

mod api;
mod error;
mod metrics;
mod output;
mod routes;
mod workers;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use zimage::{EnhanceOptions, ErrorKind, LoadOptions, LoraAdapter, LoraFile, LoraSetting, Pipeline, PromptEnhancer};
use zimage_load_flags::LoadFlags;

use crate::api::PixelLimits;
use crate::metrics::Metrics;
use crate::output::ImageStore;
use crate::routes::{AppState, Settings};
use crate::workers::{LoadedWorker, ModelPool};

#[derive(Parser)]
#[command(name = "zimage-server", version, about = "An OpenAI-compatible image server for zimage model packages")]
struct Args {
    /// Model package to serve, as DIR or NAME=DIR (the name clients pass as `model`; default:
    /// the folder's name). Repeat to serve several; requests without `model` go to the first.
    #[arg(long, value_name = "[NAME=]DIR", required = true)]
    model: Vec<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on; 0 picks a free one (the address is printed on stdout).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Pipelines per model, each on its own thread (each holds its own copy of the sessions).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    workers: u32,
    /// Requests that may wait for a worker, per model; past that the answer is 429.
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=100000))]
    max_queue: u32,
    /// Accepted API key (`Authorization: Bearer KEY`); repeat for several. Without any the
    /// server is open (and says so at start).
    #[arg(
        long = "api-key",
        value_name = "KEY",
        env = "ZIMAGE_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_keys: Vec<String>,
    /// Seconds a request may take, queueing included; past that it is cancelled (504).
    #[arg(long, value_name = "S", default_value_t = 600)]
    request_timeout: u64,
    /// Largest request body in bytes (413 past it).
    #[arg(long, value_name = "BYTES", default_value_t = 32 << 20)]
    max_body_bytes: usize,
    /// Largest input picture side in pixels, checked from the file header before decoding.
    #[arg(long, value_name = "PX", default_value_t = 4096)]
    max_input_side: u32,
    /// Most output pixels (width x height) per image a request may ask for, generations and
    /// edits alike (an edit without `size` asks for its picture's, floored to 16; an instruction
    /// edit for its last reference's as the editing model prepares it: scaled down to about
    /// 1 MP when larger, floored to 16); larger ones are refused (400) before any work. Z-Image's standard resolutions are up to about 1.5-2 MP; raise it
    /// for larger images on a machine with the memory, lower it on a small one (a generation's
    /// memory grows with its pixels: on the CPU the mid-size test model, which has the real
    /// VAE's shape and 0.7 GB resident after loading, peaks at about 5.3 GB for 1024x1024 and
    /// 10.3 GB for 1536x1536, most of it the VAE decode's activations).
    #[arg(long, value_name = "N", default_value_t = 1536 * 1536, value_parser = clap::value_parser!(u64).range(1..))]
    max_pixels: u64,
    /// Most output pixels of one request, its `n` images together (the whole batch runs through
    /// the transformer and the VAE at once, twice the batch under guidance); larger requests are
    /// refused (400, naming `n`) before any work [default: 4 x --max-pixels, at least
    /// --max-pixels].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_batch_pixels: Option<u64>,
    /// Seconds a client may take to send a request's headers (a connection that sends none,
    /// idle between requests too, is closed after it), and may stall while sending its body
    /// (a 400, then the connection is closed): stalled clients cannot hold connections forever.
    #[arg(long, value_name = "S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    header_timeout: u64,
    /// Seconds a request's whole body may take to arrive (a client that trickles it a byte at a
    /// time passes --header-timeout between bytes): past it, a 400 and the connection closes.
    #[arg(long, value_name = "S", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    body_timeout: u64,
    /// Most client connections open at once; one more is closed as soon as it is accepted (a
    /// client holding many idle or trickling connections could take every file descriptor).
    #[arg(long, value_name = "N", default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
    /// Seconds a write to a client may stay blocked (the client reads none of the response)
    /// before the connection is closed: a client that stops reading cannot hold a response's
    /// images in memory forever.
    #[arg(long, value_name = "S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    write_timeout: u64,
    /// Seconds SIGTERM waits for queued and running generations before cancelling them.
    #[arg(long, value_name = "S", default_value_t = 600)]
    drain_timeout: u64,
    /// Base of the URLs returned for `response_format: "url"` [default: http://HOST-HEADER, which
    /// the client chooses: set it behind a proxy or load balancer].
    #[arg(long, value_name = "URL")]
    public_url: Option<String>,
    /// Seconds an image stays fetchable by URL.
    #[arg(long, value_name = "S", default_value_t = 3600)]
    url_ttl: u64,
    /// Images kept for URLs at most (the oldest go first); at least 64, the most one request
    /// makes (fewer would drop a request's first images before it is answered).
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u64).range(64..))]
    url_cache: u64,
    /// Prompt enhancer package for `enhance_prompt` with models that carry no decoder (a
    /// standalone one from export-scripts/export_enhancer.py).
    #[arg(long, value_name = "DIR")]
    enhancer: Option<PathBuf>,
    /// Most tokens the prompt enhancer generates (greedy decoding, no thinking).
    #[arg(long, value_name = "N", default_value_t = EnhanceOptions::default().max_new_tokens)]
    enhance_max_new_tokens: usize,
    /// Most tokens the prompt enhancer holds, its templated prompt and answer together: it
    /// bounds the enhancer's memory (Qwen3-4B keeps 288 KiB per token); a longer prompt is
    /// refused (400).
    #[arg(long, value_name = "N", default_value_t = EnhanceOptions::default().max_context_tokens)]
    enhance_max_context_tokens: usize,
    /// A ControlNet of the package (added with export_controlnet.py) to load with it, for
    /// `control_image` requests on /v1/images/generations: NAME for every model, MODEL=NAME for
    /// one. Repeat for several models.
    #[arg(long, value_name = "[MODEL=]NAME")]
    controlnet: Vec<String>,
    /// A LoRA adapter merged into the transformer at load (diffusers/PEFT, kohya, ComfyUI or
    /// LoKr .safetensors), with its scale (default 1): FILE[:SCALE] for every model,
    /// MODEL=FILE[:SCALE] for one. Repeat for several; they add up, with a ControlNet too.
    #[arg(long = "lora", value_name = "[MODEL=]FILE[:SCALE]")]
    loras: Vec<String>,
    #[command(flatten)]
    load: LoadFlags,
    /// TensorRT: most images per request (`n`) the engines serve.
    #[arg(long, value_name = "N", default_value_t = 4)]
    trt_max_images: u32,
    /// Testing: wait this long before loading the models (to observe the loading state).
    #[arg(long, value_name = "MS", default_value_t = 0, hide = true)]
    startup_delay_ms: u64,
    /// Testing: hold each request's picture-decoding slot this long after decoding (to fill
    /// the slots).
    #[arg(long, value_name = "MS", default_value_t = 0, hide = true)]
    decode_delay_ms: u64,
}

impl Args {
    fn load_options(&self) -> LoadOptions {
        // Requests may ask for guidance, so the profiles allow its doubled batch.
        self.load.options(self.trt_max_images, true)
    }
}

/// `NAME=DIR` or `DIR` (named after its folder).
fn model_spec(arg: &str) -> (String, PathBuf) {
    if let Some((name, dir)) = arg.split_once('=') {
        if !name.is_empty() && !name.contains('/') && !std::path::Path::new(arg).is_dir() {
            return (name.to_string(), PathBuf::from(dir));
        }
    }
    let dir = PathBuf::from(arg);
    let name = dir
        .file_name()
        .map(|n| n.to_os_string())
        .or_else(|| dir.canonicalize().ok().and_then(|d| d.file_name().map(|n| n.to_os_string())))
        .map_or_else(|| arg.to_string(), |n| n.to_string_lossy().into_owned());
    (name, dir)
}

/// Per model (in the order of `models`), the values of a repeatable `--FLAG [MODEL=]VALUE`
/// meant for it: `MODEL=VALUE` for that model (an error when no such model is served), a plain
/// VALUE for every model, as is a value whose part before the first '=' holds a folder
/// separator (a path with '=' in a name).
fn per_model(flag: &str, models: &[String], values: &[String]) -> Result<Vec<Vec<String>>, String> {
    let mut chosen: Vec<Vec<String>> = vec![Vec::new(); models.len()];
    for value in values {
        let every_model = || (0..models.len()).collect();
        let (targets, item): (Vec<usize>, &str) = match value.split_once('=') {
            Some((model, item)) => match models.iter().position(|m| m == model) {
                Some(i) => (vec![i], item),
                // A path with '=' in a file or folder name (`--lora /loras/x=y.safetensors`).
                None if model.contains(['/', '\\']) => (every_model(), value.as_str()),
                None => {
                    let hint = match flag {
                        "lora" => format!(
                            " (a value containing '=' is MODEL=FILE; for a file whose name holds '=', give it with \
                             a folder, e.g. ./{value})"
                        ),
                        _ => String::new(),
                    };
                    return Err(format!("--{flag} {value}: no model '{model}' is served{hint}"));
                }
            },
            None => (every_model(), value.as_str()),
        };
        for i in targets {
            chosen[i].push(item.to_string());
        }
    }
    Ok(chosen)
}

/// The ControlNet each model loads with, from `--controlnet [MODEL=]NAME` values, in the
/// order of `models`; an error names a MODEL that is not served or a model given two.
fn controlnets_for(models: &[String], values: &[String]) -> Result<Vec<Option<String>>, String> {
    let mut chosen = Vec::with_capacity(models.len());
    for (model, names) in models.iter().zip(per_model("controlnet", models, values)?) {
        match names.as_slice() {
            [] => chosen.push(None),
            [name] if name.is_empty() => return Err("--controlnet: the ControlNet's name is empty".to_string()),
            [name] => chosen.push(Some(name.clone())),
            _ => return Err(format!("--controlnet: model '{model}' is given two ControlNets")),
        }
    }
    Ok(chosen)
}

/// The LoRA files and scales each model loads with, from `--lora [MODEL=]FILE[:SCALE]`.
fn loras_for(models: &[String], values: &[String]) -> Result<Vec<Vec<LoraFile>>, String> {
    per_model("lora", models, values)?
        .into_iter()
        .map(|files| {
            files.iter().map(|f| zimage_load_flags::parse_lora(f).map_err(|e| format!("--lora {f}: {e}"))).collect()
        })
        .collect()
}

fn main() -> ExitCode {
    map_large_allocations();
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ZIMAGE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,ort=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let specs: Vec<(String, PathBuf)> = args.model.iter().map(|m| model_spec(m)).collect();
    for (i, (name, _)) in specs.iter().enumerate() {
        if specs[..i].iter().any(|(n, _)| n == name) {
            eprintln!("zimage-server: error: two models are named '{name}'; name them with --model NAME=DIR");
            return ExitCode::from(2);
        }
    }
    if let Some(batch) = args.max_batch_pixels.filter(|b| *b < args.max_pixels) {
        eprintln!(
            "zimage-server: error: --max-batch-pixels {batch} is below --max-pixels {} (one image of the largest \
             size would be refused)",
            args.max_pixels
        );
        return ExitCode::from(2);
    }
    let names: Vec<String> = specs.iter().map(|(n, _)| n.clone()).collect();
    let (controlnets, loras) = match (controlnets_for(&names, &args.controlnet), loras_for(&names, &args.loras)) {
        (Ok(c), Ok(l)) => (c, l),
        (Err(message), _) | (_, Err(message)) => {
            eprintln!("zimage-server: error: {message}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("zimage-server: error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(serve(args, specs, controlnets, loras))
}

async fn serve(
    args: Args,
    specs: Vec<(String, PathBuf)>,
    controlnets: Vec<Option<String>>,
    loras: Vec<Vec<LoraFile>>,
) -> ExitCode {
    let address = format!("{}:{}", args.host, args.port);
    let listener = match tokio::net::TcpListener::bind(&address).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("zimage-server: error: cannot listen on {address}: {e}");
            return ExitCode::from(9);
        }
    };
    let bound: SocketAddr = listener.local_addr().expect("a bound socket has an address");
    let metrics = Arc::new(Metrics::default());
    let max_batch_pixels = args.max_batch_pixels.unwrap_or(args.max_pixels.saturating_mul(4));
    let settings = Settings {
        max_body_bytes: args.max_body_bytes,
        max_input_side: args.max_input_side,
        pixels: PixelLimits { image: args.max_pixels, batch: max_batch_pixels },
        // As many pictures decoded at once as requests each model holds (running or queued).
        decode_slots: (args.workers as usize + args.max_queue as usize) * specs.len(),
        decode_delay: Duration::from_millis(args.decode_delay_ms),
        body_timeout: Duration::from_secs(args.header_timeout),
        body_total_timeout: Duration::from_secs(args.body_timeout),
        request_timeout: Duration::from_secs(args.request_timeout.max(1)),
        public_url: args.public_url.clone(),
    };
    let store = ImageStore::new(Duration::from_secs(args.url_ttl), args.url_cache as usize);
    let names = specs.iter().map(|(n, _)| n.clone()).collect();
    let keys: Vec<String> = args.api_keys.iter().map(|k| k.trim().to_string()).filter(|k| !k.is_empty()).collect();
    let state = Arc::new(AppState::new(names, &keys, Arc::clone(&metrics), store, settings));
    if keys.is_empty() {
        tracing::warn!(
            "no API key set (--api-key or ZIMAGE_API_KEYS): the API is open to anyone who can reach {bound}"
        );
    } else {
        tracing::info!(keys = keys.len(), "API keys required");
    }
    println!("zimage-server listening on http://{bound}");
    let _ = std::io::stdout().flush();

    let mut enhance = EnhanceOptions::default();
    enhance.max_new_tokens = args.enhance_max_new_tokens;
    enhance.max_context_tokens = args.enhance_max_context_tokens;
    if let Err(e) = enhance.check() {
        eprintln!("zimage-server: error: {e}");
        return ExitCode::from(2);
    }
    let loader = {
        let state = Arc::clone(&state);
        let plan = LoadPlan {
            options: args.load_options(),
            controlnets,
            loras,
            enhancer: args.enhancer.clone(),
            enhance,
            workers: args.workers as usize,
            max_queue: args.max_queue as usize,
        };
        let delay = args.startup_delay_ms;
        tokio::task::spawn_blocking(move || {
            std::thread::sleep(Duration::from_millis(delay));
            load_models(&state, &specs, &plan, &metrics)
        })
    };
    let failed = Arc::new(std::sync::Mutex::new(None::<u8>));
    let drain_timeout = Duration::from_secs(args.drain_timeout);
    let shutdown = {
        let state = Arc::clone(&state);
        let failed = Arc::clone(&failed);
        async move {
            tokio::select! {
                _ = wait_for_signal() => {}
                loaded = loader => {
                    match loaded {
                        Ok(Ok(())) => wait_for_signal().await,
                        Ok(Err(code)) => { *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(code); return; }
                        Err(e) => {
                            tracing::error!("loading the models failed: {e}");
                            *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(1);
                            return;
                        }
                    }
                }
            }
            if state.models.get().is_none() {
                // Still loading: no work was taken; end now (the loader threads are inside
                // ONNX Runtime, whose static destructors must not run under them).
                tracing::info!("signal while loading: exiting");
                exit_now(0);
            }
            drain(&state, drain_timeout).await;
        }
    };
    let app = routes::router(Arc::clone(&state));
    let timeouts = ConnectionTimeouts {
        header: Duration::from_secs(args.header_timeout),
        write: Duration::from_secs(args.write_timeout),
        closing: Duration::from_secs(args.drain_timeout),
        max_connections: args.max_connections as usize,
    };
    serve_connections(listener, app, timeouts, shutdown).await;
    if let Some(code) = *failed.lock().unwrap_or_else(|p| p.into_inner()) {
        return ExitCode::from(code);
    }
    // Every connection is closed: the workers finish what is left (nothing, after the drain)
    // and end; then the pipelines are dropped before the process exits.
    if let Some(pools) = state.models.get() {
        for pool in pools {
            pool.close_and_join();
        }
    }
    tracing::info!("drained; exiting");
    ExitCode::SUCCESS
}

/// How long a connection's client may stall.
#[derive(Clone, Copy)]
struct ConnectionTimeouts {
    /// Sending a request's headers.
    header: Duration,
    /// Taking a response: one write blocked this long closes the connection.
    write: Duration,
    /// After shutdown, how long open connections may take to finish their requests (a client
    /// trickling a body held the process open for as long as it liked).
    closing: Duration,
    /// Connections open at once; past it a new one is closed at once.
    max_connections: usize,
}

/// Serves HTTP/1 connections until `shutdown` completes, then waits for the open ones to
/// finish their requests. This is axum::serve's loop, with hyper's header-read timeout set
/// (axum::serve gives no way to set it, and without a timer hyper never applies it): a client
/// that stalls while sending its headers is disconnected after `timeouts.header`; one that
/// stops reading its response, after `timeouts.write` (a write error ends the connection).
async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    timeouts: ConnectionTimeouts,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    // A send tells every connection to finish; each connection holds a receiver, so
    // `closed()` resolves once they are all gone.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    let connections = Arc::new(tokio::sync::Semaphore::new(timeouts.max_connections));
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, as axum::serve does.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(open) = Arc::clone(&connections).try_acquire_owned() else {
            // Dropping the stream closes it: the client can retry, the server keeps its
            // descriptors for the connections it serves.
            tracing::warn!("{} connections open: closing a new one", timeouts.max_connections);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _open = open;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(timeouts.header);
            let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
            stream.set_write_timeout(Some(timeouts.write));
            let connection = builder.serve_connection(TokioIo::new(Box::pin(stream)), service);
            tokio::pin!(connection);
            let mut stopping = false;
            loop {
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!("connection ended: {e}");
                        }
                        break;
                    }
                    _ = stop.changed(), if !stopping => {
                        // Finishes the request in flight, then closes; an idle one closes now.
                        stopping = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(stop);
        });
    }
    drop(listener);
    drop(stop_rx);
    let _ = stop_tx.send(());
    if tokio::time::timeout(timeouts.closing, stop_tx.closed()).await.is_err() {
        tracing::warn!("connections still open {} s after shutdown: closing them", timeouts.closing.as_secs());
    }
}

/// What to load and how.
struct LoadPlan {
    options: LoadOptions,
    /// Per model (in the order served): the ControlNet loaded as its transformer.
    controlnets: Vec<Option<String>>,
    /// Per model: the LoRA files and scales merged into its transformer.
    loras: Vec<Vec<LoraFile>>,
    enhancer: Option<PathBuf>,
    enhance: EnhanceOptions,
    workers: usize,
    max_queue: usize,
}

/// Logs why model `name` cannot load and gives the exit code for it (as the CLI's: 3 package,
/// 4 runtime, 5 provider, 6 request, 9 I/O, 10 LoRA, 1 otherwise).
fn load_failure(name: &str, kind: ErrorKind, message: &str) -> u8 {
    tracing::error!(model = %name, "cannot load the model: {message}");
    eprintln!("zimage-server: error: model '{name}': {message}");
    match kind {
        ErrorKind::Package => 3,
        ErrorKind::Runtime => 4,
        ErrorKind::Provider => 5,
        ErrorKind::InvalidRequest => 6,
        ErrorKind::Io => 9,
        ErrorKind::Lora => 10,
        _ => 1,
    }
}

/// Loads `workers` pipelines per model, in parallel, and starts their queues. On failure the
/// error is logged and its exit code returned ([`load_failure`]).
fn load_models(
    state: &AppState,
    specs: &[(String, PathBuf)],
    plan: &LoadPlan,
    metrics: &Arc<Metrics>,
) -> Result<(), u8> {
    let started = Instant::now();
    let (options, workers, max_queue) = (&plan.options, plan.workers, plan.max_queue);
    // Each LoRA file is read and checked once, whatever the number of models and workers; a
    // bad one fails the start as a model that cannot load does.
    let mut adapters: BTreeMap<&Path, Arc<LoraAdapter>> = BTreeMap::new();
    let mut lora_sets = Vec::with_capacity(specs.len());
    for ((name, _), files) in specs.iter().zip(&plan.loras) {
        let mut set = Vec::with_capacity(files.len());
        for file in files {
            let adapter = match adapters.get(file.path.as_path()) {
                Some(adapter) => Arc::clone(adapter),
                None => match LoraAdapter::load(&file.path) {
                    Ok(adapter) => Arc::clone(adapters.entry(file.path.as_path()).or_insert(Arc::new(adapter))),
                    Err(e) => return Err(load_failure(name, e.kind(), &error::one_line(&e.to_string()))),
                },
            };
            set.push(LoraSetting::new(adapter, file.scale));
        }
        lora_sets.push(set);
    }
    let loads: Vec<Vec<std::thread::JoinHandle<zimage::Result<LoadedWorker>>>> = specs
        .iter()
        .zip(plan.controlnets.iter().zip(lora_sets))
        .map(|((_, dir), (controlnet, loras))| {
            (0..workers)
                .map(|_| {
                    let (dir, mut options, separate) = (dir.clone(), options.clone(), plan.enhancer.clone());
                    options.controlnet = controlnet.clone();
                    let loras = loras.clone();
                    std::thread::spawn(move || {
                        options.loras = loras;
                        let pipeline = Pipeline::load(&dir, &options)?;
                        let manifest = pipeline.manifest();
                        let enhancer = if manifest.enhancer.is_some() && manifest.graphs.text_decoder.is_some() {
                            Some(pipeline.attach_enhancer(&options)?)
                        } else if let Some(separate) = separate {
                            Some(PromptEnhancer::load(separate, &options)?)
                        } else {
                            None
                        };
                        Ok(LoadedWorker { pipeline: Arc::new(pipeline), enhancer: enhancer.map(Arc::new) })
                    })
                })
                .collect()
        })
        .collect();
    let mut loaded = Vec::new();
    let mut failure = None;
    for ((name, dir), handles) in specs.iter().zip(loads) {
        let mut model = Vec::new();
        for handle in handles {
            match handle.join() {
                Ok(Ok(worker)) => model.push(worker),
                Ok(Err(e)) => {
                    failure.get_or_insert((name.clone(), e.kind(), error::one_line(&e.to_string())));
                }
                Err(_) => {
                    failure.get_or_insert((name.clone(), ErrorKind::Inference, "the loader panicked".into()));
                }
            }
        }
        loaded.push((name.clone(), dir.clone(), model));
    }
    if let Some((name, kind, message)) = failure {
        drop(loaded);
        return Err(load_failure(&name, kind, &message));
    }
    let pools = loaded
        .into_iter()
        .map(|(name, dir, model)| {
            let p = &model[0].pipeline;
            tracing::info!(
                model = %name, dir = %dir.display(), workers = model.len(), max_queue,
                transformer = %p.providers().transformer, enhancer = model[0].enhancer.is_some(),
                "model loaded"
            );
            for (graph, reason) in p.provider_fallbacks() {
                tracing::warn!(model = %name, "{graph:?} runs on the CPU: {reason}");
            }
            Arc::new(ModelPool::start(name, model, max_queue, plan.enhance.clone(), Arc::clone(metrics)))
        })
        .collect();
    let _ = state.models.set(pools);
    tracing::info!(seconds = started.elapsed().as_secs_f64(), "ready");
    Ok(())
}

/// SIGTERM or SIGINT. A second one ends the process at once.
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    static SIGNALS: AtomicU32 = AtomicU32::new(0);
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install the signal handlers; SIGTERM will end the process without draining");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    SIGNALS.fetch_add(1, Ordering::SeqCst);
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting without finishing the work in flight");
        exit_now(1);
    });
}

/// No new work (503), then wait until queued and running generations are done.
async fn drain(state: &AppState, timeout: Duration) {
    state.draining.store(true, Ordering::SeqCst);
    tracing::info!(busy = state.busy(), "draining: no new work; finishing queued and running generations");
    let deadline = Instant::now() + timeout;
    while state.busy() > 0 {
        if Instant::now() > deadline {
            tracing::warn!(busy = state.busy(), "drain timeout: cancelling what is left");
            if let Some(pools) = state.models.get() {
                for pool in pools {
                    pool.cancel_all();
                }
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Ends the process without running static destructors (ONNX Runtime's) under threads that
/// may still be inside it.
fn exit_now(code: i32) -> ! {
    // SAFETY: _exit ends the process at once; nothing after it runs.
    unsafe { libc::_exit(code) }
}

/// As the `zimage` command does (cli/src/allocator.rs): every allocation of 1 MiB and more gets
/// its own mapping, so a generation's freed activations go back to the system and the idle
/// RSS returns to its level after a burst.
fn map_large_allocations() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's tuning; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_model_values_name_a_served_model_or_go_to_every_model() {
        let models = ["a".to_string(), "b".to_string()];
        let values = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let got = per_model("lora", &models, &values(&["b=x.safetensors", "y.safetensors:0.5"])).unwrap();
        assert_eq!(got, vec![vec!["y.safetensors:0.5"], vec!["x.safetensors", "y.safetensors:0.5"]]);
        // A path whose file or folder name holds '=' goes to every model, whole.
        let got = per_model("lora", &models, &values(&["/loras/x=y.safetensors", "b=./p=q.safetensors"])).unwrap();
        assert_eq!(got, vec![vec!["/loras/x=y.safetensors"], vec!["/loras/x=y.safetensors", "./p=q.safetensors"]]);
        // Anything else before '=' must be a served model.
        let e = per_model("lora", &models, &values(&["c=x.safetensors"])).unwrap_err();
        assert!(e.starts_with("--lora c=x.safetensors: no model 'c' is served"), "{e}");
        assert!(e.contains("./c=x.safetensors"), "{e}");
    }
}
