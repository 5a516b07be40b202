//! Host facts from procfs and sysfs: per-cpu busy time, memory, PSI, topology, and the
//! scheduler counters, affinity and names of QEMU's vCPU threads.
//!
//! Every function takes the filesystem root (`/` on a real host) so tests can point it at a
//! fake tree built from captures.

use std::path::{Path, PathBuf};

use procfs::{FromRead, FromReadSI};

use super::{CpuSet, CpuTopo, HostError, HostSample, Topology};
use crate::cpulist;

fn io_err(path: &Path, source: std::io::Error) -> HostError {
    HostError::Io { path: path.display().to_string(), source }
}

fn proc_err(path: &Path, e: procfs::ProcError) -> HostError {
    let source = match e {
        procfs::ProcError::Io(io, _) => io,
        procfs::ProcError::NotFound(_) => std::io::Error::from(std::io::ErrorKind::NotFound),
        other => std::io::Error::other(other.to_string()),
    };
    io_err(path, source)
}

fn read_trim(path: &Path) -> Result<String, HostError> {
    std::fs::read_to_string(path).map(|s| s.trim().to_string()).map_err(|e| io_err(path, e))
}

/// The online cpus (`/sys/devices/system/cpu/online`).
pub fn online_cpus(root: &Path) -> Result<Vec<u32>, HostError> {
    cpu_list(root, "online")
}

/// The cpus the machine has, online or not (`/sys/devices/system/cpu/present`).
pub fn present_cpus(root: &Path) -> Result<Vec<u32>, HostError> {
    cpu_list(root, "present")
}

fn cpu_list(root: &Path, which: &str) -> Result<Vec<u32>, HostError> {
    let p = root.join("sys/devices/system/cpu").join(which);
    let s = read_trim(&p)?;
    cpulist::parse(&s).map_err(|e| HostError::Parse { what: p.display().to_string(), detail: e.to_string() })
}

/// Each online cpu's NUMA node, package, core and last-level cache from sysfs. Missing entries
/// (containers, odd kernels) fall back to node 0, package 0, and for the core to the lowest
/// cpu of `topology/thread_siblings_list` (else the cpu's own id). The LLC domain is the lowest
/// cpu of `cache/index3/shared_cpu_list` (the level-3 cache), else the package's lowest cpu.
pub fn topology(root: &Path) -> Result<Topology, HostError> {
    let mut cpus = Vec::new();
    for cpu in online_cpus(root)? {
        let dir = root.join(format!("sys/devices/system/cpu/cpu{cpu}"));
        let num = |f: &str| read_trim(&dir.join(f)).ok().and_then(|s| s.parse::<u32>().ok());
        let first_of = |f: &str| {
            read_trim(&dir.join(f)).ok().and_then(|s| cpulist::parse(&s).ok()).and_then(|l| l.first().copied())
        };
        let node = std::fs::read_dir(&dir)
            .ok()
            .and_then(|rd| {
                rd.filter_map(Result::ok)
                    .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix("node")?.parse::<u32>().ok()))
                    .next()
            })
            .unwrap_or(0);
        let core = num("topology/core_id").or_else(|| first_of("topology/thread_siblings_list")).unwrap_or(cpu);
        let llc = first_of("cache/index3/shared_cpu_list").unwrap_or(u32::MAX);
        cpus.push(CpuTopo { cpu, node, package: num("topology/physical_package_id").unwrap_or(0), core, llc });
    }
    // No level-3 cache described: the package is the LLC domain (its lowest cpu names it).
    let first_of_package = |p: u32| cpus.iter().filter(|c| c.package == p).map(|c| c.cpu).min().unwrap_or(0);
    let llcs: Vec<u32> =
        cpus.iter().map(|c| if c.llc == u32::MAX { first_of_package(c.package) } else { c.llc }).collect();
    for (c, llc) in cpus.iter_mut().zip(llcs) {
        c.llc = llc;
    }
    Ok(Topology { cpus })
}

