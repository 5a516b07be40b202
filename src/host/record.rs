//! The agent's record of its own pins, kept in each running guest's live `<metadata>`.
//!
//! Pins outlive the process that set them. So that a stopped, crashed or restarted agent can
//! give back what it took, every vCPU (and every QEMU emulator or I/O thread) the agent pins is
//! written down, with the affinity it had before the agent's first pin, in an element of its
//! own namespace beside the opt-out's (libvirt keeps one element per namespace in `<metadata>`,
//! and `virsh metadata --set` of the opt-out replaces that whole element: the record must not
//! live in it):
//!
//! ```xml
//! <vmbpins:balancer xmlns:vmbpins="https://vm-balancer.org/xmlns/1/pins">
//!   <vmbpins:pin vcpu="0" prior="0-1"/>
//!   <vmbpins:pin vcpu="1" prior="0-1" granularity="llc"/>
//!   <vmbpins:emulator prior="0-1"/>
//!   <vmbpins:iothread id="1" prior="0-1"/>
//! </vmbpins:balancer>
//! ```
//!
//! libvirt hands the element back without its prefix (`<balancer memory="no"><pin .../>`) and
//! puts the namespace on when it is set, so the functions here read and write un-prefixed XML.
//! `granularity` (absent: `cpu`) is the `--pin-granularity` the vCPU was pinned at, so that a
//! release after a crash knows a group pin for the agent's whatever the settings say by then.
//! They are pure; [`crate::host::Host::agent_pins`] and `set_agent_pins` do the I/O.

use super::{CpuSet, QemuThread};

/// One vCPU the agent pinned, and the affinity it had before the agent's first pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPin {
    pub vcpu: u32,
    pub prior: CpuSet,
    /// The `--pin-granularity` of the agent's pins (`core`, `llc`); `None` for `cpu`.
    pub granularity: Option<String>,
}

/// The `<pin>` entries of the element, sorted by vCPU. An entry that does not parse (no
/// `vcpu`, an empty or malformed `prior`) is skipped: a broken entry must not stop the others
/// from being given back. For a vCPU listed twice the first entry counts.
pub fn parse_pins(element: &str) -> Result<Vec<AgentPin>, String> {
    let doc = roxmltree::Document::parse(element).map_err(|e| e.to_string())?;
    let mut out: Vec<AgentPin> = Vec::new();
    for c in doc.root_element().children().filter(|c| c.is_element() && c.tag_name().name() == "pin") {
        let Some(vcpu) = c.attribute("vcpu").and_then(|v| v.trim().parse::<u32>().ok()) else { continue };
        let Some(prior) = c.attribute("prior").and_then(|p| crate::cpulist::parse(p).ok()) else { continue };
        if prior.is_empty() || out.iter().any(|p| p.vcpu == vcpu) {
            continue;
        }
        let granularity = c.attribute("granularity").map(|g| g.trim().to_string()).filter(|g| g != "cpu");
        out.push(AgentPin { vcpu, prior: CpuSet(prior), granularity });
    }
    out.sort_by_key(|p| p.vcpu);
    Ok(out)
}

/// One QEMU thread (emulator or I/O thread) the agent pinned, and the affinity it had before
/// the agent's first pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadPin {
    pub thread: QemuThread,
    pub prior: CpuSet,
}

/// The `<emulator>` and `<iothread>` entries of the element, emulator first, then by id. Broken
/// entries are skipped as in [`parse_pins`]; for a thread listed twice the first entry counts.
pub fn parse_threads(element: &str) -> Result<Vec<ThreadPin>, String> {
    let doc = roxmltree::Document::parse(element).map_err(|e| e.to_string())?;
    let mut out: Vec<ThreadPin> = Vec::new();
    for c in doc.root_element().children().filter(|c| c.is_element()) {
        let thread = match c.tag_name().name() {
            "emulator" => QemuThread::Emulator,
            "iothread" => match c.attribute("id").and_then(|v| v.trim().parse::<u32>().ok()) {
                Some(id) => QemuThread::IoThread(id),
                None => continue,
            },
            _ => continue,
        };
        let Some(prior) = c.attribute("prior").and_then(|p| crate::cpulist::parse(p).ok()) else { continue };
        if prior.is_empty() || out.iter().any(|p| p.thread == thread) {
            continue;
        }
        out.push(ThreadPin { thread, prior: CpuSet(prior) });
    }
    out.sort_by_key(|p| p.thread);
    Ok(out)
}

