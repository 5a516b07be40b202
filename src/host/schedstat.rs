//! The vCPU threads' `schedstat` files, kept open between quanta.
//!
//! Reading a thread's counters is the agent's hot path: every vCPU thread, every quantum.
//! Opening `/proc/<pid>/task/<tid>/schedstat` walks the path and sets up a file each time;
//! procfs regenerates the file's text on every read at offset 0, so the file is opened once
//! and re-read with `pread` at offset 0 (a third of the cost, `benches/sampling.rs`).
//!
//! An open file stays bound to its thread: once the thread exits, reads fail (`ESRCH`) even if
//! its tid is reused. A failed read therefore drops the file and reads the path afresh, which
//! gives exactly what an open-read-close would: the counters of whatever thread has that tid
//! now, or "gone". Files are keyed by (pid, tid), so a thread of another process is another
//! file. The set is bounded twice: files of threads not read during a whole pass (a quantum:
//! [`SchedstatFiles::start_pass`]) are closed, and at most `capacity` files stay open (the
//! process's open-file limit, see [`open_file_budget`]); beyond it threads are read the old
//! way, open-read-close.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::HostError;
use super::procfs::{is_gone, task_dir};

/// File descriptors left for everything else (libvirt's socket, the metrics listener and its
/// connections, logs, one-off procfs and sysfs reads).
const FD_RESERVE: u64 = 256;
/// The open-file limit the agent raises its soft limit to, when the hard limit allows.
const FD_WANTED: u64 = 65_536;

/// A thread's cached file and the pass that last read it.
#[derive(Debug)]
struct Slot {
    file: File,
    pass: u64,
}

/// Open `schedstat` files of the threads read recently, by (pid, tid).
#[derive(Debug)]
pub struct SchedstatFiles {
    root: PathBuf,
    open: HashMap<(u32, u32), Slot>,
    pass: u64,
    capacity: usize,
}

impl SchedstatFiles {
    /// A reader under the filesystem root `root` (`/` on a real host) keeping at most
    /// `capacity` files open.
    pub fn new(root: &Path, capacity: usize) -> Self {
        SchedstatFiles { root: root.to_path_buf(), open: HashMap::new(), pass: 0, capacity }
    }

    /// Starts a pass (one quantum's reads): closes the files of threads that the previous
    /// pass did not read (their guest stopped, the vCPU was unplugged, or the thread changed).
    pub fn start_pass(&mut self) {
        let last = self.pass;
        self.open.retain(|_, s| s.pass == last);
        self.pass += 1;
    }

    /// How many files are open now.
    pub fn open_files(&self) -> usize {
        self.open.len()
    }

    /// Run and wait time of a thread, ns. `Ok(None)` when the thread is gone.
    pub fn read(&mut self, pid: u32, tid: u32) -> Result<Option<(u64, u64)>, HostError> {
        let key = (pid, tid);
        if let Some(slot) = self.open.get_mut(&key) {
            slot.pass = self.pass;
            if let Ok(Ok(v)) = read_counters(&slot.file) {
                return Ok(Some(v));
            }
            // The thread exited (its tid may now be another thread's), or the file went bad:
            // read the path afresh.
            self.open.remove(&key);
        }
        let path = task_dir(&self.root, pid, tid).join("schedstat");
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if is_gone(&e) => return Ok(None),
            Err(e) => return Err(HostError::Io { path: path.display().to_string(), source: e }),
        };
        let v = match read_counters(&file) {
            Ok(Ok(v)) => v,
            Ok(Err(detail)) => return Err(HostError::Parse { what: path.display().to_string(), detail }),
            Err(e) if is_gone(&e) => return Ok(None),
            Err(e) => return Err(HostError::Io { path: path.display().to_string(), source: e }),
        };
        if self.open.len() < self.capacity {
            self.open.insert(key, Slot { file, pass: self.pass });
        }
        Ok(Some(v))
    }
}

/// Reads a `schedstat` file from offset 0: the read error, or the parsed counters or why they
/// do not parse.
fn read_counters(file: &File) -> std::io::Result<Result<(u64, u64), String>> {
    // Three decimal u64 and two spaces: at most 62 bytes and a newline.
    let mut buf = [0u8; 96];
    let n = file.read_at(&mut buf, 0)?;
    Ok(parse(&buf[..n]))
}

/// `"<run ns> <wait ns> <timeslices>\n"` → (run ns, wait ns).
pub fn parse(text: &[u8]) -> Result<(u64, u64), String> {
    let mut fields = text.split(|b| b.is_ascii_whitespace()).filter(|f| !f.is_empty());
    let mut num = |what: &str| -> Result<u64, String> {
        let f = fields.next().ok_or_else(|| format!("no {what} field"))?;
        let mut v: u64 = 0;
        for &b in f {
            if !b.is_ascii_digit() {
                return Err(format!("bad {what} field {:?}", String::from_utf8_lossy(f)));
            }
            v = v
                .checked_mul(10)
                .and_then(|v| v.checked_add(u64::from(b - b'0')))
                .ok_or_else(|| format!("{what} field out of range"))?;
        }
        Ok(v)
    };
    let run = num("run time")?;
    let wait = num("wait time")?;
    Ok((run, wait))
}

/// How many `schedstat` files the agent may keep open. Raises the soft open-file limit towards
/// [`FD_WANTED`] when the hard limit allows (systemd starts services with a soft limit of 1024
/// and a hard one far above), then leaves [`FD_RESERVE`] for everything else.
pub fn open_file_budget() -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return 0 };
    let mut limit = soft;
    if soft < FD_WANTED {
        let want = FD_WANTED.min(hard);
        if want > soft && setrlimit(Resource::RLIMIT_NOFILE, want, hard).is_ok() {
            limit = want;
        }
    }
    usize::try_from(limit.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests;
