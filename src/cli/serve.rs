//! `albef serve`: a local web page over an index — text search with a thumbnail grid, the photo
//! large, questions about it (VQA answer ranking) and the Grad-CAM of the query on it — and the
//! JSON API behind it. Only HTTP lives here; the model work is `tasks::search`, `tasks::vqa` and
//! `tasks::gradcam`.
//!
//! Images are served by their row in the index, never by a path from the client. Each model lives
//! on a worker thread of its own (the models are not `Send`: their parameter store is shared
//! with `Rc`) behind a bounded queue: a search does not wait for a Grad-CAM, and pages, images,
//! thumbnails and health never wait for a model. A full queue answers 503.

use albef::data::transform::RgbImage;
use albef::tasks::gradcam::Grounder;
use albef::tasks::search::{Query as SearchQuery, SearchOptions, Searcher};
use albef::tasks::vqa::Answerer;
use anyhow::{bail, Context, Result};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::{header, StatusCode, Uri};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Args;
use serde::Deserialize;
use serde_json::{json, Value};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The page, embedded in the binary.
const PAGE: &str = include_str!("serve.html");
/// Request bodies (JSON of an id and a sentence) larger than this are refused (413).
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Queries, questions and Grad-CAM texts longer than this (in characters) are refused (400).
pub const MAX_TEXT_CHARS: usize = 256;
/// The most results one search returns.
pub const MAX_RESULTS: usize = 200;
/// Requests that may wait for one model; more are answered 503.
const QUEUE: usize = 64;
/// Largest side of a thumbnail and of a Grad-CAM picture, in pixels.
const THUMB_SIDE: u32 = 256;
const HEATMAP_SIDE: u32 = 512;

#[derive(Args)]
pub struct ServeArgs {
    /// The index `albef index` wrote.
    #[arg(long)]
    index: PathBuf,
    /// A VQA checkpoint, for questions about a photo (with --vqa-config).
    #[arg(long = "vqa-checkpoint")]
    vqa_checkpoint: Option<PathBuf>,
    /// The VQA YAML that checkpoint was trained with (sizes the model, names the answer list).
    #[arg(long = "vqa-config")]
    vqa_config: Option<PathBuf>,
    /// A grounding checkpoint for the Grad-CAM heat maps (default: the index's retrieval
    /// checkpoint, whose ITM head gives them too).
    #[arg(long = "grounding-checkpoint")]
    grounding_checkpoint: Option<PathBuf>,
    /// The YAML that sizes the grounding model (default: the index's config).
    #[arg(long = "grounding-config")]
    grounding_config: Option<PathBuf>,
    /// BERT layer whose cross-attention gives the Grad-CAM (default 8, or the last of a smaller model).
    #[arg(long = "block_num", alias = "block-num")]
    block_num: Option<usize>,
    /// Re-rank the ITC top K of each search by the ITM head.
    #[arg(long)]
    rerank: Option<usize>,
    #[command(flatten)]
    model: super::search::IndexModelArgs,
    /// The address to listen on: loopback by default, so that only this machine sees the photos.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// The port (0: any free one; the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// A job for a model worker.
type Job<M> = Box<dyn FnOnce(&M) + Send>;

/// A thread that owns one model and runs the jobs sent to it in order.
struct Worker<M> {
    jobs: std::sync::mpsc::SyncSender<Job<M>>,
    name: &'static str,
}

impl<M: 'static> Worker<M> {
    /// Starts the thread and builds the model on it with `load`, which also returns what the
    /// server needs to know of it (`R`); a failed load is returned here.
    fn start<R: Send + 'static>(
        name: &'static str,
        load: impl FnOnce() -> Result<(M, R)> + Send + 'static,
    ) -> Result<(Self, R)> {
        let (jobs, queue) = std::sync::mpsc::sync_channel::<Job<M>>(QUEUE);
        let (ready_tx, ready) = std::sync::mpsc::channel();
        std::thread::Builder::new().name(format!("albef-{name}")).spawn(move || match load() {
            Ok((model, info)) => {
                let _ = ready_tx.send(Ok(info));
                for job in queue {
                    job(&model);
                }
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        })?;
        let info = ready.recv().context("the model thread stopped while loading")??;
        Ok((Self { jobs, name }, info))
    }

    /// Runs `f` on the model, waiting (off the executor) for its turn.
    async fn call<T: Send + 'static>(&self, f: impl FnOnce(&M) -> Result<T> + Send + 'static) -> ApiResult<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job<M> = Box::new(move |m| {
            let _ = tx.send(f(m));
        });
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(std::sync::mpsc::TrySendError::Full(_)) => {
                return Err(ApiError(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the {} model has {QUEUE} requests waiting: try again shortly", self.name),
                ))
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                return Err(internal(anyhow::anyhow!("the {} model thread stopped", self.name)))
            }
        }
        rx.await.map_err(|_| internal(anyhow::anyhow!("the {} model thread stopped", self.name)))?.map_err(internal)
    }
}