/// Per-cpu busy time, memory and memory pressure.
pub fn host_sample(root: &Path) -> Result<HostSample, HostError> {
    let online = online_cpus(root)?;
    let stat_path = root.join("proc/stat");
    let ks = procfs::KernelStats::from_file(&stat_path, procfs::current_system_info())
        .map_err(|e| proc_err(&stat_path, e))?;
    if ks.cpu_time.len() != online.len() {
        return Err(HostError::Parse {
            what: stat_path.display().to_string(),
            detail: format!("{} cpu lines but {} online cpus (hotplug in progress?)", ks.cpu_time.len(), online.len()),
        });
    }
    let ns_per_tick = 1_000_000_000 / procfs::ticks_per_second().max(1);
    let cpu_busy_ns = ks
        .cpu_time
        .iter()
        .map(|t| {
            let ticks = t.user + t.nice + t.system + t.irq.unwrap_or(0) + t.softirq.unwrap_or(0) + t.steal.unwrap_or(0);
            ticks.saturating_mul(ns_per_tick)
        })
        .collect();
    let mem_path = root.join("proc/meminfo");
    let mi = procfs::Meminfo::from_file(&mem_path).map_err(|e| proc_err(&mem_path, e))?;
    // Meminfo is in bytes in procfs-core (it converts the kB of the file).
    let mem_total_kib = mi.mem_total / 1024;
    let mem_available_kib = mi.mem_available.unwrap_or(mi.mem_free + mi.cached) / 1024;
    let psi =
        procfs::MemoryPressure::from_file(root.join("proc/pressure/memory")).ok().map(|p| f64::from(p.some.avg10));
    Ok(HostSample { cpu_ids: online, cpu_busy_ns, mem_total_kib, mem_available_kib, mem_pressure_some_avg10: psi })
}

/// Path of a thread's directory under procfs.
pub fn task_dir(root: &Path, pid: u32, tid: u32) -> PathBuf {
    root.join(format!("proc/{pid}/task/{tid}"))
}

/// Run and wait time of a thread, ns. `Ok(None)` when the thread is gone.
pub fn schedstat(root: &Path, pid: u32, tid: u32) -> Result<Option<(u64, u64)>, HostError> {
    let p = task_dir(root, pid, tid).join("schedstat");
    match procfs::process::Schedstat::from_file(&p) {
        Ok(s) => Ok(Some((s.sum_exec_runtime, s.run_delay))),
        Err(procfs::ProcError::NotFound(_)) => Ok(None),
        Err(procfs::ProcError::Io(e, _)) if is_gone(&e) => Ok(None),
        Err(e) => Err(proc_err(&p, e)),
    }
}

/// The thread is gone: its directory no longer exists, or an open file outlived it (`ESRCH`).
pub(super) fn is_gone(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(nix::libc::ESRCH)
}

/// The cpu a thread last ran on (field `processor` of its `stat`). `None` when gone.
pub fn last_cpu(root: &Path, pid: u32, tid: u32) -> Option<u32> {
    let p = task_dir(root, pid, tid).join("stat");
    let st = procfs::process::Stat::from_file(p).ok()?;
    st.processor.and_then(|c| u32::try_from(c).ok())
}

