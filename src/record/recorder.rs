//! `serve --record FILE.har`: every request forwarded to Desk and Desk's answer, appended
//! to a HAR file as the answer ends.
//!
//! The request path only copies what passes (up to `record.max_body_bytes` of each body)
//! and hands the entry to a writer thread over a bounded channel: it never waits for the
//! disk. If the writer falls that far behind, entries are dropped, counted and logged, and
//! forwarding goes on. The writer appends whole lines and keeps the file valid after each
//! batch (see [`super::har`] for the layout); a file cut short by a crash is repaired when
//! it is opened again, keeping every whole entry.
//!
//! What is never recorded: the token (`Authorization` is `Zoho-oauthtoken ***`), proxy
//! keys, cookies and `Set-Cookie`. The client's own `Authorization`, `Cookie`,
//! `X-Proxy-Key` and `Proxy-Authorization` never reach Desk and are not in the entry; a
//! secret or token found anywhere else (Desk echoing it, a client putting a key in the
//! query) is masked ([`super::scrub`]).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, Uri};

use super::entry::{
    Exchange, RequestBodySeen, flatten, is_cookie_answer_header, is_never_recorded_in_a_request,
};
use super::har;
use super::scrub::Scrubber;
use crate::body::Tap;
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::token::Token;

/// Entries waiting for the writer; past it, entries are dropped.
const QUEUE: usize = 4096;
/// Entries written at once, at most.
const BATCH: usize = 256;
/// Bytes of entries waiting for the writer; past it, entries are dropped (a slow disk
/// and large bodies cannot make the recording hold more).
const QUEUE_BYTES: u64 = 64 << 20;
// An entry of two bodies at their largest fits in the queue, with room for others.
const _: () = assert!(QUEUE_BYTES >= 4 * crate::config::MAX_RECORD_BODY_BYTES as u64);
/// Bytes written at once, at most (a batch of large bodies is split).
const BATCH_BYTES: usize = 8 << 20;
/// The largest recording: past it, recording stops (replay reads up to this much).
const MAX_FILE_BYTES: u64 = super::replay::MAX_FILE_BYTES;
/// How long the writer lets entries gather after a write.
const GATHER: Duration = Duration::from_millis(10);

/// Why a recording cannot be made (a usage error: the file given to `--record`).
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The file cannot be read, written or created.
    #[error("--record {path}: {source}{}", io_fix(source))]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds something the proxy did not write.
    #[error(
        "--record {0}: not a recording of zoho-desk-proxy (a HAR from elsewhere is replayed, never appended to); fix: record to a new file"
    )]
    Foreign(PathBuf),
    /// The file is damaged before its end: not a crash's cut, which only ever ends it.
    #[error(
        "--record {path}: {}; fix: mend or remove that line, or record to a new file (nothing was changed)",
        har::damaged(*line)
    )]
    Damaged {
        /// The file.
        path: PathBuf,
        /// The first damaged line (1-based).
        line: usize,
    },
    /// Another process records to the file.
    #[error(
        "--record {0}: another process is recording to it (two recorders would mix their entries); fix: give each its own file"
    )]
    Busy(PathBuf),
}

/// The file could not be read, written or created.
fn io_error(path: &Path, source: std::io::Error) -> RecordError {
    RecordError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The fix for a file that cannot be opened, when it is the path's.
fn io_fix(err: &std::io::Error) -> &'static str {
    match err.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
            "; fix: give a file in a directory that exists and that this user may write"
        }
        _ => "",
    }
}

/// The recording of a serving proxy: where entries go.
#[derive(Debug)]
pub struct Recorder {
    path: PathBuf,
    max_body: usize,
    /// Taken (and so closed) by [`Recorder::finish`]; read without a lock per request.
    queue: ArcSwapOption<SyncSender<Exchange>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    dropped: Arc<AtomicU64>,
    /// Bytes of the entries in the queue.
    queued: Arc<AtomicU64>,
    /// Secrets a reload brought, for the writer to mask from its next entry on.
    added: Arc<AddedSecrets>,
    metrics: Arc<Metrics>,
}

/// Secrets handed to the writer's thread while it runs; `any` spares it the lock per entry.
#[derive(Debug, Default)]
struct AddedSecrets {
    any: AtomicBool,
    secrets: Mutex<Vec<Secret<String>>>,
}

impl AddedSecrets {
    fn add(&self, secrets: Vec<Secret<String>>) {
        lock(&self.secrets).extend(secrets);
        self.any.store(true, Ordering::Release);
    }

