//! The agent's record of its own vCPU pins, kept in each running guest's live `<metadata>`.
//!
//! Pins outlive the process that set them. So that a stopped, crashed or restarted agent can
//! give back what it took, every vCPU the agent pins is written down, with the affinity it had
//! before the agent's first pin, in an element of its own namespace beside the opt-out's
//! (libvirt keeps one element per namespace in `<metadata>`, and `virsh metadata --set` of the
//! opt-out replaces that whole element: the record must not live in it):
//!
//! ```xml
//! <vmbpins:balancer xmlns:vmbpins="https://vm-balancer.org/xmlns/1/pins">
//!   <vmbpins:pin vcpu="0" prior="0-1"/>
//! </vmbpins:balancer>
//! ```
//!
//! libvirt hands the element back without its prefix (`<balancer memory="no"><pin .../>`) and
//! puts the namespace on when it is set, so the functions here read and write un-prefixed XML.
//! They are pure; [`crate::host::Host::agent_pins`] and `set_agent_pins` do the I/O.

use super::CpuSet;

/// One vCPU the agent pinned, and the affinity it had before the agent's first pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPin {
    pub vcpu: u32,
    pub prior: CpuSet,
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
        out.push(AgentPin { vcpu, prior: CpuSet(prior) });
    }
    out.sort_by_key(|p| p.vcpu);
    Ok(out)
}

/// The element with its `<pin>` entries replaced by `pins`, keeping its attributes (the
/// opt-outs) and any other children as they are. `None` when nothing would be left: the
/// element is then removed rather than left empty.
pub fn with_pins(element: Option<&str>, pins: &[AgentPin]) -> Result<Option<String>, String> {
    let mut attrs = String::new();
    let mut others = String::new();
    if let Some(src) = element {
        let doc = roxmltree::Document::parse(src).map_err(|e| e.to_string())?;
        let root = doc.root_element();
        for a in root.attributes().filter(|a| a.namespace().is_none()) {
            attrs.push_str(&format!(" {}=\"{}\"", a.name(), escape(a.value())));
        }
        for c in root.children().filter(|c| c.is_element() && c.tag_name().name() != "pin") {
            others.push_str(&src[c.range()]);
        }
    }
    if attrs.is_empty() && others.is_empty() && pins.is_empty() {
        return Ok(None);
    }
    let mut sorted: Vec<&AgentPin> = pins.iter().collect();
    sorted.sort_by_key(|p| p.vcpu);
    let mut body = others;
    for p in sorted {
        body.push_str(&format!("<pin vcpu=\"{}\" prior=\"{}\"/>", p.vcpu, p.prior));
    }
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
        AgentPin { vcpu, prior: CpuSet(prior.to_vec()) }
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