struct App {
    search: Worker<Searcher>,
    /// The indexed files, by row (the image ids).
    paths: Vec<String>,
    index: PathBuf,
    checkpoint: PathBuf,
    rerank: Option<usize>,
    vqa: Option<Worker<Answerer>>,
    gradcam: Worker<Grounder>,
    grounding_checkpoint: PathBuf,
}

/// An error answered as `{"error": message}` with its status.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

type ApiResult<T> = std::result::Result<T, ApiError>;

impl App {
    fn images(&self) -> usize {
        self.paths.len()
    }

    fn empty_index(&self) -> ApiError {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the index {} holds no images: run `albef index --images DIR --index {}` first",
                self.index.display(),
                self.index.display()
            ),
        )
    }

    /// The indexed file of image `id` (an index row).
    fn path_of(&self, id: u64) -> ApiResult<&Path> {
        let n = self.images();
        let row = usize::try_from(id).ok().filter(|&r| r < n);
        let Some(row) = row else {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no image with id {id} in the index (ids are 0..{n})"),
            ));
        };
        let path = Path::new(&self.paths[row]);
        if !path.is_file() {
            return Err(ApiError(
                StatusCode::GONE,
                format!("image {id} ({}) is no longer on disk: re-run `albef index`", path.display()),
            ));
        }
        Ok(path)
    }
}

fn internal(e: anyhow::Error) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
}

/// A required, bounded, non-blank text parameter.
fn text_param(value: Option<&str>, name: &str) -> ApiResult<String> {
    let v = value.map(str::trim).unwrap_or_default();
    if v.is_empty() {
        return Err(bad_request(format!("missing parameter {name:?} (a non-empty text)")));
    }
    let chars = v.chars().count();
    if chars > MAX_TEXT_CHARS {
        return Err(bad_request(format!("{name:?} is {chars} characters long; at most {MAX_TEXT_CHARS} are accepted")));
    }
    Ok(v.to_string())
}

fn json_body<T>(body: std::result::Result<Json<T>, JsonRejection>) -> ApiResult<T> {
    match body {
        Ok(Json(v)) => Ok(v),
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is too large (at most {MAX_BODY_BYTES} bytes)"),
        )),
        Err(e) => Err(ApiError(e.status(), e.body_text())),
    }
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn health(State(app): State<Arc<App>>) -> Json<Value> {
    let mut messages = Vec::new();
    if app.images() == 0 {
        messages.push(app.empty_index().1);
    }
    if app.vqa.is_none() {
        messages.push("no VQA model: start with --vqa-checkpoint C --vqa-config VQA.yaml to ask questions".to_string());
    }
    Json(json!({
        "status": "ok",
        "index": app.index.display().to_string(),
        "images": app.images(),
        "checkpoint": app.checkpoint.display().to_string(),
        "rerank": app.rerank,
        "vqa": app.vqa.is_some(),
        "gradcam": true,
        "gradcam_checkpoint": app.grounding_checkpoint.display().to_string(),
        "limits": {"max_text_chars": MAX_TEXT_CHARS, "max_body_bytes": MAX_BODY_BYTES, "max_results": MAX_RESULTS},
        "messages": messages,
    }))
}

