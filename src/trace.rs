//! Allocation traces of the C library (`MAPIALLOC_TRACE=path`) and its exit-time leak report
//! (`MAPIALLOC_LEAKS=1`).
//!
//! Both variables are read once, at the first MAPI call through the C exports
//! ([`crate::capi`]); the Rust API ([`crate::Heap`]) never traces. A `%p` in the trace's path
//! is replaced by the process id (one file a process when a test suite starts many); the file
//! is created anew, or emptied, at the first call.
//!
//! # Recording
//!
//! Every call through the exports appends one [`Record`] to a buffer owned by the calling
//! thread: no lock, no shared write on the record path (a thread takes its trace id from a
//! counter once). A full buffer is written to the file as one *chunk* with a single `write`
//! on a descriptor opened with `O_APPEND`, so chunks of concurrent threads never interleave.
//! Buffers are also flushed at thread exit (a thread-local destructor) and at process exit
//! (an `atexit` hook, for the thread that calls `exit`). Only the records of threads still
//! running when the process exits are lost, as with any buffered tracer; a call made after
//! its thread's buffer is gone (from another thread-local's destructor) is written at once,
//! as a chunk of one record.
//!
//! Timestamps are taken so that the order of times is the order of effects across threads:
//! after the call for `MAPIAllocateBuffer` (a root cannot reach another thread before its
//! call returned), before the call for `MAPIAllocateMore` and `MAPIFreeBuffer` (a link or a
//! free acts on its root before the root's address can be handed out again, so its start
//! precedes the next allocation at that address). The replayer relies on this to tell apart
//! roots that reuse one address. The one call it can misplace is a link that raced its
//! root's free and won while timed after the free started: it is left out, as if it failed.
//!
//! Calls with a NULL out pointer allocate nothing and are not recorded.
//!
//! # Format (version 1, all integers little-endian)
//!
//! ```text
//! file   = header chunk*
//! header = magic "MAPITRC\0" (8 bytes) | version u16 (= 1) | reserved u16 | reserved u32
//! chunk  = thread u32 | count u32 | start_ns u64 | record{count}
//! record = call u8 | status u8 | reserved u16 | size u32 | delta_ns u32 | pointer u64
//! ```
//!
//! - `thread`: the recording thread's trace id, 1, 2, ... in the order threads first called.
//!   A thread's chunks appear in the file in its call order.
//! - `start_ns`: nanoseconds from the start of the trace to the chunk's first record.
//! - `call`: 1 `MAPIAllocateBuffer`, 2 `MAPIAllocateMore`, 3 `MAPIFreeBuffer` ([`Call`]).
//! - `status`: [`Status`]: 0 success (a root freed, for `MAPIFreeBuffer`), 1 not enough
//!   memory, 2 invalid parameter, 3 NULL freed, 4 double free, 5 linked block freed,
//!   6 foreign pointer freed.
//! - `size`: `cbSize` (0 for frees).
//! - `delta_ns`: nanoseconds since the previous record of the chunk (0 for the first); a gap
//!   that does not fit in 32 bits starts a new chunk.
//! - `pointer`: the root identity: the root returned (`MAPIAllocateBuffer`, 0 on failure),
//!   `lpObject` (`MAPIAllocateMore`) or `lpBuffer` (`MAPIFreeBuffer`). An address is reused
//!   once its root is freed: a root is the pair (address, the allocation that returned it).

use crate::{FreeOutcome, Heap, LiveRoot, Scode};
use std::cell::{Cell, RefCell};
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// The first bytes of every trace file.
pub const MAGIC: [u8; 8] = *b"MAPITRC\0";
/// The format version this library writes and reads.
pub const VERSION: u16 = 1;
/// Bytes of the file header: magic, version, two reserved fields.
pub const FILE_HEADER_LEN: usize = 16;
/// Bytes of a chunk header: thread, count, start time.
pub const CHUNK_HEADER_LEN: usize = 16;
/// Bytes of one record.
pub const RECORD_LEN: usize = 20;
/// Records a thread buffers before it writes them as one chunk (about 64 KiB).
const RECORDS_PER_CHUNK: usize = (64 * 1024 - CHUNK_HEADER_LEN) / RECORD_LEN;

/// The MAPI call a record describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Call {
    /// `MAPIAllocateBuffer`.
    AllocateBuffer = 1,
    /// `MAPIAllocateMore`.
    AllocateMore = 2,
    /// `MAPIFreeBuffer`.
    FreeBuffer = 3,
}

