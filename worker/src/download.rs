//! `dsv3-worker download`: a checkpoint from a Hugging Face hub repository into a model
//! directory, as the other roles read it with `--model`.
//!
//! The hub client (`hf-hub`) resolves the revision, follows the hub's redirects and appends to
//! a file's partial copy. Around it: the revision is pinned to one commit for the whole run,
//! a broken transfer is retried from where it stopped (in this run or a later one), every file
//! is checked against the hub's checksum (the LFS sha256, or the git blob id of a small file)
//! before it takes its place, files already in place at the same checksum are skipped, only
//! the files the role reads are fetched, and one run at a time fills a directory.

mod selection;

use crate::roles::plan_for;
use anyhow::{bail, Context, Result};
use clap::Args;
use hf_hub::api::sync::{Api, ApiBuilder, ApiError, ApiRepo};
use hf_hub::api::Progress;
use hf_hub::{Repo, RepoType};
use selection::{FilesFor, RankTensors, ROUTER_FILES, SINGLE_FILE};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Args, Clone)]
pub struct DownloadArgs {
    /// Hub repository, e.g. deepseek-ai/DeepSeek-V3-0324.
    #[arg(long)]
    repo: String,
    /// Branch, tag or commit; a branch is pinned to its current commit for the whole download.
    #[arg(long, default_value = "main")]
    revision: String,
    /// The model directory to fill (what the other roles read with --model); its `.router/`
    /// holds links to the files the router reads, for a mount of that directory alone.
    #[arg(long)]
    dir: PathBuf,
    /// Which role's files to fetch.
    #[arg(long = "for", value_enum, default_value_t = FilesFor::All)]
    files_for: FilesFor,
    /// With --for expert or attention: the rank whose experts to fetch [default: 0].
    #[arg(long)]
    rank: Option<u32>,
    /// With --for expert or attention: the placement plan (JSON); default: round-robin over
    /// --expert-shards shards.
    #[arg(long)]
    placement: Option<PathBuf>,
    /// With --for expert or attention and no --placement: the expert shards of the round-robin
    /// deal [default: 1].
    #[arg(long)]
    expert_shards: Option<usize>,
    /// Files transferred at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    parallel: u16,
    /// Attempts per file after a broken transfer, each resuming where the last one stopped.
    #[arg(long, default_value_t = 8)]
    retries: u32,
    /// The hub's address.
    #[arg(long, env = "HF_ENDPOINT", default_value = "https://huggingface.co")]
    endpoint: String,
    /// Access token, for gated or private repositories.
    #[arg(long, env = "HF_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

/// What the directory holds, written after each verified file: the next run skips those whose
/// checksum the hub still reports.
const MANIFEST: &str = ".dsv3-download.json";
/// The router's view of the directory (see `link_router_view`).
pub(crate) const ROUTER_VIEW: &str = ".router";
/// The hub client's cache (partial transfers and locks), inside the directory so that a
/// finished file is renamed into place, never copied.
const CLIENT_CACHE: &str = ".cache/huggingface";
/// Held (an exclusive lock) for a whole run: two runs into one directory would race on the
/// partial files and the manifest, so the second waits for the first.
const LOCK_FILE: &str = ".dsv3-download.lock";

#[derive(Serialize, Deserialize, Default)]
struct Manifest {
    repo: String,
    commit: String,
    /// File name -> the hub's checksum of the copy in the directory.
    files: BTreeMap<String, ManifestEntry>,
}

#[derive(Serialize, Deserialize, Clone, PartialEq)]
struct ManifestEntry {
    etag: String,
    size: u64,
}

pub fn run(args: DownloadArgs) -> Result<()> {
    if matches!(args.files_for, FilesFor::Router | FilesFor::All) {
        // A rank's options would select nothing here: refuse them rather than ignore them.
        let rank_options = [
            ("--rank", args.rank.is_some()),
            ("--placement", args.placement.is_some()),
            ("--expert-shards", args.expert_shards.is_some()),
        ];
        if let Some((option, _)) = rank_options.iter().find(|(_, given)| *given) {
            bail!(
                "{option} applies to --for expert or attention, not --for {}",
                format!("{:?}", args.files_for).to_lowercase()
            );
        }
    }
    std::fs::create_dir_all(&args.dir).with_context(|| format!("cannot create {}", args.dir.display()))?;
    let _lock = lock_directory(&args.dir)?;
    let hub = Hub::connect(&args)?;
    let started = Instant::now();
    let available: BTreeSet<String> = hub
        .files
        .iter()
        .filter(|f| selection::is_model_file(f))
        .cloned()
        .collect();
    if !available.contains("config.json") {
        bail!(
            "{} at {} has no config.json: not a model repository",
            args.repo,
            hub.commit
        );
    }

    // The small files first: the index and the config decide which shards a rank needs.
    let small: Vec<String> = ROUTER_FILES
        .iter()
        .filter(|f| available.contains(**f))
        .map(|f| f.to_string())
        .collect();
    let mut summary = hub.fetch(&args, &small)?;
    if args.files_for != FilesFor::Router {
        let shards = shards_needed(&args, &available)?;
        summary.add(hub.fetch(&args, &shards.into_iter().collect::<Vec<_>>())?);
    }
    link_router_view(&args.dir, &small)?;
    eprintln!(
        "{}@{} ({:?} files) in {}: {} fetched ({}), {} already in place, all verified, {:.1}s",
        args.repo,
        short(&hub.commit),
        args.files_for,
        args.dir.display(),
        summary.fetched,
        gigabytes(summary.fetched_bytes),
        summary.present,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Takes the directory's lock, waiting (and saying so) while another run holds it.
fn lock_directory(dir: &Path) -> Result<std::fs::File> {
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => return Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            eprintln!(
                "another download is filling {}; waiting for it to finish",
                dir.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()));
        }
    }
    file.lock().with_context(|| format!("cannot lock {}", path.display()))?;
    Ok(file)
}

