//! vm-balancer: a per-host agent that balances vCPU pins and guest balloons on a libvirt/KVM
//! host. The loop is sample ([`collect`]) → model ([`model`]) → decide ([`policy`]) → act
//! ([`actuate`]), driven by [`daemon`]; all host access goes through [`host::Host`].

pub mod actuate;
pub mod assets;
pub mod capacity;
pub mod cli;
pub mod collect;
pub mod cpulist;
pub mod daemon;
pub mod diagnose;
pub mod failures;
pub mod host;
pub mod memctl;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod release;
pub mod repacker;
pub mod safeguard;
pub mod schedule;
pub mod settings;
pub mod sim;
pub mod units;
pub mod window;