impl Call {
    fn from_byte(byte: u8) -> Option<Call> {
        [Call::AllocateBuffer, Call::AllocateMore, Call::FreeBuffer]
            .into_iter()
            .find(|c| *c as u8 == byte)
    }
}

/// What a call returned: its SCODE, or for `MAPIFreeBuffer` (which always returns 0) what
/// the free did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Status {
    /// `S_OK`; for `MAPIFreeBuffer`, a root and its chain were freed.
    Ok = 0,
    /// `MAPI_E_NOT_ENOUGH_MEMORY`.
    NotEnoughMemory = 1,
    /// `MAPI_E_INVALID_PARAMETER`.
    InvalidParameter = 2,
    /// `MAPIFreeBuffer(NULL)`.
    FreedNull = 3,
    /// `MAPIFreeBuffer` on a root already freed.
    DoubleFree = 4,
    /// `MAPIFreeBuffer` on a linked block.
    LinkedBlockFreed = 5,
    /// `MAPIFreeBuffer` on a pointer that is not the allocator's.
    ForeignFreed = 6,
}

impl Status {
    const ALL: [Status; 7] = [
        Status::Ok,
        Status::NotEnoughMemory,
        Status::InvalidParameter,
        Status::FreedNull,
        Status::DoubleFree,
        Status::LinkedBlockFreed,
        Status::ForeignFreed,
    ];

    /// The status of an allocation call that returned `code`.
    pub fn of_scode(code: Scode) -> Status {
        match code {
            Scode::S_OK => Status::Ok,
            Scode::MAPI_E_NOT_ENOUGH_MEMORY => Status::NotEnoughMemory,
            _ => Status::InvalidParameter,
        }
    }

    /// The status of a free that did `outcome`.
    pub fn of_free(outcome: FreeOutcome) -> Status {
        match outcome {
            FreeOutcome::Freed => Status::Ok,
            FreeOutcome::Null => Status::FreedNull,
            FreeOutcome::DoubleFree => Status::DoubleFree,
            FreeOutcome::LinkedBlock => Status::LinkedBlockFreed,
            FreeOutcome::Foreign => Status::ForeignFreed,
        }
    }

    fn from_byte(byte: u8) -> Option<Status> {
        Status::ALL.into_iter().find(|s| *s as u8 == byte)
    }
}

/// One traced call, as [`parse`] returns it (times made absolute).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// The calling thread's trace id (1, 2, ...).
    pub thread: u32,
    /// Which call.
    pub call: Call,
    /// What it returned.
    pub status: Status,
    /// `cbSize` (0 for frees).
    pub size: u32,
    /// Nanoseconds from the start of the trace (see the module docs for which instant).
    pub time_ns: u64,
    /// The root's address: returned, linked to, or freed (see the module docs).
    pub pointer: u64,
}

/// A thread's records not yet written: one chunk being filled, header space first.
struct Chunk {
    bytes: Vec<u8>,
    count: u32,
    start_ns: u64,
    last_ns: u64,
}

impl Chunk {
    fn new() -> Chunk {
        let mut bytes = Vec::with_capacity(CHUNK_HEADER_LEN + RECORDS_PER_CHUNK * RECORD_LEN);
        bytes.resize(CHUNK_HEADER_LEN, 0);
        Chunk {
            bytes,
            count: 0,
            start_ns: 0,
            last_ns: 0,
        }
    }

    /// Appends `record` unless the chunk is full or its time gap does not fit; false then
    /// (the caller writes the chunk out and pushes again).
    fn push(&mut self, record: &Record) -> bool {
        if self.count == 0 {
            self.start_ns = record.time_ns;
            self.last_ns = record.time_ns;
        }
        // A clock read before a racing call can trail the previous record by a little: 0.
        let Ok(delta) = u32::try_from(record.time_ns.saturating_sub(self.last_ns)) else {
            return false;
        };
        if self.count as usize == RECORDS_PER_CHUNK {
            return false;
        }
        self.last_ns = self.last_ns.max(record.time_ns);
        self.count += 1;
        let mut raw = [0u8; RECORD_LEN];
        raw[0] = record.call as u8;
        raw[1] = record.status as u8;
        raw[4..8].copy_from_slice(&record.size.to_le_bytes());
        raw[8..12].copy_from_slice(&delta.to_le_bytes());
        raw[12..20].copy_from_slice(&record.pointer.to_le_bytes());
        // One copy into capacity reserved up front: the buffer never reallocates.
        self.bytes.extend_from_slice(&raw);
        true
    }