/// The element with its `<pin>` entries replaced by `pins`, keeping its attributes (the
/// opt-outs) and any other children (the thread entries) as they are. `None` when nothing
/// would be left: the element is then removed rather than left empty.
pub fn with_pins(element: Option<&str>, pins: &[AgentPin]) -> Result<Option<String>, String> {
    let mut sorted: Vec<&AgentPin> = pins.iter().collect();
    sorted.sort_by_key(|p| p.vcpu);
    let body: String = sorted
        .iter()
        .map(|p| match &p.granularity {
            Some(g) => format!("<pin vcpu=\"{}\" prior=\"{}\" granularity=\"{}\"/>", p.vcpu, p.prior, escape(g)),
            None => format!("<pin vcpu=\"{}\" prior=\"{}\"/>", p.vcpu, p.prior),
        })
        .collect();
    replace_children(element, |tag| tag == "pin", &body)
}

/// The element with its `<emulator>` and `<iothread>` entries replaced by `threads`, keeping
/// its attributes and its other children (the vCPU entries). `None` when nothing would be left.
pub fn with_threads(element: Option<&str>, threads: &[ThreadPin]) -> Result<Option<String>, String> {
    let mut sorted: Vec<&ThreadPin> = threads.iter().collect();
    sorted.sort_by_key(|p| p.thread);
    let body: String = sorted
        .iter()
        .map(|p| match p.thread {
            QemuThread::Emulator => format!("<emulator prior=\"{}\"/>", p.prior),
            QemuThread::IoThread(id) => format!("<iothread id=\"{id}\" prior=\"{}\"/>", p.prior),
        })
        .collect();
    replace_children(element, |tag| matches!(tag, "emulator" | "iothread"), &body)
}

/// The element with the children `replaced` selects swapped for `body` (appended after the
/// others), attributes kept; `None` when nothing would be left.
fn replace_children(element: Option<&str>, replaced: fn(&str) -> bool, body: &str) -> Result<Option<String>, String> {
    let mut attrs = String::new();
    let mut others = String::new();
    if let Some(src) = element {
        let doc = roxmltree::Document::parse(src).map_err(|e| e.to_string())?;
        let root = doc.root_element();
        for a in root.attributes().filter(|a| a.namespace().is_none()) {
            attrs.push_str(&format!(" {}=\"{}\"", a.name(), escape(a.value())));
        }
        for c in root.children().filter(|c| c.is_element() && !replaced(c.tag_name().name())) {
            others.push_str(&src[c.range()]);
        }
    }
    if attrs.is_empty() && others.is_empty() && body.is_empty() {
        return Ok(None);
    }
    let body = others + body;
    Ok(Some(if body.is_empty() {
        format!("<balancer{attrs}/>")
    } else {
        format!("<balancer{attrs}>{body}</balancer>")
    }))
}

