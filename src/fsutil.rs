//! Small file-system primitives the spool and the context writer are built from.
//!
//! Every write a reader could observe half-done goes through [`atomic_write`]: a temporary file in the
//! same directory, fsync, rename over the target, fsync of the directory. Durability (the fsyncs) can be
//! turned off for benchmarks and throwaway trees; atomicity (the rename) never is.
//!
//! It also measures: the free space of a file system ([`free_bytes`]) and, within a budget, the disk
//! use of a folder ([`disk_use`]); measuring never follows a symlink or leaves the file system.

use std::collections::{HashMap, VecDeque};
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex};

static DURABLE: AtomicBool = AtomicBool::new(true);
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Turns fsync on or off for the whole process (config `orchestrator.durable`).
pub fn set_durable(on: bool) {
    DURABLE.store(on, Ordering::Relaxed);
}

pub fn durable() -> bool {
    DURABLE.load(Ordering::Relaxed)
}

/// fsync a directory so a rename or create inside it, made before the call, survives a power cut.
///
/// Group-committed per directory: a fsync that starts after a change covers it, so a caller whose
/// change is older than the fsync in flight waits for the next one, which one of the waiters starts
/// for all of them. Eight attempts finishing into `completed/` at once then share one or two fsyncs
/// instead of queueing for the directory's lock eight times in a row.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    if !durable() {
        return Ok(());
    }
    dir_sync(dir).sync(dir)
}

/// One directory's group commit: generations of fsyncs, numbered as they start.
#[derive(Default)]
struct DirSync {
    state: Mutex<DirSyncState>,
    done: Condvar,
}

#[derive(Default)]
struct DirSyncState {
    started: u64,
    finished: u64,
    in_flight: bool,
    /// Callers waiting for a generation (tests watch it).
    waiting: usize,
    /// Failed generations, newest last, a bounded few: a caller gets the error of the generation
    /// it waited for. One that slept through more than the list holds gets the newest failure if
    /// that is at or after its generation (an error too many, never one too few).
    failures: VecDeque<(u64, io::ErrorKind, String)>,
}

const KEPT_FAILURES: usize = 64;

impl DirSync {
    fn sync(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // The one in flight may have started before our change reached the directory.
        let need = st.started + 1;
        while st.finished < need {
            if st.in_flight {
                st.waiting += 1;
                st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
                st.waiting -= 1;
                continue;
            }
            st.in_flight = true;
            st.started += 1;
            let generation = st.started;
            drop(st);
            let r = File::open(dir).and_then(|f| f.sync_all());
            st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.in_flight = false;
            st.finished = generation;
            if let Err(e) = r {
                if st.failures.len() == KEPT_FAILURES {
                    st.failures.pop_front();
                }
                st.failures.push_back((generation, e.kind(), e.to_string()));
            }
            self.done.notify_all();
        }
        let oldest_kept = st.failures.front().map_or(0, |f| f.0);
        let failure = if need >= oldest_kept || st.failures.len() < KEPT_FAILURES {
            st.failures.iter().find(|f| f.0 == need)
        } else {
            st.failures.back().filter(|f| f.0 >= need)
        };
        match failure {
            Some((_, kind, msg)) => Err(io::Error::new(*kind, msg.clone())),
            None => Ok(()),
        }
    }
}

fn dir_sync(dir: &Path) -> Arc<DirSync> {
    static DIRS: LazyLock<Mutex<HashMap<PathBuf, Arc<DirSync>>>> = LazyLock::new(Default::default);
    let mut dirs = DIRS.lock().unwrap_or_else(|e| e.into_inner());
    if dirs.len() > 256 {
        // Directories nobody is syncing right now: a later caller starts afresh, which is correct.
        dirs.retain(|_, d| Arc::strong_count(d) > 1);
    }
    dirs.entry(dir.to_path_buf()).or_default().clone()
}