    fn take(&self) -> Option<Vec<Secret<String>>> {
        if !self.any.swap(false, Ordering::AcqRel) {
            return None;
        }
        Some(std::mem::take(&mut *lock(&self.secrets)))
    }
}

impl Recorder {
    /// Opens `path` for recording: created when missing; an earlier recording is
    /// continued (repaired first when a crash cut it short). `secrets` (the client
    /// secret, the refresh token, the proxy keys) are masked wherever they appear.
    pub fn open(
        path: &Path,
        max_body: usize,
        secrets: Vec<Secret<String>>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, RecordError> {
        let (file, end, entries) = prepare(path)?;
        tracing::info!(file = %path.display(), entries, max_body_bytes = max_body, "recording Desk's traffic");
        let (queue, entries_rx) = std::sync::mpsc::sync_channel::<Exchange>(QUEUE);
        let queued = Arc::new(AtomicU64::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        let added = Arc::new(AddedSecrets::default());
        let writer = Writer {
            file,
            end,
            written: entries,
            path: path.to_owned(),
            max_body,
            scrub: Scrubber::new(&secrets),
            added: Arc::clone(&added),
            queued: Arc::clone(&queued),
            dropped: Arc::clone(&dropped),
            metrics: Arc::clone(&metrics),
        };
        let handle = std::thread::Builder::new()
            .name("zdp-recorder".into())
            .spawn(move || writer.run(entries_rx))
            .map_err(|e| io_error(path, e))?;
        Ok(Arc::new(Self {
            path: path.to_owned(),
            max_body,
            queue: ArcSwapOption::from_pointee(queue),
            writer: Mutex::new(Some(handle)),
            dropped,
            queued,
            added,
            metrics,
        }))
    }

    /// Masks `secrets` too, in every entry written from now on (the credentials a reload
    /// brought; those it replaced stay masked).
    pub fn mask_also(&self, secrets: Vec<Secret<String>>) {
        self.added.add(secrets);
    }

    /// Starts the entry of a request about to be forwarded: its method, Desk's URL, the
    /// headers sent, its body, known whole or captured as it streams, and the token it is
    /// likely sent with (masked in the entry). Only copies are made here (secrets left
    /// out); the writer's thread makes the entry.
    pub fn start(
        &self,
        method: &Method,
        url: &Uri,
        headers: &HeaderMap,
        request_id: &str,
        body: RequestBodySeen,
        token: Option<Arc<Token>>,
    ) -> Option<Box<Recording>> {
        let queue = self.queue.load_full()?;
        let body = match body {
            // A body held for a 401 retry may be longer than what is recorded: only its
            // start is kept, so the recording never holds more than its limit.
            RequestBodySeen::Whole(bytes) if bytes.len() > self.max_body => RequestBodySeen::Cut(
                Bytes::copy_from_slice(&bytes[..self.max_body]),
                bytes.len() as u64,
            ),
            body => body,
        };
        Some(Box::new(Recording {
            queue,
            dropped: Arc::clone(&self.dropped),
            queued: Arc::clone(&self.queued),
            metrics: Arc::clone(&self.metrics),
            max_body: self.max_body,
            exchange: Exchange {
                started: Instant::now(),
                started_at: SystemTime::now(),
                answered: None,
                ended: None,
                method: method.clone(),
                url: url.clone(),
                request_headers: flatten(headers, is_never_recorded_in_a_request),
                request_id: request_id.to_owned(),
                request_body: body,
                tokens: token.into_iter().collect(),
                status: StatusCode::OK,
                response_headers: String::new(),
                body: Vec::new(),
                body_total: 0,
                body_complete: false,
            },
        }))
    }

    /// The body bytes kept per body.
    pub fn max_body(&self) -> usize {
        self.max_body
    }

    /// Stops taking entries and waits until the writer has written those it has.
    pub async fn finish(&self) {
        self.queue.store(None);
        let handle = lock(&self.writer).take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(file = %self.path.display(), dropped, "recording: entries were dropped because the disk could not keep up");
        }
    }
}

/// The entry of one request, filled in as its answer streams, and handed to the writer
/// when the answer ends.
#[derive(Debug)]
pub struct Recording {
    queue: Arc<SyncSender<Exchange>>,
    dropped: Arc<AtomicU64>,
    queued: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
    max_body: usize,
    exchange: Exchange,
}

impl Recording {
    /// Notes the answer's head, and the token current then (a retry's, after a 401).
    pub fn answered(
        mut self: Box<Self>,
        status: StatusCode,
        headers: &HeaderMap,
        token: Option<Arc<Token>>,
    ) -> Box<Self> {
        if let Some(token) = token
            && !self.exchange.tokens.iter().any(|t| Arc::ptr_eq(t, &token))
        {
            self.exchange.tokens.push(token);
        }
        self.exchange.answered = Some(Instant::now());
        self.exchange.status = status;
        self.exchange.response_headers = flatten(headers, is_cookie_answer_header);
        self
    }
}

impl Tap for Recording {
    fn data(&mut self, data: &Bytes) {
        let exchange = &mut self.exchange;
        exchange.body_total += data.len() as u64;
        let room = self.max_body.saturating_sub(exchange.body.len());
        exchange
            .body
            .extend_from_slice(&data[..data.len().min(room)]);
    }