fn escape(v: &str) -> String {
    v.replace('&', "&amp;").replace('<', "&lt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin(vcpu: u32, prior: &[u32]) -> AgentPin {
        AgentPin { vcpu, prior: CpuSet(prior.to_vec()), granularity: None }
    }

    #[test]
    fn reads_what_libvirt_hands_back() {
        // As `virsh metadata --live` prints it: no prefix, sometimes a stray declaration.
        let x = "<balancer xmlns:vmb=\"https://vm-balancer.org/xmlns/1\" memory=\"no\">\n  \
                 <pin vcpu=\"1\" prior=\"0-3\"/>\n  <pin vcpu=\"0\" prior=\"0,2\"/>\n</balancer>";
        assert_eq!(parse_pins(x).unwrap(), vec![pin(0, &[0, 2]), pin(1, &[0, 1, 2, 3])]);
        assert_eq!(parse_pins("<balancer manage=\"no\"/>").unwrap(), vec![]);
    }

    #[test]
    fn broken_entries_are_skipped_not_fatal() {
        let x = "<balancer><pin vcpu=\"x\" prior=\"0\"/><pin vcpu=\"1\"/><pin vcpu=\"2\" prior=\"\"/>\
                 <pin vcpu=\"3\" prior=\"5-1\"/><pin vcpu=\"4\" prior=\"1\"/><pin vcpu=\"4\" prior=\"2\"/></balancer>";
        assert_eq!(parse_pins(x).unwrap(), vec![pin(4, &[1])]);
        assert!(parse_pins("<balancer>").is_err());
    }

    #[test]
    fn writing_keeps_the_opt_outs_and_other_children() {
        let x = "<balancer memory=\"no\" note=\"a&amp;b\"><pin vcpu=\"0\" prior=\"0-1\"/><other k=\"v\"/></balancer>";
        let out = with_pins(Some(x), &[pin(3, &[0, 1, 2, 3]), pin(1, &[4])]).unwrap().unwrap();
        assert_eq!(
            out,
            "<balancer memory=\"no\" note=\"a&amp;b\"><other k=\"v\"/><pin vcpu=\"1\" prior=\"4\"/>\
             <pin vcpu=\"3\" prior=\"0-3\"/></balancer>"
        );
        assert_eq!(parse_pins(&out).unwrap(), vec![pin(1, &[4]), pin(3, &[0, 1, 2, 3])]);
    }

    #[test]
    fn the_granularity_of_a_group_pin_is_written_and_read_back() {
        let llc = AgentPin { granularity: Some("llc".into()), ..pin(1, &[0, 1]) };
        let x = with_pins(None, &[pin(0, &[0, 1]), llc.clone()]).unwrap().unwrap();
        assert_eq!(
            x,
            "<balancer><pin vcpu=\"0\" prior=\"0-1\"/><pin vcpu=\"1\" prior=\"0-1\" granularity=\"llc\"/></balancer>"
        );
        assert_eq!(parse_pins(&x).unwrap(), vec![pin(0, &[0, 1]), llc]);
        // `cpu` written by hand reads as no granularity.
        let y = "<balancer><pin vcpu=\"0\" prior=\"0-1\" granularity=\"cpu\"/></balancer>";
        assert_eq!(parse_pins(y).unwrap(), vec![pin(0, &[0, 1])]);
    }

    #[test]
    fn thread_entries_live_beside_the_vcpu_entries() {
        let t = |thread, prior: &[u32]| ThreadPin { thread, prior: CpuSet(prior.to_vec()) };
        let x = with_pins(None, &[pin(0, &[0, 1])]).unwrap();
        let x = with_threads(x.as_deref(), &[t(QemuThread::IoThread(2), &[0, 1]), t(QemuThread::Emulator, &[0, 1])])
            .unwrap()
            .unwrap();
        assert_eq!(
            x,
            "<balancer><pin vcpu=\"0\" prior=\"0-1\"/><emulator prior=\"0-1\"/><iothread id=\"2\" prior=\"0-1\"/></balancer>"
        );
        assert_eq!(
            parse_threads(&x).unwrap(),
            vec![t(QemuThread::Emulator, &[0, 1]), t(QemuThread::IoThread(2), &[0, 1])]
        );
        assert_eq!(parse_pins(&x).unwrap(), vec![pin(0, &[0, 1])], "the vCPU entries read as before");
        // Writing one kind keeps the other.
        let y = with_pins(Some(&x), &[]).unwrap().unwrap();
        assert_eq!(parse_threads(&y).unwrap().len(), 2);
        assert_eq!(with_threads(Some(&y), &[]).unwrap(), None, "nothing left: the element goes");
        // Broken thread entries are skipped.
        let z = "<balancer><emulator/><iothread prior=\"0\"/><iothread id=\"1\" prior=\"x\"/><emulator prior=\"1\"/></balancer>";
        assert_eq!(parse_threads(z).unwrap(), vec![t(QemuThread::Emulator, &[1])]);
    }

    #[test]
    fn clearing_removes_the_element_only_when_nothing_else_is_in_it() {
        assert_eq!(with_pins(Some("<balancer><pin vcpu=\"0\" prior=\"0-1\"/></balancer>"), &[]).unwrap(), None);
        assert_eq!(with_pins(None, &[]).unwrap(), None);
        assert_eq!(
            with_pins(Some("<balancer cpu=\"no\"><pin vcpu=\"0\" prior=\"0-1\"/></balancer>"), &[]).unwrap(),
            Some("<balancer cpu=\"no\"/>".to_string())
        );
        assert_eq!(
            with_pins(None, &[pin(0, &[0, 1])]).unwrap(),
            Some("<balancer><pin vcpu=\"0\" prior=\"0-1\"/></balancer>".to_string())
        );
    }
}
