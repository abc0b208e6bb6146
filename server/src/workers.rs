//! Each served model: `--workers N` pipelines, each on its own thread, taking jobs from one
//! bounded queue. A full queue refuses at once (429), once the jobs whose clients went away
//! are taken out of it; such a job is skipped, or cancelled through its pipeline's cancel
//! handle while it runs; a panic fails its request only.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, SendTimeoutError, Sender, TrySendError};
use tokio::sync::{mpsc, oneshot};
use zimage::{
    control_parameters, edit_parameters, image_parameters, CancelHandle, ControlNames, EditRequest, EnhanceOptions,
    GenerateRequest, InputNames, Pipeline, Progress, Prompt, PromptEnhancer, ReferenceRecord,
};

use crate::error::ApiError;
use crate::metrics::{Metrics, ModelGauges};
use crate::output::{encode, OutputFormat};

/// What a job asks for beyond the SDK request.
pub struct JobSpec {
    pub work: Work,
    pub enhance: bool,
    pub format: OutputFormat,
    pub compression: Option<u8>,
    /// Upload names recorded in the PNG parameters.
    pub inputs: InputNames,
    /// The ControlNet and control map recorded in the PNG parameters (when the request has one).
    pub control: ControlNames,
}

/// What a job makes.
pub enum Work {
    /// Text-to-image, image-to-image, inpainting, ControlNet: `Pipeline::generate`.
    Generate(Box<GenerateRequest>),
    /// Instruction editing on an editing (Omni / Edit) package: `Pipeline::edit`, with the
    /// uploaded references' names and digests for the PNG parameters.
    Edit { request: EditRequest, references: Vec<ReferenceRecord> },
}

impl Work {
    /// The generation request (tests: a job that is not an edit).
    #[cfg(test)]
    pub fn into_generate(self) -> GenerateRequest {
        match self {
            Work::Generate(request) => *request,
            Work::Edit { .. } => panic!("an edit, not a generation"),
        }
    }

    /// Images asked for, steps, and the seed when one was given (for the request log; an
    /// edit's steps are resolved when it is prepared).
    pub fn count_steps_seed(&self) -> (u32, u32, Option<u64>) {
        match self {
            Work::Generate(r) => (r.count, r.steps, r.seed),
            Work::Edit { request, .. } => {
                let steps = request.steps.map_or(0, |s| u32::try_from(s).unwrap_or(u32::MAX));
                (request.count, steps, request.seed)
            }
        }
    }
}

/// One queued generation.
pub struct Job {
    pub id: String,
    pub spec: JobSpec,
    pub cancel: Arc<JobCancel>,
    /// Progress for a streaming request.
    pub progress: Option<mpsc::UnboundedSender<StepReport>>,
    pub reply: oneshot::Sender<Result<Finished, ApiError>>,
    pub enqueued: Instant,
}

/// A denoising step of a streaming request, with its previews encoded in the request's
/// output format when the step had some.
pub struct StepReport {
    pub step: usize,
    pub total_steps: usize,
    pub elapsed: std::time::Duration,
    pub partial_images: Vec<Vec<u8>>,
}

/// A finished generation: the encoded images and what the response and the log report.
pub struct Finished {
    pub images: Vec<Vec<u8>>,
    pub seed: u64,
    pub enhanced_prompt: Option<String>,
    /// Prompt tokens used (chat template included), reported as usage.
    pub prompt_tokens: usize,
    pub queue_wait: Duration,
    pub generation: Duration,
}

/// Cancellation of one job, from the request's side (client gone, timeout, shutdown). While
/// the job runs it holds its worker's cancel handle; the handle is set and cleared under the
/// lock, so a cancel can only reach the run of this job.
#[derive(Default)]
pub struct JobCancel {
    state: Mutex<CancelState>,
}

#[derive(Default)]
struct CancelState {
    cancelled: bool,
    running: Option<CancelHandle>,
}

impl JobCancel {
    fn lock(&self) -> std::sync::MutexGuard<'_, CancelState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn cancel(&self) {
        let mut state = self.lock();
        state.cancelled = true;
        if let Some(handle) = state.running.take() {
            handle.cancel();
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.lock().cancelled
    }

    /// The worker starts the job: false when it was cancelled while queued.
    fn start(&self, handle: CancelHandle) -> bool {
        let mut state = self.lock();
        if state.cancelled {
            return false;
        }
        state.running = Some(handle);
        true
    }

    fn finish(&self) {
        self.lock().running = None;
    }
}