    fn end(mut self: Box<Self>, complete: bool) {
        self.exchange.ended = Some(Instant::now());
        self.exchange.body_complete = complete;
        self.exchange.body.shrink_to_fit();
        let Recording {
            queue,
            dropped,
            queued,
            metrics,
            exchange,
            ..
        } = *self;
        let size = exchange.size();
        if queued.fetch_add(size, Ordering::AcqRel) + size > QUEUE_BYTES {
            queued.fetch_sub(size, Ordering::AcqRel);
            lost(&dropped, &metrics, 1);
            return;
        }
        match queue.try_send(exchange) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                queued.fetch_sub(size, Ordering::AcqRel);
                lost(&dropped, &metrics, 1);
            }
            // The recording was finished: the proxy is stopping.
            Err(TrySendError::Disconnected(_)) => {
                queued.fetch_sub(size, Ordering::AcqRel);
            }
        }
    }
}

/// Counts entries that will not be in the recording (logged the first time).
fn lost(dropped: &AtomicU64, metrics: &Metrics, entries: u64) {
    metrics.record_recording_dropped_n(entries);
    if dropped.fetch_add(entries, Ordering::Relaxed) == 0 {
        tracing::warn!(
            "recording: entries are dropped (the disk is behind, failing or the file at its 1 GiB limit; counted in zoho_proxy_record_dropped_total)"
        );
    }
}

/// The file at `path`, opened and locked. A file locked after another process had
/// replaced it (repaired: written beside and renamed over it) is no longer the one the
/// path names: it is opened again.
fn open_locked(options: &OpenOptions, path: &Path) -> Result<File, RecordError> {
    let mut tries = 3;
    loop {
        let file = options.open(path).map_err(|e| io_error(path, e))?;
        lock_for_recording(&file, path)?;
        tries -= 1;
        if tries == 0 || same_file(&file, path) {
            return Ok(file);
        }
    }
}

/// Whether `path` still names `file`.
fn same_file(file: &File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), std::fs::metadata(path)) {
            (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (file, path);
        true
    }
}

/// Takes the file for this process alone (an advisory lock, held while the file is open).
fn lock_for_recording(file: &File, path: &Path) -> Result<(), RecordError> {
    match file.try_lock() {
        Ok(()) => Ok(()),
        Err(std::fs::TryLockError::WouldBlock) => Err(RecordError::Busy(path.to_owned())),
        Err(std::fs::TryLockError::Error(err)) => Err(io_error(path, err)),
    }
}

/// The file ready for appending: created with an empty recording, or an earlier one
/// checked (and repaired). Returns the file, where the trailer starts, and the entries
/// it holds.
fn prepare(path: &Path) -> Result<(File, u64, usize), RecordError> {
    let io = |source| io_error(path, source);
    // A pipe or a device would be read for ever (and a pipe is no file to append to).
    if std::fs::metadata(path).is_ok_and(|meta| !meta.is_file()) {
        return Err(io(std::io::Error::other(
            "it is not a regular file (a pipe, a device or a directory): give the path of a file",
        )));
    }
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Desk's data: readable by its owner only.
        options.mode(0o600);
    }
    let mut file = open_locked(&options, path)?;
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidData {
            RecordError::Foreign(path.to_owned())
        } else {
            io(e)
        }
    })?;
    let entries: Vec<String> = if text.is_empty() {
        Vec::new()
    } else {
        let (entries, ending) =
            har::entry_lines(&text).ok_or_else(|| RecordError::Foreign(path.to_owned()))?;
        match ending {
            har::Ending::Whole => {}
            har::Ending::Cut => {
                tracing::warn!(file = %path.display(), kept = entries.len(), "recording: the file was cut short (a crash?); kept its whole entries and dropped the rest");
            }
            har::Ending::Damaged(line) => {
                return Err(RecordError::Damaged {
                    path: path.to_owned(),
                    line,
                });
            }
        }
        // Appending starts where the trailer is, so it must be what ends the file.
        if ending == har::Ending::Whole && text.ends_with(har::TRAILER) {
            let end = text.len() - har::TRAILER.len();
            return Ok((file, end as u64, entries.len()));
        }
        entries.into_iter().map(str::to_owned).collect()
    };
    // Rewritten beside it and renamed over it: a crash during the repair leaves the old
    // file, never half of the new one.
    let laid_out = har::layout(entries.iter().map(String::as_str));
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut repaired = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    repaired
        .write_all(laid_out.as_bytes())
        .and_then(|()| repaired.as_file().sync_data())
        .map_err(io)?;
    let file = repaired.persist(path).map_err(|e| io(e.error))?;
    // The lock was the old file's, which the name no longer leads to.
    lock_for_recording(&file, path)?;
    let end = laid_out.len() - har::TRAILER.len();
    Ok((file, end as u64, entries.len()))
}