/// A thread's cpu affinity: `sched_getaffinity` on the real host (`root == /`), otherwise the
/// `Cpus_allowed_list` line of its `status` (fake trees in tests). `None` when gone.
pub fn affinity(root: &Path, pid: u32, tid: u32) -> Option<CpuSet> {
    if root == Path::new("/") {
        let tid_i = i32::try_from(tid).ok()?;
        let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(tid_i)).ok()?;
        let cpus = (0..possible_cpus())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .filter_map(|c| u32::try_from(c).ok())
            .collect();
        return Some(CpuSet(cpus));
    }
    let status = std::fs::read_to_string(task_dir(root, pid, tid).join("status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
    cpulist::parse(line.trim()).ok().map(CpuSet)
}

/// How many cpu ids this kernel can have (the last of `/sys/devices/system/cpu/possible`,
/// plus one): an affinity mask has no bit beyond it, so its scan stops there (a tenth of a
/// microsecond a thread on a small host instead of the whole 1024-bit set). Read once.
fn possible_cpus() -> usize {
    static POSSIBLE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let all = nix::sched::CpuSet::count();
    *POSSIBLE.get_or_init(|| {
        let p = Path::new("/sys/devices/system/cpu/possible");
        let last = read_trim(p).ok().and_then(|s| cpulist::parse(&s).ok()).and_then(|c| c.last().copied());
        last.and_then(|c| usize::try_from(c).ok()).map_or(all, |c| (c + 1).min(all))
    })
}

/// The vCPU threads of a QEMU process, found by name (`CPU <n>/KVM`, `CPU <n>/TCG`):
/// `(vcpu index, tid)` pairs.
pub fn vcpu_threads(root: &Path, pid: u32) -> Result<Vec<(u32, u32)>, HostError> {
    let dir = root.join(format!("proc/{pid}/task"));
    let rd = std::fs::read_dir(&dir).map_err(|e| io_err(&dir, e))?;
    let mut out = Vec::new();
    for entry in rd.filter_map(Result::ok) {
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else { continue };
        if let Some(n) = parse_vcpu_comm(comm.trim()) {
            out.push((n, tid));
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// `CPU 3/KVM` → 3. Any accelerator suffix is accepted.
pub fn parse_vcpu_comm(comm: &str) -> Option<u32> {
    let rest = comm.strip_prefix("CPU ")?;
    let (n, accel) = rest.split_once('/')?;
    if accel.is_empty() {
        return None;
    }
    n.parse().ok()
}

/// When a process started, epoch seconds (boot time + its `starttime`).
pub fn process_start_epoch_s(root: &Path, pid: u32) -> Option<u64> {
    let st = procfs::process::Stat::from_file(root.join(format!("proc/{pid}/stat"))).ok()?;
    let ks = procfs::KernelStats::from_file(root.join("proc/stat"), procfs::current_system_info()).ok()?;
    Some(ks.btime + st.starttime / procfs::ticks_per_second().max(1))
}

/// QEMU's pid from libvirt's pid file for a domain (system instance).
pub fn qemu_pid(root: &Path, name: &str) -> Option<u32> {
    let p = root.join(format!("run/libvirt/qemu/{name}.pid"));
    read_trim(&p).ok()?.parse().ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn vcpu_comm_names() {
        assert_eq!(parse_vcpu_comm("CPU 0/KVM"), Some(0));
        assert_eq!(parse_vcpu_comm("CPU 12/TCG"), Some(12));
        assert_eq!(parse_vcpu_comm("CPU x/KVM"), None);
        assert_eq!(parse_vcpu_comm("CPU 1/"), None);
        assert_eq!(parse_vcpu_comm("IO mon_iothread"), None);
    }

    #[test]
    fn real_affinity_is_the_whole_mask() {
        // The scan stops at the last possible cpu: nothing of the mask may be left out.
        let pid = std::process::id();
        let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
        let all: Vec<u32> = (0..nix::sched::CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap())
            .map(|c| u32::try_from(c).unwrap())
            .collect();
        assert!(!all.is_empty());
        assert_eq!(affinity(Path::new("/"), pid, pid), Some(CpuSet(all)));
    }

    fn fake_tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let w = |p: &str, s: &str| {
            let path = d.path().join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, s).unwrap();
        };
        // Captured on a lab host (2 cpus), trimmed.
        w("sys/devices/system/cpu/online", "0-1\n");
        w("sys/devices/system/cpu/cpu0/topology/core_id", "0\n");
        w("sys/devices/system/cpu/cpu0/topology/physical_package_id", "0\n");
        w("sys/devices/system/cpu/cpu0/node0/.keep", "");
        w("sys/devices/system/cpu/cpu1/topology/core_id", "1\n");
        w("sys/devices/system/cpu/cpu1/topology/physical_package_id", "0\n");
        w(
            "proc/stat",
            "cpu  100 0 50 1000 0 0 0 0 0 0\ncpu0 60 0 30 500 0 0 0 0 0 0\ncpu1 40 0 20 500 0 0 0 0 0 0\nintr 0\nctxt 10\nbtime 1700000000\nprocesses 5\nprocs_running 1\nprocs_blocked 0\n",
        );
        w(
            "proc/meminfo",
            "MemTotal:       24000000 kB\nMemFree:        20000000 kB\nMemAvailable:   22000000 kB\nBuffers: 0 kB\nCached: 100 kB\nSwapCached: 0 kB\nActive: 0 kB\nInactive: 0 kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\nDirty: 0 kB\nWriteback: 0 kB\nMapped: 0 kB\nShmem: 0 kB\nSlab: 0 kB\nPageTables: 0 kB\nCommitLimit: 0 kB\nCommitted_AS: 0 kB\nVmallocTotal: 0 kB\nVmallocUsed: 0 kB\nVmallocChunk: 0 kB\nAnonPages: 0 kB\nKernelStack: 0 kB\nSReclaimable: 0 kB\nSUnreclaim: 0 kB\nBounce: 0 kB\nNFS_Unstable: 0 kB\nMlocked: 0 kB\nUnevictable: 0 kB\nInactive(file): 0 kB\nActive(file): 0 kB\nInactive(anon): 0 kB\nActive(anon): 0 kB\n",
        );
        w(
            "proc/pressure/memory",
            "some avg10=1.50 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
        );
        w("proc/42/task/43/comm", "CPU 0/TCG\n");
        w("proc/42/task/43/schedstat", "7521520270 91560117 3251\n");
        w("proc/42/task/43/status", "Name:\tCPU 0/TCG\nCpus_allowed_list:\t1\n");
        w("proc/42/task/44/comm", "CPU 1/TCG\n");
        w("proc/42/task/44/schedstat", "6419603225 115050239 2562\n");
        w("proc/42/task/45/comm", "IO mon_iothread\n");
        w("run/libvirt/qemu/web.pid", "42");
        d
    }

    #[test]
    fn reads_a_fake_tree() {
        let d = fake_tree();
        let r = d.path();
        let topo = topology(r).unwrap();
        assert_eq!(topo.cpus.len(), 2);
        assert_eq!(topo.cpus[1].core, 1);
        assert_eq!(topo.cpus[1].llc, 0, "no level-3 cache described: the package is the LLC domain");
        let hs = host_sample(r).unwrap();
        assert_eq!(hs.cpu_ids, vec![0, 1]);
        let tps = procfs::ticks_per_second();
        assert_eq!(hs.cpu_busy_ns[0], 90 * (1_000_000_000 / tps));
        assert_eq!(hs.mem_available_kib, 22_000_000);
        assert_eq!(hs.mem_pressure_some_avg10, Some(1.5));
        assert_eq!(qemu_pid(r, "web"), Some(42));
        assert_eq!(vcpu_threads(r, 42).unwrap(), vec![(0, 43), (1, 44)]);
        assert_eq!(schedstat(r, 42, 43).unwrap(), Some((7521520270, 91560117)));
        assert_eq!(schedstat(r, 42, 99).unwrap(), None, "a vanished thread is not an error");
        assert_eq!(affinity(r, 42, 43), Some(CpuSet(vec![1])));
    }

    /// A machine of `tests/fixtures/sysfs/` (written by its `generate.sh`).
    pub(crate) fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sysfs").join(name)
    }

    #[test]
    fn two_socket_xeon_has_a_node_and_an_llc_per_socket_and_smt_pairs() {
        let t = topology(&fixture("xeon-2s16c2t")).unwrap();
        assert_eq!(t.cpus.len(), 64);
        for c in &t.cpus {
            let socket = (c.cpu % 32) / 16;
            assert_eq!((c.node, c.package), (socket, socket), "cpu {}", c.cpu);
            assert_eq!(c.llc, socket * 16, "cpu {}: the LLC is named by the socket's lowest cpu", c.cpu);
            assert_eq!(c.core, c.cpu % 16, "cpu {}", c.cpu);
            assert_eq!(t.siblings(c.cpu), vec![c.cpu % 32, c.cpu % 32 + 32], "cpu {}", c.cpu);
        }
    }

    #[test]
    fn chiplet_has_an_llc_per_ccx_inside_one_node() {
        let t = topology(&fixture("epyc-1s4ccx")).unwrap();
        assert_eq!(t.cpus.len(), 32);
        for c in &t.cpus {
            assert_eq!((c.node, c.package), (0, 0), "cpu {}", c.cpu);
            assert_eq!(c.llc, (c.cpu % 16) / 4 * 4, "cpu {}", c.cpu);
            assert_eq!(t.siblings(c.cpu), vec![c.cpu % 16, c.cpu % 16 + 16], "cpu {}", c.cpu);
        }
        let llcs: std::collections::BTreeSet<u32> = t.cpus.iter().map(|c| c.llc).collect();
        assert_eq!(llcs.into_iter().collect::<Vec<_>>(), vec![0, 4, 8, 12]);
    }

    #[test]
    fn siblings_come_from_thread_siblings_list_when_core_id_is_missing() {
        let d = tempfile::tempdir().unwrap();
        let w = |p: &str, s: &str| {
            let path = d.path().join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, s).unwrap();
        };
        w("sys/devices/system/cpu/online", "0-3\n");
        for (cpu, sib) in [(0, "0,2"), (1, "1,3"), (2, "0,2"), (3, "1,3")] {
            w(&format!("sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"), sib);
        }
        let t = topology(d.path()).unwrap();
        assert_eq!(t.siblings(2), vec![0, 2]);
        assert_eq!(t.siblings(1), vec![1, 3]);
    }
}
