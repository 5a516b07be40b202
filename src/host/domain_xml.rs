//! What the agent reads from a domain's XML (live, and persistent for persistent domains):
//! its vCPUs, memory and balloon, the opt-outs (an administrator's placement, the opt-out
//! element), and its QEMU threads with the agent's record of them. Pure: the libvirt calls
//! that fetch the XML are in [`super::libvirt`].

use super::OptOut;
use super::libvirt::{METADATA_NS, PINS_NS};
use super::{CpuSet, QemuThread, ThreadDesc, ThreadPin, record};

/// What the agent needs from a domain's XML.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct XmlFacts {
    pub vcpus: u32,
    pub max_kib: u64,
    pub has_balloon: bool,
    pub stats_period_s: u32,
    pub opt_out: OptOut,
    /// The emulator and I/O threads with their live pins, and whether the agent's record
    /// (in the live `<metadata>`) holds them.
    pub threads: Vec<ThreadDesc>,
    /// The emulator's prior affinity in the agent's record, when the agent pinned it.
    pub emulator_prior: Option<CpuSet>,
}

fn kib(value: &str, unit: Option<&str>) -> Option<u64> {
    let v: u64 = value.trim().parse().ok()?;
    let mul: u64 = match unit.unwrap_or("KiB") {
        "b" | "bytes" => return Some(v / 1024),
        "KB" => return v.checked_mul(1000).map(|b| b / 1024),
        "k" | "KiB" => 1,
        "MB" => return v.checked_mul(1_000_000).map(|b| b / 1024),
        "M" | "MiB" => 1024,
        "GB" => return v.checked_mul(1_000_000_000).map(|b| b / 1024),
        "G" | "GiB" => 1024 * 1024,
        "T" | "TiB" => 1024 * 1024 * 1024,
        _ => return None,
    };
    v.checked_mul(mul)
}

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| c.has_tag_name(name))
}

impl XmlFacts {
    /// What a vCPU thread nobody pinned has, from the affinity of QEMU's main thread (`main`,
    /// read only when needed). Pinning the emulator pins the main thread: once the agent has,
    /// the emulator's recorded prior is the default; once someone else has (a live
    /// `<emulatorpin>` the record does not hold), the main thread's affinity is their choice
    /// and nothing tells the default (`None`: a vCPU set that is not every cpu is then read as
    /// chosen, not as floating to be placed).
    pub fn default_affinity(&self, main: impl FnOnce() -> Option<CpuSet>) -> Option<CpuSet> {
        if self.emulator_prior.is_some() {
            return self.emulator_prior.clone();
        }
        let theirs =
            self.threads.iter().any(|t| t.thread == QemuThread::Emulator && t.pinned_to.is_some() && !t.recorded);
        if theirs { None } else { main() }
    }
}