/// `.router/` in the model directory: links to the files the router reads, so a router pod
/// can mount that directory alone (a volume's subPath) and never see the weights.
fn link_router_view(dir: &Path, files: &[String]) -> Result<()> {
    let view = dir.join(ROUTER_VIEW);
    std::fs::create_dir_all(&view).with_context(|| format!("cannot create {}", view.display()))?;
    for name in files {
        let link = view.join(name);
        // A file replaced in the directory is a new inode: the old link would keep the old one.
        let _ = std::fs::remove_file(&link);
        std::fs::hard_link(dir.join(name), &link).with_context(|| format!("cannot link {}", link.display()))?;
    }
    Ok(())
}

/// The shard files of the role (the small files already in the directory).
fn shards_needed(args: &DownloadArgs, available: &BTreeSet<String>) -> Result<BTreeSet<String>> {
    let index = args.dir.join(dsv3_engine::INDEX_FILE);
    // The hub's listing decides the form: an index left in the directory by an earlier revision
    // must not choose the shards of this one.
    if !available.contains(dsv3_engine::INDEX_FILE) {
        if available.contains(SINGLE_FILE) {
            if args.files_for != FilesFor::All {
                rank_tensors(args)?; // the rank must be in the plan even when one file holds all
            }
            return Ok([SINGLE_FILE.to_string()].into());
        }
        bail!(
            "{} has neither {} nor {SINGLE_FILE}",
            args.repo,
            dsv3_engine::INDEX_FILE
        );
    }
    let text = std::fs::read_to_string(&index).with_context(|| format!("cannot read {}", index.display()))?;
    let weight_map = dsv3_engine::weight_map(&text).with_context(|| format!("in {}", index.display()))?;
    let rank = match args.files_for {
        FilesFor::All => None,
        FilesFor::Attention | FilesFor::Expert => Some(rank_tensors(args)?),
        FilesFor::Router => unreachable!("the router fetches no shard"),
    };
    let shards = match &rank {
        None => weight_map.values().cloned().collect(),
        Some(rank) => selection::shards_for(&weight_map, rank),
    };
    if let Some(missing) = shards.iter().find(|f| !available.contains(*f)) {
        bail!(
            "the index of {} names {missing}, which the repository does not hold",
            args.repo
        );
    }
    Ok(shards)
}

fn rank_tensors(args: &DownloadArgs) -> Result<RankTensors> {
    let config_path = args.dir.join("config.json");
    let config =
        std::fs::read_to_string(&config_path).with_context(|| format!("cannot read {}", config_path.display()))?;
    let num_experts = selection::routed_experts(&config).with_context(|| format!("in {}", config_path.display()))?;
    let plan = plan_for(&args.placement, num_experts, args.expert_shards.unwrap_or(1))?;
    let rank = args.rank.unwrap_or(0);
    let experts = match args.files_for {
        FilesFor::Expert => plan.shards.get(rank as usize).cloned().with_context(|| {
            format!(
                "--rank {} is outside the placement plan ({} expert shards)",
                rank,
                plan.shards.len()
            )
        })?,
        // The same check the attention rank makes when it starts.
        _ => plan.attention_experts(rank)?,
    };
    Ok(RankTensors {
        dense: args.files_for == FilesFor::Attention,
        experts: experts.into_iter().collect(),
    })
}