    /// The chunk's bytes with its header filled in, or `None` when it holds no record.
    fn seal(&mut self, thread: u32) -> Option<&[u8]> {
        if self.count == 0 {
            return None;
        }
        self.bytes[0..4].copy_from_slice(&thread.to_le_bytes());
        self.bytes[4..8].copy_from_slice(&self.count.to_le_bytes());
        self.bytes[8..16].copy_from_slice(&self.start_ns.to_le_bytes());
        Some(&self.bytes)
    }

    fn clear(&mut self) {
        self.bytes.truncate(CHUNK_HEADER_LEN);
        self.count = 0;
    }
}

/// The file header of format [`VERSION`].
fn file_header() -> [u8; FILE_HEADER_LEN] {
    let mut header = [0; FILE_HEADER_LEN];
    header[..8].copy_from_slice(&MAGIC);
    header[8..10].copy_from_slice(&VERSION.to_le_bytes());
    header
}

/// Encodes `records` as a whole trace file (a chunk per run of one thread's records), as
/// the recorder would have written them. For tools and tests that make traces.
pub fn encode(records: &[Record]) -> Vec<u8> {
    let mut out = file_header().to_vec();
    let mut chunk = Chunk::new();
    for run in records.chunk_by(|a, b| a.thread == b.thread) {
        for record in run {
            if !chunk.push(record) {
                out.extend_from_slice(chunk.seal(run[0].thread).expect("a full chunk"));
                chunk.clear();
                assert!(chunk.push(record), "an empty chunk takes any record");
            }
        }
        if let Some(bytes) = chunk.seal(run[0].thread) {
            out.extend_from_slice(bytes);
        }
        chunk.clear();
    }
    out
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Decodes a trace file: its records in file order (each thread's in its call order), with
/// absolute times. A chunk cut short at the end (a process killed mid-write) is an error.
pub fn parse(bytes: &[u8]) -> io::Result<Vec<Record>> {
    if bytes.len() < FILE_HEADER_LEN || bytes[..8] != MAGIC {
        return Err(invalid("not a mapialloc trace (bad magic)".into()));
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != VERSION {
        return Err(invalid(format!(
            "trace format version {version}; this build reads version {VERSION}"
        )));
    }
    let le32 = |b: &[u8]| u32::from_le_bytes(b[..4].try_into().expect("4 bytes"));
    let le64 = |b: &[u8]| u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
    let mut records = Vec::new();
    let mut rest = &bytes[FILE_HEADER_LEN..];
    while !rest.is_empty() {
        let offset = bytes.len() - rest.len();
        let short = || invalid(format!("trace truncated in the chunk at byte {offset}"));
        let header = rest.get(..CHUNK_HEADER_LEN).ok_or_else(short)?;
        let (thread, count, start_ns) = (le32(header), le32(&header[4..]), le64(&header[8..]));
        let body_len = count as usize * RECORD_LEN;
        let body = rest
            .get(CHUNK_HEADER_LEN..CHUNK_HEADER_LEN + body_len)
            .ok_or_else(short)?;
        let mut time_ns = start_ns;
        for raw in body.chunks_exact(RECORD_LEN) {
            let bad = |what: &str| invalid(format!("bad {what} in the chunk at byte {offset}"));
            time_ns += u64::from(le32(&raw[8..]));
            records.push(Record {
                thread,
                call: Call::from_byte(raw[0]).ok_or_else(|| bad("call"))?,
                status: Status::from_byte(raw[1]).ok_or_else(|| bad("status"))?,
                size: le32(&raw[4..]),
                time_ns,
                pointer: le64(&raw[12..]),
            });
        }
        rest = &rest[CHUNK_HEADER_LEN + body_len..];
    }
    Ok(records)
}

/// Reads and decodes the trace file at `path` ([`parse`]).
pub fn read(path: &Path) -> io::Result<Vec<Record>> {
    parse(&std::fs::read(path)?)
}

/// The recorder of a tracing process: the file and the trace's time origin.
pub(crate) struct Recorder {
    file: File,
    start: Instant,
    next_thread: AtomicU32,
}

/// What the environment asked for, read at the first MAPI call.
struct Session {
    recorder: Option<Recorder>,
}

static SESSION: OnceLock<Session> = OnceLock::new();

thread_local! {
    /// This thread's trace id, 0 until its first record. No destructor, so it stays readable
    /// while the thread's other thread-locals are torn down.
    static THREAD_ID: Cell<u32> = const { Cell::new(0) };
    /// This thread's unwritten records, flushed when full and by its destructor.
    static BUFFER: RefCell<Option<ThreadBuffer>> = const { RefCell::new(None) };
}

/// A thread's chunk, written out when the thread exits.
struct ThreadBuffer(Chunk);

impl Drop for ThreadBuffer {
    fn drop(&mut self) {
        if let Some(recorder) = recorder() {
            recorder.write_chunk(&mut self.0);
        }
    }
}

/// The process's recorder, when `MAPIALLOC_TRACE` named a file that could be created.
///
/// Reads `MAPIALLOC_TRACE` and `MAPIALLOC_LEAKS` on the first call, and registers the exit
/// hooks they need; later calls cost one load.
#[inline]
pub(crate) fn recorder() -> Option<&'static Recorder> {
    SESSION.get_or_init(Session::from_env).recorder.as_ref()
}

impl Session {
    #[cold]
    fn from_env() -> Session {
        let leaks = std::env::var_os("MAPIALLOC_LEAKS").is_some_and(|v| v == "1");
        if leaks {
            register_at_exit(report_leaks_at_exit);
        }
        let recorder = std::env::var_os("MAPIALLOC_TRACE")
            .filter(|path| !path.is_empty())
            .and_then(|path| {
                let path = trace_path(path, std::process::id());
                match Recorder::create(&path) {
                    Ok(recorder) => Some(recorder),
                    Err(error) => {
                        let shown = path.display();
                        eprintln!("mapialloc: MAPIALLOC_TRACE={shown}: {error}; not tracing");
                        None
                    }
                }
            });
        if recorder.is_some() {
            register_at_exit(flush_at_exit);
        }
        Session { recorder }
    }
}

/// The file a process traces into: `MAPIALLOC_TRACE` with each `%p` replaced by the process
/// id, so that the processes of a test suite, which inherit one environment, do not write
/// over each other's traces. A path that is not UTF-8 is taken as it is.
fn trace_path(variable: OsString, pid: u32) -> PathBuf {
    match variable.to_str() {
        Some(text) => text.replace("%p", &pid.to_string()).into(),
        None => variable.into(),
    }
}

/// Registers `hook` with the C library's `atexit`.
fn register_at_exit(hook: extern "C" fn()) {
    // SAFETY: `hook` is a plain function with the C ABI that neither unwinds (both hooks
    // catch everything) nor calls `exit`.
    if unsafe { libc::atexit(hook) } != 0 {
        eprintln!("mapialloc: atexit refused a hook; nothing will be reported at exit");
    }
}

/// The `atexit` hook of `MAPIALLOC_TRACE`: writes the exiting thread's records.
extern "C" fn flush_at_exit() {
    let _ = std::panic::catch_unwind(|| {
        let _ = BUFFER.try_with(|buffer| {
            if let (Ok(mut buffer), Some(recorder)) = (buffer.try_borrow_mut(), recorder()) {
                if let Some(buffer) = buffer.as_mut() {
                    recorder.write_chunk(&mut buffer.0);
                }
            }
        });
    });
}

/// The `atexit` hook of `MAPIALLOC_LEAKS=1`: the leak report of the default heap on stderr.
extern "C" fn report_leaks_at_exit() {
    let _ = std::panic::catch_unwind(|| {
        let _ = write_leak_report(crate::default_heap(), &mut io::stderr().lock());
    });
}

impl Recorder {
    fn create(path: &Path) -> io::Result<Recorder> {
        let mut file = File::create(path)?;
        file.write_all(&file_header())?;
        // Reopened for appending: every chunk is then one `write` at the end of the file,
        // whatever other threads write meanwhile.
        let file = File::options().append(true).open(path)?;
        Ok(Recorder {
            file,
            start: Instant::now(),
            next_thread: AtomicU32::new(1),
        })
    }

    /// Nanoseconds since the trace started.
    #[inline]
    pub(crate) fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Records one call of the calling thread, made at `time_ns` ([`now`](Self::now)).
    pub(crate) fn record(&self, call: Call, status: Status, size: u32, pointer: u64, time_ns: u64) {
        let thread = THREAD_ID.with(|id| {
            if id.get() == 0 {
                // Relaxed: ids need only be unique, and fetch_add is atomic whatever the order.
                id.set(self.next_thread.fetch_add(1, Ordering::Relaxed));
            }
            id.get()
        });
        let record = Record {
            thread,
            call,
            status,
            size,
            time_ns,
            pointer,
        };
        let buffered = BUFFER.try_with(|buffer| {
            let mut buffer = buffer.borrow_mut();
            let chunk = &mut buffer.get_or_insert_with(|| ThreadBuffer(Chunk::new())).0;
            if !chunk.push(&record) {
                self.write_chunk(chunk);
                chunk.push(&record);
            }
        });
        if buffered.is_err() {
            // The thread's buffer is gone (a call from another thread-local's destructor):
            // this record goes out on its own.
            let mut chunk = Chunk::new();
            chunk.push(&record);
            self.write_chunk(&mut chunk);
        }
    }

    /// Writes `chunk` (if it holds records) with one `write` and empties it.
    fn write_chunk(&self, chunk: &mut Chunk) {
        let thread = THREAD_ID.with(Cell::get);
        if let Some(bytes) = chunk.seal(thread) {
            // One `write`, never a loop: a second write could land after another thread's
            // chunk. A short write (a full disk) leaves a truncated chunk that `parse` reports.
            if !matches!((&self.file).write(bytes), Ok(n) if n == bytes.len()) {
                eprintln!("mapialloc: could not write the trace; it is incomplete");
            }
        }
        chunk.clear();
    }
}

/// Roots listed one by one in a leak report, largest chains first.
pub const LEAK_REPORT_ROOTS: usize = 20;

/// Writes the leak report of `heap`: one line
/// `mapialloc: N live roots (B blocks, M bytes) at exit` (B counts roots and their linked
/// blocks, M their usable bytes), then up to [`LEAK_REPORT_ROOTS`] of the largest roots with
/// their size, chain length and owning thread cache.
///
/// The engine knows which thread cache owns a root's page, not which thread called
/// `MAPIAllocateBuffer`: that is the allocating thread's cache unless the thread exited and
/// another adopted the page (`owner` 0: abandoned, no cache). Takes a lock-free snapshot
/// ([`Heap::live_roots`]).
pub fn write_leak_report(heap: &Heap, out: &mut dyn Write) -> io::Result<()> {
    let roots: Vec<LiveRoot> = heap.live_roots().collect();
    let blocks: usize = roots.iter().map(|r| 1 + r.linked_blocks).sum();
    let bytes: usize = roots.iter().map(|r| r.chain_bytes).sum();
    writeln!(
        out,
        "mapialloc: {} live roots ({blocks} blocks, {bytes} bytes) at exit",
        roots.len()
    )?;
    for root in roots.iter().take(LEAK_REPORT_ROOTS) {
        let owner = match root.owner {
            0 => "no thread cache (abandoned: its thread has exited or is exiting)".to_owned(),
            id => format!("thread cache {id}"),
        };
        writeln!(
            out,
            "mapialloc:   root {:p}: {} bytes, {} linked blocks, {} bytes in chain, page of {owner}",
            root.ptr, root.size, root.linked_blocks, root.chain_bytes
        )?;
    }
    if roots.len() > LEAK_REPORT_ROOTS {
        writeln!(
            out,
            "mapialloc:   ... and {} more roots",
            roots.len() - LEAK_REPORT_ROOTS
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(thread: u32, call: Call, status: Status, size: u32, time_ns: u64) -> Record {
        let pointer = 0x1000 + u64::from(thread) * 0x100 + size as u64;
        Record {
            thread,
            call,
            status,
            size,
            time_ns,
            pointer,
        }
    }

    #[test]
    fn encode_then_parse_is_the_identity() {
        let mut records = vec![
            record(1, Call::AllocateBuffer, Status::Ok, 320, 5),
            record(1, Call::AllocateMore, Status::Ok, 24, 9),
            record(2, Call::AllocateMore, Status::InvalidParameter, 8, 7),
            record(1, Call::FreeBuffer, Status::DoubleFree, 0, 12),
            // A gap past 32 bits of nanoseconds starts a new chunk.
            record(1, Call::FreeBuffer, Status::Ok, 0, 12 + (1 << 33)),
            record(
                3,
                Call::AllocateBuffer,
                Status::NotEnoughMemory,
                u32::MAX,
                1 << 40,
            ),
        ];
        // More records than fit in one chunk.
        records.extend(
            (0..RECORDS_PER_CHUNK as u64 + 10)
                .map(|i| record(4, Call::AllocateBuffer, Status::Ok, i as u32, 1_000 + i)),
        );
        let bytes = encode(&records);
        assert_eq!(&bytes[..8], b"MAPITRC\0");
        assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), VERSION);
        assert_eq!(parse(&bytes).unwrap(), records);
    }

    #[test]
    fn parse_refuses_bad_magic_versions_and_truncation() {
        let bytes = encode(&[record(1, Call::AllocateBuffer, Status::Ok, 1, 0)]);
        assert!(parse(b"not a trace at all").is_err());
        let mut newer = bytes.clone();
        newer[8] = 2;
        assert!(parse(&newer).unwrap_err().to_string().contains("version 2"));
        assert!(parse(&bytes[..bytes.len() - 1])
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        let mut bad_call = bytes.clone();
        bad_call[FILE_HEADER_LEN + CHUNK_HEADER_LEN] = 9;
        assert!(parse(&bad_call).is_err());
        assert_eq!(parse(&bytes[..FILE_HEADER_LEN]).unwrap(), []);
    }

    #[test]
    fn the_recorder_writes_what_threads_record() {
        let path = std::env::temp_dir().join(format!("mapialloc-trace-{}", std::process::id()));
        let recorder = Recorder::create(&path).unwrap();
        std::thread::scope(|scope| {
            for t in 0..3u32 {
                let recorder = &recorder;
                scope.spawn(move || {
                    for i in 0..5_000 {
                        recorder.record(Call::AllocateBuffer, Status::Ok, t, i, recorder.now());
                    }
                    // Thread exit writes the rest: the buffer's destructor uses the
                    // process's recorder, which is not this one, so flush by hand here.
                    if let Some(mut buffer) = BUFFER.with(|b| b.borrow_mut().take()) {
                        recorder.write_chunk(&mut buffer.0);
                    }
                });
            }
        });
        let records = read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(records.len(), 15_000);
        let mut threads: Vec<u32> = records.iter().map(|r| r.thread).collect();
        threads.sort_unstable();
        threads.dedup();
        assert_eq!(threads.len(), 3, "one trace id a thread");
        for thread in threads {
            let mine: Vec<&Record> = records.iter().filter(|r| r.thread == thread).collect();
            assert!(mine.windows(2).all(|w| w[0].pointer + 1 == w[1].pointer));
            assert!(mine.windows(2).all(|w| w[0].time_ns <= w[1].time_ns));
        }
    }

    #[test]
    fn percent_p_in_the_trace_path_is_the_process_id() {
        let path = |s: &str| trace_path(s.into(), 42);
        assert_eq!(path("/tmp/t-%p.mtrace"), Path::new("/tmp/t-42.mtrace"));
        assert_eq!(path("plain.mtrace"), Path::new("plain.mtrace"));
    }

    #[test]
    fn leak_report_counts_roots_blocks_and_bytes() {
        let heap = Heap::new();
        let mut out = Vec::new();
        write_leak_report(&heap, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "mapialloc: 0 live roots (0 blocks, 0 bytes) at exit\n"
        );

        let big = heap.allocate_buffer(100).unwrap();
        for _ in 0..3 {
            heap.allocate_more(50, big.as_ptr()).unwrap();
        }
        let roots: Vec<_> = (0..LEAK_REPORT_ROOTS + 2)
            .map(|_| heap.allocate_buffer(16).unwrap())
            .collect();
        let live: Vec<LiveRoot> = heap.live_roots().collect();
        let bytes: usize = live.iter().map(|r| r.chain_bytes).sum();
        let mut out = Vec::new();
        write_leak_report(&heap, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            format!("mapialloc: 23 live roots (26 blocks, {bytes} bytes) at exit")
        );
        assert_eq!(lines.len(), 1 + LEAK_REPORT_ROOTS + 1);
        assert!(
            lines[1].contains(&format!("root {big:p}")),
            "largest first: {}",
            lines[1]
        );
        assert!(lines[1].contains("3 linked blocks"));
        assert!(lines[1].contains("page of thread cache "));
        assert_eq!(lines[21], "mapialloc:   ... and 3 more roots");

        for root in roots.into_iter().chain([big]) {
            // SAFETY: each root is live and unused after this.
            unsafe { heap.free_buffer(root.as_ptr()) };
        }
    }
}