/// Parses the live XML (and the persistent one, for persistent domains).
pub fn parse_domain_xml(live: &str, persistent: Option<&str>) -> Result<XmlFacts, String> {
    let doc = roxmltree::Document::parse(live).map_err(|e| e.to_string())?;
    let root = doc.root_element();
    let vcpu = child(root, "vcpu").ok_or("no <vcpu>")?;
    let vcpus: u32 =
        vcpu.attribute("current").or(vcpu.text()).and_then(|s| s.trim().parse().ok()).ok_or("bad <vcpu>")?;
    let mem = child(root, "memory").ok_or("no <memory>")?;
    let max_kib = kib(mem.text().unwrap_or(""), mem.attribute("unit")).ok_or("bad <memory>")?;
    let balloon = child(root, "devices").and_then(|d| child(d, "memballoon"));
    let has_balloon = balloon.is_some_and(|b| {
        b.attribute("model") == Some("virtio") || b.attribute("model").is_some_and(|m| m.starts_with("virtio"))
    });
    let stats_period_s = balloon
        .and_then(|b| child(b, "stats"))
        .and_then(|s| s.attribute("period"))
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);

    let mut opt_out = OptOut::default();
    if let Some(el) = child(root, "metadata")
        .and_then(|m| m.children().find(|c| c.is_element() && c.tag_name().namespace() == Some(METADATA_NS)))
    {
        let no = |a: &str| el.attribute(a).is_some_and(|v| matches!(v, "no" | "off" | "false" | "0"));
        if no("manage") {
            let why = "opted out by <metadata> (manage=\"no\")".to_string();
            opt_out.cpu = Some(why.clone());
            opt_out.memory = Some(why);
        }
        if no("cpu") {
            opt_out.cpu = Some("opted out by <metadata> (cpu=\"no\")".into());
        }
        if no("memory") {
            opt_out.memory = Some("opted out by <metadata> (memory=\"no\")".into());
        }
    }
    if opt_out.cpu.is_none() {
        opt_out.cpu = match persistent {
            Some(p) => {
                let pdoc = roxmltree::Document::parse(p).map_err(|e| e.to_string())?;
                administrators_placement(pdoc.root_element(), true, "persistent definition")
            }
            // A transient domain (`virsh create`, oVirt's VDSM, a running guest undefined) has
            // its administrator's choice in the live definition only: `<vcpu cpuset>` and numad
            // placement, which the agent never writes. Its live `<vcpupin>`s are not read as
            // a choice: the agent's own pins are there too, and a single-cpu one is the agent's
            // to move as on any domain (opt such a guest out with the metadata element).
            None => administrators_placement(root, false, "transient definition"),
        };
    }
    let (threads, emulator_prior) = qemu_threads(live, root);
    Ok(XmlFacts { vcpus, max_kib, has_balloon, stats_period_s, opt_out, threads, emulator_prior })
}

/// The placement an administrator chose in a definition, if any: `<vcpu cpuset>`, numad, and
/// with `pins` (a persistent definition, which the agent never writes to) `<cputune><vcpupin>`.
fn administrators_placement(root: roxmltree::Node<'_, '_>, pins: bool, which: &str) -> Option<String> {
    let vcpu = child(root, "vcpu");
    if pins && child(root, "cputune").is_some_and(|t| t.children().any(|c| c.has_tag_name("vcpupin"))) {
        Some(format!("{which} pins vCPUs (<cputune><vcpupin>)"))
    } else if vcpu.and_then(|v| v.attribute("cpuset")).is_some() {
        Some(format!("{which} sets <vcpu cpuset>"))
    } else if vcpu.and_then(|v| v.attribute("placement")) == Some("auto") {
        Some(format!("{which} uses placement='auto' (numad)"))
    } else {
        None
    }
}