/// The repository pinned to one commit.
struct Hub {
    api: Api,
    repo: ApiRepo,
    /// Where the hub client keeps this commit's partial files and links.
    cache: hf_hub::CacheRepo,
    commit: String,
    retries: u32,
    files: Vec<String>,
    manifest: Mutex<Manifest>,
}

#[derive(Default)]
struct Summary {
    fetched: usize,
    fetched_bytes: u64,
    present: usize,
}

impl Summary {
    fn add(&mut self, other: Summary) {
        self.fetched += other.fetched;
        self.fetched_bytes += other.fetched_bytes;
        self.present += other.present;
    }
}

/// One file to bring into the directory, with the hub's checksum and size.
struct Wanted {
    name: String,
    etag: String,
    size: u64,
}

impl Hub {
    fn connect(args: &DownloadArgs) -> Result<Self> {
        let cache = hf_hub::Cache::new(args.dir.join(CLIENT_CACHE));
        let api = ApiBuilder::from_cache(cache.clone())
            .with_endpoint(args.endpoint.trim_end_matches('/').to_string())
            .with_token(args.token.clone().filter(|t| !t.is_empty()))
            .with_progress(false)
            // Retried here (`fetch_one`): the client's own retry resumes from a wrong offset.
            .with_retries(0)
            .with_user_agent("dsv3-worker", env!("CARGO_PKG_VERSION"))
            .build()
            .context("cannot set up the hub client")?;
        let info = api
            .repo(Repo::with_revision(
                args.repo.clone(),
                RepoType::Model,
                args.revision.clone(),
            ))
            .info()
            .map_err(|e| hub_error(e, args))?;
        let commit = info.sha;
        eprintln!("{} at {} is commit {commit}", args.repo, args.revision);
        let pinned = Repo::with_revision(args.repo.clone(), RepoType::Model, commit.clone());
        let repo = api.repo(pinned.clone());
        let manifest = read_manifest(&args.dir, &args.repo);
        Ok(Hub {
            api,
            repo,
            cache: cache.repo(pinned),
            commit,
            retries: args.retries,
            files: info.siblings.into_iter().map(|s| s.rfilename).collect(),
            manifest: Mutex::new(manifest),
        })
    }