fn tmp_name(target: &Path) -> PathBuf {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = target
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A leading dot keeps the spool's name whitelist from ever treating a half-written file as a task.
    target.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

/// Write `data` to `target` atomically: readers see the old content or the new one, never a mix.
pub fn atomic_write(target: &Path, data: &[u8]) -> io::Result<()> {
    write_renamed(target, data, durable(), durable(), SPOOL_POINTS)
}

/// The commit points of a record written by [`atomic_write`]: before its rename, after it.
const SPOOL_POINTS: [&str; 2] = ["write.before_rename", "write.after_rename"];

/// [`atomic_write`] of a state file with commit points of its own (`points`: before the rename,
/// after it), so the crash suite can stop exactly there whatever else the run writes.
pub fn atomic_write_at(target: &Path, data: &[u8], points: [&str; 2]) -> io::Result<()> {
    write_renamed(target, data, durable(), durable(), points)
}

/// [`atomic_write`] without fsync, for files derived from others that are regenerated when lost
/// (context state files, prompt copies): atomic for readers, not worth a disk flush on the hot path.
pub fn atomic_write_derived(target: &Path, data: &[u8]) -> io::Result<()> {
    write_renamed(target, data, false, false, SPOOL_POINTS)
}

/// [`atomic_write`] whose directory entry is made durable by the caller: the file's data is synced,
/// but the directory fsync is left to the commit that follows in the same directory (one fsync covers
/// both names).
pub fn atomic_write_before_commit(target: &Path, data: &[u8]) -> io::Result<()> {
    write_renamed(target, data, durable(), false, SPOOL_POINTS)
}

fn write_renamed(
    target: &Path,
    data: &[u8],
    sync_file: bool,
    sync_dir: bool,
    [before, after]: [&str; 2],
) -> io::Result<()> {
    let tmp = tmp_name(target);
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(data)?;
        if sync_file {
            f.sync_all()?;
        }
        drop(f);
        // Only records that must survive a crash are commit points (not the derived state files).
        if sync_file {
            crate::failpoint::hit(before);
        }
        fs::rename(&tmp, target)?;
        if sync_file {
            crate::failpoint::hit(after);
        }
        if sync_dir && let Some(dir) = target.parent() {
            fsync_dir(dir)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Write `data` to a temporary file beside `dir/name` and move it into place only if `name` is free.
/// Returns `Ok(false)` when the name is taken. Used where two writers may race for one name (task ids).
pub fn atomic_create(dir: &Path, name: &str, data: &[u8]) -> io::Result<bool> {
    let target = dir.join(name);
    let tmp = tmp_name(&target);
    let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
    let written = f
        .write_all(data)
        .and_then(|_| if durable() { f.sync_all() } else { Ok(()) });
    drop(f);
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    match rename_noreplace(&tmp, &target) {
        Ok(()) => {
            fsync_dir(dir)?;
            Ok(true)
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            if e.kind() == io::ErrorKind::AlreadyExists {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// `rename` that fails with `AlreadyExists` instead of replacing the target (Linux `RENAME_NOREPLACE`).
/// Falls back to link+unlink on file systems without renameat2 support; both are atomic with respect
/// to the target name.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let (a, b) = (cstr(from)?, cstr(to)?);
    // SAFETY: both pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            fs::hard_link(from, to)?;
            fs::remove_file(from)
        }
        _ => Err(err),
    }
}

/// Move `from` into `dir` under `name`, or under `name` with a numeric suffix when that is taken.
/// Used for files whose name we do not control (rejected and quarantined input): nothing is overwritten.
pub fn move_unique(from: &Path, dir: &Path, name: &str) -> io::Result<PathBuf> {
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => (&name[..i], &name[i..]),
        _ => (name, ""),
    };
    for n in 0..10_000u32 {
        let candidate = if n == 0 {
            dir.join(name)
        } else {
            dir.join(format!("{stem}.{n}{ext}"))
        };
        match rename_noreplace(from, &candidate) {
            Ok(()) => return Ok(candidate),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("no free name for {name} in {}", dir.display()),
    ))
}

/// Current time as RFC 3339 UTC with millisecond precision.
pub fn now_rfc3339() -> String {
    fmt_time(time::OffsetDateTime::now_utc())
}

/// Fixed width (always three fraction digits, always `Z`), so timestamps sort correctly as strings,
/// in result files and in the mirror's `ORDER BY`.
pub fn fmt_time(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&fmt)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

pub fn parse_time(s: &str) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
}

/// A duration as people read a clock: `9s`, `2m13s`, `1h04m`.
pub fn duration_text(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// Seconds from `since` (RFC 3339) to now; `None` when it cannot be read.
pub fn seconds_since(since: &str) -> Option<u64> {
    let t = parse_time(since)?;
    Some((time::OffsetDateTime::now_utc() - t).whole_seconds().max(0) as u64)
}

/// The kernel's boot id: a pid recorded before a reboot means nothing after it.
pub fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its full length; gethostname NUL-terminates within it on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Whether a process with this pid exists (it may belong to someone else: callers also check locks).
pub fn pid_alive(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid as i32, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Open a regular file for reading, and nothing else: opened without blocking and without becoming a
/// controlling terminal, then checked as opened (`fstat`), so a FIFO, device or socket in its place
/// neither hangs the caller nor is read. Symlinks are followed (callers check where paths lead).
pub fn open_regular(path: &Path) -> io::Result<File> {
    use rustix::fs::{FileType, Mode, OFlags};
    let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let fd = rustix::fs::open(path, flags, Mode::empty())?;
    if FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode) != FileType::RegularFile {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file (a directory, FIFO, socket or device)",
        ));
    }
    Ok(File::from(fd))
}

/// Device id of a path, to check that all spool directories live on one file system.
pub fn device_of(p: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(fs::metadata(p)?.dev())
}

/// Bytes an unprivileged writer may still use on the file system holding `path`
/// (`f_bavail * f_frsize`: the root-reserved blocks are not ours to count on).
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let s = rustix::fs::statvfs(path)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// Bytes as people read them: `512 B`, `4.0 KiB`, `1.2 GiB`.
pub fn bytes_text(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// How far a [`disk_use`] walk may go: entries looked at and time, shared by the walks given it.
pub struct WalkBudget {
    entries_left: u64,
    deadline: std::time::Instant,
}

impl WalkBudget {
    pub fn new(entries: u64, time: std::time::Duration) -> WalkBudget {
        WalkBudget {
            entries_left: entries,
            deadline: std::time::Instant::now() + time,
        }
    }

    fn spent(&self) -> bool {
        self.entries_left == 0 || std::time::Instant::now() >= self.deadline
    }
}

/// What a folder holds on disk, as far as a walk got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskUse {
    /// Allocated bytes (`st_blocks * 512`) of everything seen, each hard-linked file once.
    pub bytes: u64,
    /// The walk saw everything; otherwise `bytes` is a lower bound (the budget ran out, or some
    /// entry could not be read).
    pub complete: bool,
}

/// The disk use of `dir` and everything under it on the same file system, without following
/// symlinks (a link counts as itself), within `budget`. Another file system mounted inside (a
/// tmpfs, a network share) is not ours to measure and would make the walk unbounded in cost.
pub fn disk_use(dir: &Path, budget: &mut WalkBudget) -> DiskUse {
    use std::os::unix::fs::MetadataExt;
    let mut out = DiskUse {
        bytes: 0,
        complete: true,
    };
    let mut linked = std::collections::HashSet::new();
    let walk = walkdir::WalkDir::new(dir)
        .follow_links(false)
        .same_file_system(true);
    for entry in walk {
        if budget.spent() {
            out.complete = false;
            break;
        }
        budget.entries_left -= 1;
        let Ok(meta) = entry.and_then(|e| e.metadata()) else {
            out.complete = false;
            continue;
        };
        if meta.nlink() > 1 && !meta.is_dir() && !linked.insert((meta.dev(), meta.ino())) {
            continue;
        }
        out.bytes = out.bytes.saturating_add(meta.blocks().saturating_mul(512));
    }
    out
}

/// The last `max` bytes of the file at `path` (from a line start when one is near), as text.
pub fn read_tail(path: &Path, max: u64) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let from = len.saturating_sub(max);
    f.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::with_capacity((len - from) as usize);
    f.take(max).read_to_end(&mut buf)?;
    let mut text = String::from_utf8_lossy(&buf).into_owned();
    if from > 0
        && let Some(nl) = text.find('\n')
        && nl < 4096
    {
        text.drain(..=nl);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_in_binary_units() {
        assert_eq!(bytes_text(0), "0 B");
        assert_eq!(bytes_text(1023), "1023 B");
        assert_eq!(bytes_text(4096), "4.0 KiB");
        assert_eq!(bytes_text(1536 * 1024 * 1024), "1.5 GiB");
    }

    #[test]
    fn disk_use_counts_blocks_once_per_inode_and_stops_at_its_budget() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = vec![7u8; 64 * 1024];
        fs::write(dir.path().join("a"), &data).expect("write");
        fs::hard_link(dir.path().join("a"), dir.path().join("b")).expect("link");
        std::os::unix::fs::symlink("/usr", dir.path().join("usr")).expect("symlink");
        let mut budget = WalkBudget::new(1_000, std::time::Duration::from_secs(10));
        let used = disk_use(dir.path(), &mut budget);
        assert!(used.complete);
        // One copy of the file's blocks (plus the folder's own and the link's), never /usr.
        assert!(used.bytes >= 64 * 1024, "{used:?}");
        assert!(used.bytes < 2 * 64 * 1024, "{used:?}");
        for i in 0..10 {
            fs::write(dir.path().join(format!("f{i}")), &data).expect("write");
        }
        let mut small = WalkBudget::new(3, std::time::Duration::from_secs(10));
        let partial = disk_use(dir.path(), &mut small);
        assert!(!partial.complete, "{partial:?}");
        let after = disk_use(dir.path(), &mut small);
        assert_eq!(
            after,
            DiskUse {
                bytes: 0,
                complete: false
            },
            "a spent budget walks nothing"
        );
    }

    #[test]
    fn durations_read_like_a_clock() {
        assert_eq!(duration_text(9), "9s");
        assert_eq!(duration_text(133), "2m13s");
        assert_eq!(duration_text(3840), "1h04m");
    }

    #[test]
    fn timestamps_are_fixed_width_and_sort_as_strings() {
        let a = time::macros::datetime!(2026-01-01 00:00:00.120 UTC);
        let b = time::macros::datetime!(2026-01-01 00:00:00.123 UTC);
        assert_eq!(fmt_time(a), "2026-01-01T00:00:00.120Z");
        assert!(fmt_time(a) < fmt_time(b));
        assert_eq!(parse_time(&fmt_time(b)), Some(b));
    }

    /// Run `f` on `n` threads; their results come through the receiver.
    fn callers<T: Send + 'static>(
        n: usize,
        f: impl Fn() -> T + Send + Sync + 'static,
    ) -> std::sync::mpsc::Receiver<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        let f = Arc::new(f);
        for _ in 0..n {
            let (tx, f) = (tx.clone(), f.clone());
            std::thread::spawn(move || tx.send(f()));
        }
        rx
    }

    /// `n` results, each within 30 s: a lost wake-up fails the test instead of hanging it.
    fn results<T>(rx: &std::sync::mpsc::Receiver<T>, n: usize) -> Vec<T> {
        (0..n)
            .map(|_| {
                rx.recv_timeout(std::time::Duration::from_secs(30))
                    .expect("a caller of sync never returned")
            })
            .collect()
    }

    #[test]
    fn a_dir_fsync_in_flight_when_called_does_not_count() {
        let dir = tempfile::tempdir().unwrap();
        let ds = Arc::new(DirSync::default());
        // Generation 1 is in flight: it may have started before the caller's rename.
        {
            let mut st = ds.state.lock().unwrap();
            st.started = 1;
            st.in_flight = true;
        }
        let (d, p) = (ds.clone(), dir.path().to_path_buf());
        let caller = callers(1, move || d.sync(&p));
        let t0 = std::time::Instant::now();
        while ds.state.lock().unwrap().waiting == 0 {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(10),
                "the caller never queued behind generation 1"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        {
            let mut st = ds.state.lock().unwrap();
            st.finished = 1;
            st.in_flight = false;
            ds.done.notify_all();
        }
        results(&caller, 1).pop().unwrap().unwrap();
        let st = ds.state.lock().unwrap();
        assert_eq!(
            st.started, 2,
            "the caller ran a fsync of its own after generation 1"
        );
        assert_eq!(st.finished, 2);
    }

    #[test]
    fn concurrent_dir_fsyncs_all_return() {
        let dir = tempfile::tempdir().unwrap();
        let ds = Arc::new(DirSync::default());
        let (d, p) = (ds.clone(), dir.path().to_path_buf());
        let rx = callers(8, move || (0..50).map(|_| d.sync(&p)).collect::<Vec<_>>());
        for r in results(&rx, 8) {
            assert!(r.iter().all(|r| r.is_ok()));
        }
        let st = ds.state.lock().unwrap();
        assert!(!st.in_flight && st.waiting == 0 && st.finished == st.started);
    }

    #[test]
    fn a_failed_dir_fsync_reaches_every_caller_it_covered_and_no_later_one() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("d");
        let ds = Arc::new(DirSync::default());
        let (d, p) = (ds.clone(), dir.clone());
        let rx = callers(8, move || (0..20).map(|_| d.sync(&p)).collect::<Vec<_>>());
        for r in results(&rx, 8).into_iter().flatten() {
            assert_eq!(r.unwrap_err().kind(), io::ErrorKind::NotFound);
        }
        // The directory exists now: a new generation succeeds, and its caller is not handed the
        // earlier failures.
        std::fs::create_dir(&dir).unwrap();
        ds.sync(&dir).unwrap();
    }
}