/// Cancels its job when dropped unless disarmed: a request future dropped because its client
/// disconnected (or a stream the client stopped reading) stops the generation.
pub struct CancelOnDrop(pub Option<Arc<JobCancel>>);

impl CancelOnDrop {
    pub fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(cancel) = self.0.take() {
            cancel.cancel();
        }
    }
}

/// Longest a submit waits for an idle worker to take a job queued before it.
const IDLE_WORKER_WAIT: Duration = Duration::from_millis(100);

/// A model being served.
pub struct ModelPool {
    pub name: String,
    /// For checks before queueing (the workers' first pipeline; all load the same package).
    pub checker: Arc<Pipeline>,
    /// The first worker's prompt enhancer, for the same checks (the workers' hold the same).
    enhance_checker: Option<Arc<PromptEnhancer>>,
    enhance: EnhanceOptions,
    pub gauges: Arc<ModelGauges>,
    pub workers: usize,
    sender: Mutex<Option<Sender<Job>>>,
    /// The queue's other end, to take out the jobs whose clients went away when it is full.
    receiver: Receiver<Job>,
    metrics: Arc<Metrics>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Mean generation time of recent jobs (for Retry-After), milliseconds.
    recent_ms: Arc<Mutex<f64>>,
    /// Set by [`ModelPool::cancel_all`]: queued jobs are answered without running.
    abandon: Arc<AtomicBool>,
    handles: Vec<CancelHandle>,
}

impl ModelPool {
    /// Refuses what a worker would refuse before running anything: the SDK's checks of the
    /// request, its prompts tokenized (the caption limits), and for `enhance_prompt` the
    /// enhancer's (a model without one, a prompt that fills its context). A request refused
    /// here is a 400 before it is queued, not a queued job or, streamed, a 200 with an error
    /// event. It tokenizes (up to 1 MiB of text): call it where blocking is allowed.
    pub fn check(&self, spec: &JobSpec) -> Result<(), ApiError> {
        let sdk = |e: zimage::Error| ApiError::from_sdk(&e);
        let work = &spec.work;
        // The request's own checks first (no tokenizing), so that what fails after them is a
        // prompt, named by its field.
        match work {
            Work::Generate(request) => self.checker.check_request(request),
            Work::Edit { request, .. } => self.checker.check_edit(request),
        }
        .map_err(sdk)?;
        let negative_given = match work {
            Work::Generate(request) => request.negative_prompt.is_some(),
            Work::Edit { request, .. } => request.negative_prompt.is_some(),
        };
        if !spec.enhance {
            return self.check_prompts(work, Prompts::Both).map_err(|e| {
                // Which prompt: found on the error path only, by checking again without the
                // negative one.
                let negative = negative_given && self.check_prompts(work, Prompts::WithoutNegative).is_ok();
                sdk(e).with_param(if negative { "negative_prompt" } else { "prompt" })
            });
        }
        let Some(enhancer) = &self.enhance_checker else {
            return Err(ApiError::invalid(format!("the model '{}' has no prompt enhancer", self.name))
                .with_param("enhance_prompt"));
        };
        // The prompt the text encoder sees is the enhancer's answer: only the enhancer's
        // limits apply to the one given. The negative prompt is encoded as given (under
        // guidance): its caption checks run on a copy with an empty prompt.
        if negative_given {
            self.check_prompts(work, Prompts::NegativeOnly).map_err(|e| sdk(e).with_param("negative_prompt"))?;
        }
        let prompt = match work {
            Work::Generate(request) => match &request.prompt {
                Prompt::Text(text) => text.as_str(),
                Prompt::Embedded(_) => return Ok(()),
            },
            Work::Edit { request, .. } => request.prompt.as_str(),
        };
        enhancer.check(prompt, &self.enhance).map_err(|e| sdk(e).with_param("prompt"))
    }

    /// The SDK's caption checks (tokenizing) of `which` of the request's prompts; a copy of the
    /// request is made for all but [`Prompts::Both`].
    fn check_prompts(&self, work: &Work, which: Prompts) -> zimage::Result<()> {
        match work {
            Work::Generate(request) => match which {
                Prompts::Both => self.checker.check_request_prompts(request),
                Prompts::WithoutNegative => {
                    let mut probe = (**request).clone();
                    probe.guidance_scale = 0.0; // the negative prompt is used under guidance only
                    self.checker.check_request_prompts(&probe)
                }
                Prompts::NegativeOnly => {
                    let mut probe = (**request).clone();
                    probe.prompt = Prompt::Text(String::new());
                    self.checker.check_request_prompts(&probe)
                }
            },
            Work::Edit { request, .. } => match which {
                Prompts::Both => self.checker.check_edit_prompts(request),
                Prompts::WithoutNegative => {
                    let mut probe = request.clone();
                    probe.negative_prompt = None;
                    self.checker.check_edit_prompts(&probe)
                }
                Prompts::NegativeOnly => {
                    let mut probe = request.clone();
                    probe.prompt = String::new();
                    self.checker.check_edit_prompts(&probe)
                }
            },
        }
    }
}