    /// Brings `names` into the directory, `--parallel` at a time, with progress on stderr.
    fn fetch(&self, args: &DownloadArgs, names: &[String]) -> Result<Summary> {
        let mut wanted = Vec::with_capacity(names.len());
        let mut summary = Summary::default();
        for name in names {
            let metadata = self
                .api
                .metadata(&self.repo.url(name))
                .map_err(|e| anyhow::anyhow!("cannot read the hub's metadata of {name}: {e}"))?;
            let entry = ManifestEntry {
                etag: metadata.etag().to_string(),
                size: metadata.size() as u64,
            };
            if self.in_place(&args.dir, name, &entry) {
                summary.present += 1;
                continue;
            }
            wanted.push(Wanted {
                name: name.clone(),
                etag: entry.etag,
                size: entry.size,
            });
        }
        if wanted.is_empty() {
            return Ok(summary);
        }
        let total: u64 = wanted.iter().map(|w| w.size).sum();
        let queue = Mutex::new(wanted.into_iter().collect::<VecDeque<_>>());
        let done = Arc::new(AtomicU64::new(0));
        let failed = AtomicBool::new(false);
        let finished = Mutex::new(Vec::new());
        let first_error = Mutex::new(None);
        let workers = usize::from(args.parallel).min(names.len());
        let live = AtomicUsize::new(workers);
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    // Counted out however the thread ends, so the progress loop never outlives it.
                    let _live = LiveWorker(&live);
                    while !failed.load(Ordering::Relaxed) {
                        let Some(file) = queue.lock().map(|mut q| q.pop_front()).unwrap_or(None) else {
                            break;
                        };
                        match self.fetch_one(&args.dir, &file, &done) {
                            Ok(()) => finished.lock().map(|mut f| f.push(file.size)).unwrap_or(()),
                            Err(e) => {
                                failed.store(true, Ordering::Relaxed);
                                if let Ok(mut slot) = first_error.lock() {
                                    slot.get_or_insert(e);
                                }
                            }
                        }
                    }
                });
            }
            report_progress(&args.repo, total, &done, &live, &finished);
        });
        if let Some(e) = first_error.into_inner().ok().flatten() {
            return Err(e);
        }
        if !queue.into_inner().map(|q| q.is_empty()).unwrap_or(false) {
            bail!("the download stopped with files left to fetch");
        }
        let finished = finished.into_inner().unwrap_or_default();
        summary.fetched = finished.len();
        summary.fetched_bytes = finished.iter().sum();
        Ok(summary)
    }

    fn in_place(&self, dir: &Path, name: &str, entry: &ManifestEntry) -> bool {
        let recorded = self
            .manifest
            .lock()
            .map(|m| m.files.get(name) == Some(entry))
            .unwrap_or(false);
        recorded && std::fs::metadata(dir.join(name)).is_ok_and(|m| m.is_file() && m.len() == entry.size)
    }

    /// Downloads one file (resuming a partial one), verifies it, and renames it into place.
    fn fetch_one(&self, dir: &Path, file: &Wanted, done: &Arc<AtomicU64>) -> Result<()> {
        let blob_path = self.cache.blob_path(&file.etag);
        let partial = blob_path.with_extension("part");
        let mut pointer_path = self.cache.pointer_path(&self.commit);
        pointer_path.push(&file.name);
        let mut attempt = 0;
        let pointer = loop {
            prepare_attempt(&partial, &pointer_path, file.size);
            let progress = FileProgress {
                counted: 0,
                done: done.clone(),
            };
            match self.repo.download_with_progress(&file.name, progress) {
                Ok(pointer) => break pointer,
                // The partial copy is longer than the file: start it over (once).
                Err(ApiError::InvalidResume) if attempt < self.retries => {
                    std::fs::remove_file(&partial)
                        .with_context(|| format!("cannot remove the partial copy {}", partial.display()))?;
                }
                // The hub refused the request itself (no access, no such file): retrying changes nothing.
                Err(e) if refused(&e) => bail!("downloading {}: {e}", file.name),
                Err(e) if attempt < self.retries => {
                    let wait = Duration::from_millis(500 << attempt.min(5));
                    eprintln!(
                        "{}: {e}; resuming in {:.1}s (retry {} of {})",
                        file.name,
                        wait.as_secs_f64(),
                        attempt + 1,
                        self.retries
                    );
                    std::thread::sleep(wait);
                }
                Err(e) => bail!("downloading {}: {e} (after {attempt} retries)", file.name),
            }
            attempt += 1;
        };
        let blob = std::fs::canonicalize(&pointer).with_context(|| format!("resolving {}", pointer.display()))?;
        if let Err(e) = verify(&blob, &file.etag, file.size) {
            // A corrupt copy must not be resumed from or kept.
            let _ = std::fs::remove_file(&blob);
            let _ = std::fs::remove_file(&pointer);
            return Err(e.context(format!("{} failed verification and was removed", file.name)));
        }
        let target = dir.join(&file.name);
        std::fs::rename(&blob, &target)
            .with_context(|| format!("cannot move {} to {}", blob.display(), target.display()))?;
        let _ = std::fs::remove_file(&pointer);
        let mut manifest = self
            .manifest
            .lock()
            .map_err(|_| anyhow::anyhow!("manifest lock poisoned"))?;
        manifest.commit = self.commit.clone();
        manifest.files.insert(
            file.name.clone(),
            ManifestEntry {
                etag: file.etag.clone(),
                size: file.size,
            },
        );
        write_manifest(dir, &manifest)?;
        eprintln!("{}: {} verified", file.name, gigabytes(file.size));
        Ok(())
    }
}

/// Whether the hub answered with a client error other than a timeout or a rate limit. The
/// client's error carries the status only in its text ("... status code 404").
fn refused(error: &ApiError) -> bool {
    let text = error.to_string();
    let code = text
        .split("status code ")
        .nth(1)
        .and_then(|rest| rest.get(..3))
        .and_then(|digits| digits.parse::<u16>().ok());
    matches!(code, Some(400..=499)) && !matches!(code, Some(408 | 429))
}

/// Clears what would stop the hub client from resuming: a partial copy already as long as the
/// file (the hub refuses a range past the end), and a link left by an interrupted run to a blob
/// that was since moved into the directory (the client will not replace it).
fn prepare_attempt(partial: &Path, pointer: &Path, size: u64) {
    if std::fs::metadata(partial).is_ok_and(|m| m.len() >= size) {
        let _ = std::fs::remove_file(partial);
    }
    let dangling = std::fs::symlink_metadata(pointer).is_ok() && !pointer.exists();
    if dangling {
        let _ = std::fs::remove_file(pointer);
    }
}

/// Explains the hub's refusals in the terms a user acts on.
fn hub_error(error: hf_hub::api::sync::ApiError, args: &DownloadArgs) -> anyhow::Error {
    let text = error.to_string();
    let hint = if text.contains("401") || text.contains("403") {
        if args.token.is_some() {
            " (the token in HF_TOKEN does not grant access)"
        } else {
            " (gated or private repositories need a token in HF_TOKEN)"
        }
    } else if text.contains("404") {
        " (no such repository or revision)"
    } else {
        ""
    };
    anyhow::anyhow!(
        "cannot read {} at revision {} from {}: {text}{hint}",
        args.repo,
        args.revision,
        args.endpoint
    )
}