#[derive(Deserialize)]
struct SearchParams {
    q: Option<String>,
    k: Option<String>,
}

async fn search(
    State(app): State<Arc<App>>,
    params: std::result::Result<Query<SearchParams>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(p) = params.map_err(|e| bad_request(e.body_text()))?;
    let q = text_param(p.q.as_deref(), "q")?;
    let k = match p.k.as_deref() {
        None | Some("") => 12,
        Some(k) => k
            .parse::<usize>()
            .ok()
            .filter(|k| (1..=MAX_RESULTS).contains(k))
            .ok_or_else(|| bad_request(format!("k={k:?}: the number of results, 1 to {MAX_RESULTS}")))?,
    };
    if app.images() == 0 {
        return Err(app.empty_index());
    }
    let query = q.clone();
    let rerank = app.rerank;
    let hits = app.search.call(move |s| s.search(&SearchQuery::Text(query), k, rerank)).await?;
    let results: Vec<Value> = hits
        .iter()
        .map(|h| {
            let name = Path::new(&h.path).file_name().map_or(h.path.clone(), |n| n.to_string_lossy().into_owned());
            json!({
                "id": h.row, "rank": h.rank, "score": h.score, "itc": h.itc, "itm": h.itm,
                "name": name, "path": h.path,
                "image": format!("/api/image/{}", h.row), "thumbnail": format!("/api/thumbnail/{}", h.row),
            })
        })
        .collect();
    Ok(Json(json!({"query": q, "k": k, "results": results})))
}

fn image_id(raw: &str) -> ApiResult<u64> {
    raw.parse::<u64>()
        .map_err(|_| bad_request(format!("{raw:?} is not an image id (a number from the search results)")))
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("png") => "image/png",
        _ => "image/jpeg",
    }
}

async fn image(State(app): State<Arc<App>>, UrlPath(raw): UrlPath<String>) -> ApiResult<Response> {
    let path = app.path_of(image_id(&raw)?)?.to_path_buf();
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|e| internal(anyhow::Error::new(e).context(format!("cannot read {}", path.display()))))?;
    Ok(([(header::CONTENT_TYPE, content_type(&path)), (header::CACHE_CONTROL, "max-age=300")], bytes).into_response())
}

fn encode_jpeg(img: &image::RgbImage) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Jpeg)?;
    Ok(out)
}

async fn thumbnail(State(app): State<Arc<App>>, UrlPath(raw): UrlPath<String>) -> ApiResult<Response> {
    let path = app.path_of(image_id(&raw)?)?.to_path_buf();
    let bytes = tokio::task::spawn_blocking(move || {
        let img = RgbImage::open(&path)?;
        let full = image::RgbImage::from_raw(img.width as u32, img.height as u32, img.data)
            .context("an RGB buffer of its size")?;
        // Aspect kept; a photo smaller than a thumbnail is not enlarged.
        let (w, h) = (full.width(), full.height());
        let scale = (THUMB_SIDE as f64 / w.max(h) as f64).min(1.0);
        let (tw, th) = (((w as f64 * scale).round() as u32).max(1), ((h as f64 * scale).round() as u32).max(1));
        encode_jpeg(&image::imageops::thumbnail(&full, tw, th))
    })
    .await
    .map_err(|e| internal(e.into()))?
    .map_err(internal)?;
    Ok(([(header::CONTENT_TYPE, "image/jpeg"), (header::CACHE_CONTROL, "max-age=300")], bytes).into_response())
}

#[derive(Deserialize)]
struct VqaRequest {
    id: u64,
    question: Option<String>,
}

async fn vqa(
    State(app): State<Arc<App>>,
    body: std::result::Result<Json<VqaRequest>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let req = json_body(body)?;
    let question = text_param(req.question.as_deref(), "question")?;
    let Some(worker) = &app.vqa else {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "no VQA model loaded: start albef serve with --vqa-checkpoint C --vqa-config VQA.yaml".into(),
        ));
    };
    let path = app.path_of(req.id)?.to_path_buf();
    let q = question.clone();
    let answers = worker.call(move |answerer| answerer.answer(&RgbImage::open(&path)?, &q, 5)).await?;
    Ok(Json(json!({"id": req.id, "question": question, "answers": answers})))
}