/// The emulator and I/O threads of a live definition: their pins (`<cputune><emulatorpin>`,
/// `<iothreadpin>`; none when the thread floats), and the agent's record of them. A thread whose
/// pin does not parse is left out: the agent leaves alone what it cannot read.
fn qemu_threads(live: &str, root: roxmltree::Node<'_, '_>) -> (Vec<ThreadDesc>, Option<CpuSet>) {
    let cputune = child(root, "cputune");
    let pin_of = |tag: &str, id: Option<u32>| -> Option<Result<CpuSet, ()>> {
        let el = cputune?.children().find(|c| {
            c.has_tag_name(tag) && id.is_none_or(|id| c.attribute("iothread").and_then(|v| v.parse().ok()) == Some(id))
        })?;
        Some(
            el.attribute("cpuset")
                .and_then(|s| crate::cpulist::parse(s).ok())
                .filter(|v| !v.is_empty())
                .map(CpuSet)
                .ok_or(()),
        )
    };
    let recorded: Vec<ThreadPin> = match child(root, "metadata")
        .and_then(|m| m.children().find(|c| c.is_element() && c.tag_name().namespace() == Some(PINS_NS)))
    {
        // A record that does not parse hides no thread from discovery: its threads then look
        // pinned by someone else, and are left alone.
        Some(el) => record::parse_threads(&live[el.range()]).unwrap_or_default(),
        None => Vec::new(),
    };
    let mut ids: Vec<u32> = child(root, "iothreadids")
        .map(|t| {
            t.children()
                .filter(|c| c.has_tag_name("iothread"))
                .filter_map(|c| c.attribute("id")?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    if ids.is_empty() {
        let n: u32 = child(root, "iothreads").and_then(|t| t.text()?.trim().parse().ok()).unwrap_or(0);
        ids = (1..=n.min(1024)).collect();
    }
    let mut threads = Vec::with_capacity(ids.len() + 1);
    let all = std::iter::once(QemuThread::Emulator).chain(ids.into_iter().map(QemuThread::IoThread));
    for thread in all {
        let pin = match thread {
            QemuThread::Emulator => pin_of("emulatorpin", None),
            QemuThread::IoThread(id) => pin_of("iothreadpin", Some(id)),
        };
        let pinned_to = match pin {
            None => None,
            Some(Ok(set)) => Some(set),
            Some(Err(())) => continue,
        };
        threads.push(ThreadDesc { thread, pinned_to, recorded: recorded.iter().any(|r| r.thread == thread) });
    }
    let emulator_prior = recorded.into_iter().find(|r| r.thread == QemuThread::Emulator).map(|r| r.prior);
    (threads, emulator_prior)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIVE: &str = r#"<domain type='qemu' id='3'>
  <name>web</name>
  <metadata><vmb:balancer xmlns:vmb="https://vm-balancer.org/xmlns/1" memory="no"/></metadata>
  <memory unit='KiB'>524288</memory>
  <currentMemory unit='KiB'>262144</currentMemory>
  <vcpu placement='static' current='2'>4</vcpu>
  <cputune><vcpupin vcpu='0' cpuset='1'/></cputune>
  <devices><memballoon model='virtio'><stats period='5'/></memballoon></devices>
</domain>"#;

    #[test]
    fn live_xml_facts() {
        let f = parse_domain_xml(LIVE, None).unwrap();
        assert_eq!(f.vcpus, 2);
        assert_eq!(f.max_kib, 524_288);
        assert!(f.has_balloon);
        assert_eq!(f.stats_period_s, 5);
        assert_eq!(f.opt_out.cpu, None, "live pins are not an administrator's choice");
        assert!(f.opt_out.memory.is_some());
    }
    #[test]
    fn persistent_pins_opt_out_of_cpu() {
        let p = "<domain><vcpu>2</vcpu><memory unit='MiB'>512</memory><cputune><vcpupin vcpu='0' cpuset='3'/></cputune></domain>";
        let f = parse_domain_xml(p, Some(p)).unwrap();
        assert_eq!(f.max_kib, 524_288);
        assert!(f.opt_out.cpu.unwrap().contains("vcpupin"));
        assert!(!f.has_balloon);
    }
    #[test]
    fn a_transient_domains_placement_is_read_from_its_live_definition() {
        let with = |vcpu: &str, tune: &str| {
            format!("<domain><vcpu{vcpu}>2</vcpu><memory>1024</memory><cputune>{tune}</cputune></domain>")
        };
        let cpu_opt_out = |x: &str| parse_domain_xml(x, None).unwrap().opt_out.cpu;
        assert_eq!(cpu_opt_out(&with("", "")), None);
        assert_eq!(cpu_opt_out(&with(" cpuset='2-3'", "")).as_deref(), Some("transient definition sets <vcpu cpuset>"));
        assert!(cpu_opt_out(&with(" placement='auto'", "")).unwrap().contains("numad"));
        // Live pins (the agent's, or single-cpu ones it may move) are no choice.
        assert_eq!(cpu_opt_out(&with("", "<vcpupin vcpu='0' cpuset='5'/>")), None);
    }

    #[test]
    fn an_emulator_someone_else_pinned_tells_no_default_affinity() {
        let main = || Some(CpuSet(vec![2, 3]));
        let floating = "<domain><vcpu>2</vcpu><memory>1024</memory></domain>";
        assert_eq!(parse_domain_xml(floating, None).unwrap().default_affinity(main), main());
        // `virsh emulatorpin web 2-3 --live` by an operator: the main thread's 2-3 is theirs.
        let theirs =
            "<domain><vcpu>2</vcpu><memory>1024</memory><cputune><emulatorpin cpuset='2-3'/></cputune></domain>";
        assert_eq!(parse_domain_xml(theirs, None).unwrap().default_affinity(main), None);
        // The agent's own: the prior it recorded.
        let ours = r#"<domain><vcpu>2</vcpu><memory>1024</memory><cputune><emulatorpin cpuset='2-3'/></cputune>
          <metadata><p:balancer xmlns:p="https://vm-balancer.org/xmlns/1/pins"><p:emulator prior="0-7"/></p:balancer></metadata></domain>"#;
        assert_eq!(
            parse_domain_xml(ours, None).unwrap().default_affinity(main),
            Some(CpuSet(vec![0, 1, 2, 3, 4, 5, 6, 7]))
        );
    }

    #[test]
    fn manage_no_opts_out_of_everything() {
        let x = r#"<domain><vcpu>1</vcpu><memory>1024</memory><metadata><b:balancer xmlns:b="https://vm-balancer.org/xmlns/1" manage="no"/></metadata><devices><memballoon model='none'/></devices></domain>"#;
        let f = parse_domain_xml(x, None).unwrap();
        assert!(f.opt_out.cpu.is_some() && f.opt_out.memory.is_some());
        assert!(!f.has_balloon);
    }
    #[test]
    fn emulator_and_io_thread_pins_and_the_record_are_read_from_the_live_xml() {
        let live = r#"<domain><vcpu>2</vcpu><memory>1024</memory>
  <metadata><vmbpins:balancer xmlns:vmbpins="https://vm-balancer.org/xmlns/1/pins"><vmbpins:pin vcpu="0" prior="0-3"/><vmbpins:emulator prior="0-3"/></vmbpins:balancer></metadata>
  <iothreads>2</iothreads><iothreadids><iothread id='1'/><iothread id='3'/></iothreadids>
  <cputune><emulatorpin cpuset='2-3'/><iothreadpin iothread='3' cpuset='1'/></cputune></domain>"#;
        let f = parse_domain_xml(live, None).unwrap();
        let set = |v: &[u32]| Some(CpuSet(v.to_vec()));
        assert_eq!(
            f.threads,
            vec![
                ThreadDesc { thread: QemuThread::Emulator, pinned_to: set(&[2, 3]), recorded: true },
                ThreadDesc { thread: QemuThread::IoThread(1), pinned_to: None, recorded: false },
                ThreadDesc { thread: QemuThread::IoThread(3), pinned_to: set(&[1]), recorded: false },
            ]
        );
        assert_eq!(f.emulator_prior, set(&[0, 1, 2, 3]));
        // No pins, no iothreads: the emulator alone, floating; a count without ids numbers them from 1.
        let f = parse_domain_xml("<domain><vcpu>1</vcpu><memory>1024</memory></domain>", None).unwrap();
        assert_eq!(f.threads, vec![ThreadDesc { thread: QemuThread::Emulator, pinned_to: None, recorded: false }]);
        assert_eq!(f.emulator_prior, None);
        let f = parse_domain_xml("<domain><vcpu>1</vcpu><memory>1</memory><iothreads>2</iothreads></domain>", None)
            .unwrap();
        let ids: Vec<QemuThread> = f.threads.iter().map(|t| t.thread).collect();
        assert_eq!(ids, [QemuThread::Emulator, QemuThread::IoThread(1), QemuThread::IoThread(2)]);
        // A pin that does not parse: that thread is left out, not guessed at.
        let x = "<domain><vcpu>1</vcpu><memory>1</memory><cputune><emulatorpin cpuset='0-3,^2'/></cputune></domain>";
        assert!(parse_domain_xml(x, None).unwrap().threads.is_empty());
    }
    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(parse_domain_xml("<domain>", None).is_err());
        assert!(parse_domain_xml("<domain><vcpu>x</vcpu></domain>", None).is_err());
        assert!(parse_domain_xml("<domain><vcpu>1</vcpu><memory unit='parsec'>1</memory></domain>", None).is_err());
    }
}