/// The thread that appends entries.
struct Writer {
    file: File,
    /// Where the trailer starts.
    end: u64,
    written: usize,
    path: PathBuf,
    max_body: usize,
    /// The search for the configuration's secrets, made once, and again when a reload
    /// adds some.
    scrub: Scrubber,
    added: Arc<AddedSecrets>,
    queued: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
}

impl Writer {
    fn run(mut self, exchanges: Receiver<Exchange>) {
        let mut failed = false;
        let mut full = false;
        let mut next = exchanges.recv().ok();
        while let Some(first) = next.take() {
            let mut batch = String::new();
            let mut lines = 0;
            let mut pending = Some(first);
            while let Some(exchange) = pending.take() {
                self.queued.fetch_sub(exchange.size(), Ordering::AcqRel);
                if let Some(more) = self.added.take() {
                    self.scrub = self.scrub.with(&more);
                }
                if let Ok(line) =
                    serde_json::to_string(&exchange.into_entry(self.max_body, &self.scrub))
                {
                    if self.written + lines > 0 {
                        batch.push(',');
                    }
                    batch.push_str(&line);
                    batch.push('\n');
                    lines += 1;
                }
                if lines < BATCH && batch.len() < BATCH_BYTES {
                    pending = exchanges.try_recv().ok();
                }
            }
            if self.end + batch.len() as u64 > MAX_FILE_BYTES {
                if !full {
                    full = true;
                    tracing::warn!(file = %self.path.display(), "recording: the file reached 1 GiB; recording stops here (start another file)");
                }
                lost(&self.dropped, &self.metrics, lines as u64);
            } else {
                match self.append(&batch) {
                    Ok(()) => self.written += lines,
                    Err(err) => {
                        if !failed {
                            failed = true;
                            tracing::error!(file = %self.path.display(), error = %err, "recording: cannot write; entries are lost until the disk recovers");
                        }
                        lost(&self.dropped, &self.metrics, lines as u64);
                    }
                }
            }
            next = match exchanges.try_recv() {
                Ok(exchange) => Some(exchange),
                Err(TryRecvError::Disconnected) => None,
                Err(TryRecvError::Empty) => {
                    // Let the next entries gather: under load the request path's sends
                    // then find the writer awake and never have to wake it (a system
                    // call each), and the file grows by a few writes a second.
                    std::thread::sleep(GATHER);
                    exchanges.recv().ok()
                }
            };
        }
        if let Err(err) = self.file.sync_data() {
            tracing::warn!(file = %self.path.display(), error = %err, "recording: cannot flush the file");
        }
    }

    /// Appends `lines` (whole entry lines) and the trailer in one write: the file is
    /// valid after it, and a crash in the middle of it leaves whole lines to keep. A
    /// write that fails is undone: the file ends with the trailer again.
    fn append(&mut self, lines: &str) -> std::io::Result<()> {
        let mut batch = String::with_capacity(lines.len() + har::TRAILER.len());
        batch.push_str(lines);
        batch.push_str(har::TRAILER);
        let written = self
            .file
            .seek(SeekFrom::Start(self.end))
            .and_then(|_| self.file.write_all(batch.as_bytes()));
        match written {
            Ok(()) => {
                self.end += lines.len() as u64;
                Ok(())
            }
            Err(err) => {
                let _ = self
                    .file
                    .set_len(self.end)
                    .and_then(|()| self.file.seek(SeekFrom::Start(self.end)))
                    .and_then(|_| self.file.write_all(har::TRAILER.as_bytes()));
                Err(err)
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