#[derive(Deserialize)]
struct GradcamRequest {
    id: u64,
    text: Option<String>,
}

async fn gradcam(
    State(app): State<Arc<App>>,
    body: std::result::Result<Json<GradcamRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let req = json_body(body)?;
    let text = text_param(req.text.as_deref(), "text")?;
    let path = app.path_of(req.id)?.to_path_buf();
    let png = app
        .gradcam
        .call(move |grounder| {
            let pic = grounder.heatmap(&RgbImage::open(&path)?, &text, HEATMAP_SIDE)?;
            let mut out = Vec::new();
            pic.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)?;
            Ok(out)
        })
        .await?;
    Ok(([(header::CONTENT_TYPE, "image/png")], png).into_response())
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("no such page: {}", uri.path()))
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/health", get(health))
        .route("/api/search", get(search))
        .route("/api/image/{id}", get(image))
        .route("/api/thumbnail/{id}", get(thumbnail))
        .route("/api/vqa", post(vqa))
        .route("/api/gradcam", post(gradcam))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(app)
}

pub fn run(a: ServeArgs) -> Result<()> {
    let device = super::device(&a.device)?;
    let opts = SearchOptions {
        index: a.index.clone(),
        checkpoint: a.model.checkpoint.clone(),
        config: a.model.config.clone(),
        text_encoder: a.model.text_encoder.clone(),
        device: device.clone(),
        top: 10,
        rerank: a.rerank,
    };
    let (search, (paths, meta)) = Worker::start("search", move || {
        let searcher = Searcher::open(&opts)?;
        let info = (searcher.index.paths.clone(), searcher.index.meta.clone());
        Ok((searcher, info))
    })?;
    let text_encoder = a.model.text_encoder.unwrap_or(meta.text_encoder);
    let vqa = match (a.vqa_checkpoint, a.vqa_config) {
        (Some(c), Some(cfg)) => {
            let (te, dev) = (text_encoder.clone(), device.clone());
            let load = move || {
                let answerer = Answerer::load(&cfg, &c, &te, &dev)
                    .with_context(|| format!("cannot load the VQA model {}", c.display()))?;
                Ok((answerer, ()))
            };
            Some(Worker::start("VQA", load)?.0)
        }
        (None, None) => None,
        (Some(_), None) => bail!("--vqa-checkpoint needs --vqa-config VQA.yaml: the config it was trained with (it sizes the model and names the answer list)"),
        (None, Some(_)) => bail!("--vqa-config needs --vqa-checkpoint"),
    };
    let checkpoint = a.model.checkpoint.clone().unwrap_or(meta.checkpoint);
    let grounding_checkpoint = a.grounding_checkpoint.unwrap_or_else(|| checkpoint.clone());
    let grounding_config = a.grounding_config.or(a.model.config).unwrap_or(meta.config);
    let (gc, block) = (grounding_checkpoint.clone(), a.block_num);
    let (gradcam, ()) = Worker::start("Grad-CAM", move || {
        let grounder = Grounder::load(&grounding_config, &gc, &text_encoder, &device, block)
            .with_context(|| format!("cannot load the Grad-CAM model {}", gc.display()))?;
        Ok((grounder, ()))
    })?;
    let app = Arc::new(App {
        search,
        paths,
        index: a.index,
        checkpoint,
        rerank: a.rerank,
        vqa,
        gradcam,
        grounding_checkpoint,
    });
    if !a.host.is_loopback() {
        eprintln!("warning: listening on {}: anyone who can reach this machine can see the indexed photos", a.host);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host, a.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", a.host, a.port))?;
        let addr = listener.local_addr()?;
        println!("albef serve: http://{addr}/ ({} images in {})", app.images(), app.index.display());
        std::io::stdout().flush()?;
        axum::serve(listener, router(app))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        Ok(())
    })
}