/// Checks a file against the hub's checksum: the sha256 of an LFS file, or the git blob id
/// (sha1 of `blob <size>\0` and the bytes) of a small one.
fn verify(path: &Path, etag: &str, size: u64) -> Result<()> {
    let actual_size = std::fs::metadata(path)?.len();
    if actual_size != size {
        bail!("{actual_size} bytes where the hub reports {size}");
    }
    let is_hex = etag.bytes().all(|b| b.is_ascii_hexdigit());
    let digest = match etag.len() {
        64 if is_hex => hash_file::<sha2::Sha256>(path, None)?,
        40 if is_hex => hash_file::<sha1::Sha1>(path, Some(format!("blob {size}\0").as_bytes()))?,
        _ => bail!("the hub's etag `{etag}` is neither a sha256 nor a git blob id, so the file cannot be verified"),
    };
    if !digest.eq_ignore_ascii_case(etag) {
        bail!("checksum {digest} where the hub reports {etag}");
    }
    Ok(())
}

fn hash_file<D: sha2::Digest>(path: &Path, prefix: Option<&[u8]>) -> Result<String> {
    let mut hasher = D::new();
    if let Some(prefix) = prefix {
        hasher.update(prefix);
    }
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Bytes of one file counted into the run's total; a resumed or retried transfer re-reports
/// its start, so the file's own count is replaced, not added to.
struct FileProgress {
    counted: u64,
    done: Arc<AtomicU64>,
}

impl Progress for FileProgress {
    fn init(&mut self, _size: usize, _filename: &str) {
        self.done.fetch_sub(self.counted, Ordering::Relaxed);
        self.counted = 0;
    }
    fn update(&mut self, size: usize) {
        self.counted += size as u64;
        self.done.fetch_add(size as u64, Ordering::Relaxed);
    }
    fn finish(&mut self) {}
}

/// A transfer thread, counted in `live` until it ends (returning or unwinding).
struct LiveWorker<'a>(&'a AtomicUsize);

impl Drop for LiveWorker<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One line every few seconds while transfers run: bytes, rate, files, time left.
fn report_progress(repo: &str, total: u64, done: &AtomicU64, live: &AtomicUsize, finished: &Mutex<Vec<u64>>) {
    const EVERY: Duration = Duration::from_secs(5);
    let started = Instant::now();
    let files = |f: &Mutex<Vec<u64>>| f.lock().map(|f| f.len()).unwrap_or(0);
    let mut last = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        if live.load(Ordering::Relaxed) == 0 {
            return;
        }
        if last.elapsed() < EVERY {
            continue;
        }
        last = Instant::now();
        let bytes = done.load(Ordering::Relaxed).min(total);
        let rate = bytes as f64 / started.elapsed().as_secs_f64().max(1e-3);
        let left = (total - bytes) as f64 / rate.max(1.0);
        eprintln!(
            "downloading {repo}: {}/{} ({:.1}%), {:.0} MB/s, {} files done, {} in flight, ~{:.0}s left",
            gigabytes(bytes),
            gigabytes(total),
            100.0 * bytes as f64 / total.max(1) as f64,
            rate / 1e6,
            files(finished),
            live.load(Ordering::Relaxed),
            left
        );
    }
}

fn read_manifest(dir: &Path, repo: &str) -> Manifest {
    let fresh = || Manifest {
        repo: repo.to_string(),
        ..Default::default()
    };
    match std::fs::read_to_string(dir.join(MANIFEST)) {
        // A directory filled from another repository is refetched file by file.
        Ok(text) => serde_json::from_str::<Manifest>(&text)
            .ok()
            .filter(|m| m.repo == repo)
            .unwrap_or_else(fresh),
        Err(_) => fresh(),
    }
}

fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<()> {
    let path = dir.join(MANIFEST);
    let partial = dir.join(format!("{MANIFEST}.{}.partial", std::process::id()));
    std::fs::write(&partial, serde_json::to_vec_pretty(manifest)?)
        .with_context(|| format!("cannot write {}", partial.display()))?;
    std::fs::rename(&partial, &path).with_context(|| format!("cannot write {}", path.display()))
}

fn gigabytes(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.2} GB", bytes as f64 / 1e9)
    } else {
        format!("{:.1} MB", bytes as f64 / 1e6)
    }
}

fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}