/// Which of a request's prompts [`ModelPool::check_prompts`] checks.
#[derive(Clone, Copy)]
enum Prompts {
    Both,
    WithoutNegative,
    /// The negative prompt, with the prompt emptied (one the enhancer will replace).
    NegativeOnly,
}

pub enum SubmitError {
    Full,
    Closed,
}

/// A loaded worker: its pipeline and its prompt enhancer (the package's, or `--enhancer`'s).
pub struct LoadedWorker {
    pub pipeline: Arc<Pipeline>,
    pub enhancer: Option<Arc<PromptEnhancer>>,
}

impl ModelPool {
    /// Starts one thread per loaded worker on a queue of `max_queue` waiting jobs.
    pub fn start(
        name: String,
        loaded: Vec<LoadedWorker>,
        max_queue: usize,
        enhance: EnhanceOptions,
        metrics: Arc<Metrics>,
    ) -> ModelPool {
        let (sender, receiver) = crossbeam_channel::bounded::<Job>(max_queue);
        let gauges = Arc::new(ModelGauges::default());
        let recent_ms = Arc::new(Mutex::new(0.0));
        let checker = Arc::clone(&loaded[0].pipeline);
        let enhance_checker = loaded[0].enhancer.clone();
        let workers = loaded.len();
        let abandon = Arc::new(AtomicBool::new(false));
        let handles = loaded.iter().map(|w| w.pipeline.cancel_handle()).collect();
        let threads = loaded
            .into_iter()
            .enumerate()
            .map(|(index, worker)| {
                let receiver = receiver.clone();
                let context = WorkerContext {
                    model: name.clone(),
                    gauges: Arc::clone(&gauges),
                    metrics: Arc::clone(&metrics),
                    recent_ms: Arc::clone(&recent_ms),
                    abandon: Arc::clone(&abandon),
                    enhance: enhance.clone(),
                };
                gauges.workers_alive.fetch_add(1, Ordering::SeqCst);
                std::thread::Builder::new()
                    .name(format!("{name}-worker-{index}"))
                    .spawn(move || worker_loop(worker, receiver, context))
                    .expect("spawn a worker thread")
            })
            .collect();
        ModelPool {
            name,
            checker,
            enhance_checker,
            enhance: enhance.clone(),
            gauges,
            workers,
            sender: Mutex::new(Some(sender)),
            receiver,
            metrics,
            threads: Mutex::new(threads),
            recent_ms,
            abandon,
            handles,
        }
    }

    /// Queues `job`, or refuses it at once when the queue is full of jobs whose clients still
    /// wait.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        let sender = self.sender.lock().unwrap_or_else(|p| p.into_inner());
        let Some(sender) = sender.as_ref() else { return Err(SubmitError::Closed) };
        // Counted before the send, so a worker that takes the job at once never sees -1.
        self.gauges.queued.fetch_add(1, Ordering::SeqCst);
        let sent = match sender.try_send(job) {
            // Jobs whose clients went away keep their places until a worker reaches them:
            // clients that connect and leave would keep the queue full for everyone else.
            Err(TrySendError::Full(job)) => {
                self.drop_cancelled(sender);
                match sender.try_send(job) {
                    // Full only until an idle worker takes the job before it (two requests at
                    // once, one worker, a queue of one): a moment's wait, not a 429.
                    Err(TrySendError::Full(job)) if self.idle_worker() => {
                        sender.send_timeout(job, IDLE_WORKER_WAIT).map_err(|e| match e {
                            SendTimeoutError::Timeout(job) => TrySendError::Full(job),
                            SendTimeoutError::Disconnected(job) => TrySendError::Disconnected(job),
                        })
                    }
                    sent => sent,
                }
            }
            sent => sent,
        };
        sent.map_err(|e| {
            self.gauges.queued.fetch_sub(1, Ordering::SeqCst);
            match e {
                TrySendError::Full(_) => SubmitError::Full,
                TrySendError::Disconnected(_) => SubmitError::Closed,
            }
        })
    }

    /// Whether the queue has a place (after dropping the jobs whose clients went away): checked
    /// before a request's prompts are tokenized, so that a full queue answers 429 at once.
    pub fn has_room(&self) -> bool {
        // A job that waits only until an idle worker takes it (two requests at once, one
        // worker, a queue of one) is not a full queue: submit decides then.
        if !self.receiver.is_full() || self.idle_worker() {
            return true;
        }
        let sender = self.sender.lock().unwrap_or_else(|p| p.into_inner());
        match sender.as_ref() {
            Some(sender) => {
                self.drop_cancelled(sender);
                !self.receiver.is_full()
            }
            None => true, // closed: submit says so (503)
        }
    }

    /// Whether a live worker runs no job: it takes the next queued one at once.
    fn idle_worker(&self) -> bool {
        self.gauges.in_flight.load(Ordering::SeqCst) < self.gauges.workers_alive.load(Ordering::SeqCst)
    }

    /// Takes the waiting jobs out of the queue and puts back, in order, those whose clients
    /// still wait; the cancelled ones are answered here instead of by a worker. The caller
    /// holds the sender's lock: nothing is queued meanwhile (workers may still take jobs), so
    /// the ones put back always have room.
    fn drop_cancelled(&self, sender: &Sender<Job>) {
        let waiting: Vec<Job> = self.receiver.try_iter().collect();
        for job in waiting {
            let refused = if job.cancel.is_cancelled() {
                Some((job, ApiError::cancelled()))
            } else {
                sender.try_send(job).err().map(|e| (e.into_inner(), ApiError::internal("the queue lost a job")))
            };
            if let Some((job, error)) = refused {
                self.gauges.queued.fetch_sub(1, Ordering::SeqCst);
                // Left the queue, as a worker records it.
                self.metrics.stage(&self.name, "queue_wait", job.enqueued.elapsed());
                let _ = job.reply.send(Err(error));
            }
        }
    }

    /// Seconds a refused client should wait: the queue ahead of it at the recent pace.
    pub fn retry_after(&self) -> u64 {
        let mean_ms = *self.recent_ms.lock().unwrap_or_else(|p| p.into_inner());
        let waiting = self.gauges.queued.load(Ordering::Relaxed).max(1) as f64;
        ((mean_ms / 1000.0) * waiting / self.workers.max(1) as f64).ceil().max(1.0) as u64
    }

    /// Queued and running jobs.
    pub fn busy(&self) -> i64 {
        self.gauges.queued.load(Ordering::SeqCst) + self.gauges.in_flight.load(Ordering::SeqCst)
    }

    /// Cancels the running generations and answers the queued ones without running them
    /// (the end of a drain that ran out of time).
    pub fn cancel_all(&self) {
        self.abandon.store(true, Ordering::SeqCst);
        for handle in &self.handles {
            handle.cancel();
        }
    }

    /// Closes the queue (workers finish what is queued, then end) and waits for them.
    pub fn close_and_join(&self) {
        self.sender.lock().unwrap_or_else(|p| p.into_inner()).take();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for thread in threads {
            let _ = thread.join();
        }
    }
}

struct WorkerContext {
    model: String,
    abandon: Arc<AtomicBool>,
    enhance: EnhanceOptions,
    gauges: Arc<ModelGauges>,
    metrics: Arc<Metrics>,
    recent_ms: Arc<Mutex<f64>>,
}

fn worker_loop(worker: LoadedWorker, receiver: Receiver<Job>, context: WorkerContext) {
    // Ends when the queue is closed and empty (shutdown).
    while let Ok(job) = receiver.recv() {
        context.gauges.queued.fetch_sub(1, Ordering::SeqCst);
        let queue_wait = job.enqueued.elapsed();
        context.metrics.stage(&context.model, "queue_wait", queue_wait);
        if context.abandon.load(Ordering::SeqCst) {
            // The drain ran out of time: a client still waiting hears that the server is
            // shutting down (not that it cancelled).
            job.cancel.cancel();
            let _ = job.reply.send(Err(ApiError::draining()));
            continue;
        }
        if !job.cancel.start(worker.pipeline.cancel_handle()) {
            let _ = job.reply.send(Err(ApiError::cancelled()));
            continue;
        }
        context.gauges.in_flight.fetch_add(1, Ordering::SeqCst);
        tracing::debug!(id = %job.id, model = %context.model, queue_ms = queue_wait.as_millis() as u64, "generation starts");
        let started = Instant::now();
        let cancel = Arc::clone(&job.cancel);
        let result =
            std::panic::catch_unwind(AssertUnwindSafe(|| run(&worker, &job, &context))).unwrap_or_else(|panic| {
                Err(ApiError::internal(format!("the generation panicked: {}", panic_text(&panic))))
            });
        cancel.finish();
        let result = match result {
            // Cancelled by the end of a drain that ran out of time (ModelPool::cancel_all).
            Err(e) if e.code == Some("cancelled") && context.abandon.load(Ordering::SeqCst) => {
                Err(ApiError::draining())
            }
            result => result,
        };
        context.gauges.in_flight.fetch_sub(1, Ordering::SeqCst);
        let generation = started.elapsed();
        context.metrics.stage(&context.model, "generation", generation);
        if result.is_ok() {
            let mut mean = context.recent_ms.lock().unwrap_or_else(|p| p.into_inner());
            let ms = generation.as_secs_f64() * 1000.0;
            *mean = if *mean == 0.0 { ms } else { 0.8 * *mean + 0.2 * ms };
        }
        let result = result.map(|(images, g)| Finished {
            images,
            seed: g.seed,
            prompt_tokens: g.prompt_tokens.ids.len(),
            enhanced_prompt: g.enhanced_prompt,
            queue_wait,
            generation,
        });
        let _ = job.reply.send(result);
    }
    context.gauges.workers_alive.fetch_sub(1, Ordering::SeqCst);
}

fn run(
    worker: &LoadedWorker,
    job: &Job,
    context: &WorkerContext,
) -> Result<(Vec<Vec<u8>>, zimage::Generation), ApiError> {
    let spec = &job.spec;
    let mut on_step = |p: &Progress| {
        if let Some(progress) = &job.progress {
            // Encoded here, on the worker's thread, not on the async runtime's. A preview that
            // fails to encode is left out (the final images report such a failure).
            let partial_images = p
                .preview
                .iter()
                .flatten()
                .filter_map(|image| encode(image, spec.format, spec.compression, &[]).ok())
                .collect();
            let report = StepReport { step: p.step, total_steps: p.total_steps, elapsed: p.elapsed, partial_images };
            let _ = progress.send(report);
        }
        !job.cancel.is_cancelled()
    };
    let pipeline = &worker.pipeline;
    let enhancer = match (&worker.enhancer, spec.enhance) {
        (None, true) => return Err(ApiError::invalid("this model has no prompt enhancer").with_param("enhance_prompt")),
        (enhancer, enhance) => enhancer.as_ref().filter(|_| enhance),
    };
    let generation = match (&spec.work, enhancer) {
        (Work::Generate(r), Some(e)) => pipeline.generate_enhanced(e, &context.enhance, r, Some(&mut on_step)),
        (Work::Generate(r), None) => pipeline.generate(r, Some(&mut on_step)),
        (Work::Edit { request, .. }, Some(e)) => {
            pipeline.edit_enhanced(e, &context.enhance, request, Some(&mut on_step))
        }
        (Work::Edit { request, .. }, None) => pipeline.edit(request, Some(&mut on_step)),
    }
    .map_err(|e| ApiError::from_sdk(&e))?;
    let t = &generation.timings;
    for (stage, time) in [
        ("tokenize", t.tokenize),
        ("text_encode", t.text_encode),
        ("denoise", t.denoise_steps.iter().sum()),
        ("vae_decode", t.vae_decode),
    ] {
        context.metrics.stage(&context.model, stage, time);
    }
    let encoding = Instant::now();
    let images = generation
        .images
        .iter()
        .enumerate()
        .map(|(index, image)| {
            let dir = pipeline.package_dir();
            let parameters = match &spec.work {
                Work::Generate(r) => {
                    let mut parameters = image_parameters(r, &generation, index, dir, &pipeline.loras(), &spec.inputs);
                    parameters.extend(control_parameters(r, &spec.control));
                    parameters
                }
                Work::Edit { request, references } => {
                    let defaults = &pipeline.manifest().edit.as_ref().expect("an editing package").defaults;
                    edit_parameters(request, &generation, index, dir, defaults, references, &pipeline.loras())
                }
            };
            encode(image, spec.format, spec.compression, &parameters)
        })
        .collect::<Result<Vec<_>, _>>()?;
    context.metrics.stage(&context.model, "encode_output", encoding.elapsed());
    Ok((images, generation))
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
