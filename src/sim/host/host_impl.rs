//! The simulated host seen through the `Host` trait: what the agent's sampling and actions do
//! to the model in `super`. Kept apart so the model itself stays readable.

use super::*;

impl Host for SimHost {
    fn now_ns(&self) -> u64 {
        self.t_ns
    }
    fn epoch_s(&self) -> u64 {
        self.cfg.epoch0_s + self.t_ns / 1_000_000_000
    }
    fn ensure_connected(&mut self) -> Result<(), HostError> {
        Ok(())
    }
    fn list_domains(&mut self) -> Result<Vec<DomainRef>, HostError> {
        Ok(self.guests.iter().map(|g| g.dom.clone()).collect())
    }
    fn describe(&mut self, dom: &DomainRef) -> Result<DomainDesc, HostError> {
        let g = &self.guests[self.guest(dom)?];
        Ok(DomainDesc {
            dom: g.dom.clone(),
            vcpu_tids: g.vcpus.iter().map(|v| Some(v.tid)).collect(),
            vcpu_count: u32::try_from(g.vcpus.len()).unwrap_or(u32::MAX),
            pid: Some(g.pid),
            max_kib: g.spec.max_kib,
            has_balloon: true,
            stats_period_s: 5,
            opt_out: OptOut::default(),
            // Every simulated guest runs from virtual time 0.
            started_epoch_s: Some(self.cfg.epoch0_s),
            default_affinity: None,
            threads: vec![ThreadDesc {
                thread: QemuThread::Emulator,
                pinned_to: g.emulator_pin.clone(),
                recorded: g.agent_threads.iter().any(|t| t.thread == QemuThread::Emulator),
            }],
        })
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    fn vcpu_times(&mut self, desc: &DomainDesc) -> Result<Vec<Option<VcpuTimes>>, HostError> {
        let g = &self.guests[self.guest(&desc.dom)?];
        Ok(desc
            .vcpu_tids
            .iter()
            .map(|tid| {
                let v = g.vcpus.iter().find(|v| Some(v.tid) == *tid)?;
                Some(VcpuTimes {
                    run_ns: v.run_ns as u64,
                    wait_ns: v.wait_ns as u64,
                    affinity_mask: v.affinity.clone(),
                    last_cpu: Some(v.last_cpu),
                })
            })
            .collect())
    }
    fn balloon_stats(&mut self) -> Result<Vec<(String, BalloonStats)>, HostError> {
        self.actions.balloon_reads += self.guests.len() as u64;
        Ok(self.guests.iter().map(|g| (g.dom.name.clone(), self.balloon_of(g))).collect())
    }
    fn balloon_stats_of(&mut self, doms: &[DomainRef]) -> Result<Vec<(String, BalloonStats)>, HostError> {
        let out: Vec<(String, BalloonStats)> = self
            .guests
            .iter()
            .filter(|g| doms.iter().any(|d| d.name == g.dom.name && d.id == g.dom.id))
            .map(|g| (g.dom.name.clone(), self.balloon_of(g)))
            .collect();
        self.actions.balloon_reads += out.len() as u64;
        Ok(out)
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    fn host_sample(&mut self) -> Result<HostSample, HostError> {
        let up: Vec<u32> = (0..self.cfg.cpus).filter(|&c| self.is_online(c)).collect();
        Ok(HostSample {
            cpu_busy_ns: up.iter().map(|&c| self.cpu_busy_ns[c as usize] as u64).collect(),
            cpu_ids: up,
            mem_total_kib: self.cfg.mem_total_kib,
            mem_available_kib: self.mem_available_kib(),
            mem_pressure_some_avg10: None,
        })
    }
    fn topology(&mut self) -> Result<Topology, HostError> {
        Ok(self.topo.clone())
    }
    fn present_cpus(&mut self) -> Result<Vec<u32>, HostError> {
        Ok((0..self.cfg.cpus).collect())
    }
    fn pin_vcpu(&mut self, dom: &DomainRef, vcpu: u32, cpu: u32) -> Result<(), HostError> {
        let gi = self.guest(dom)?;
        if !self.is_online(cpu) {
            let detail = format!("no online cpu {cpu}");
            return Err(HostError::Refused {
                op: "pin",
                object: dom.name.clone(),
                class: ErrorClass::Permanent,
                detail,
            });
        }
        let v = self.guests[gi].vcpus.get_mut(vcpu as usize).ok_or_else(|| HostError::Refused {
            op: "pin",
            object: dom.name.clone(),
            class: ErrorClass::Permanent,
            detail: format!("no vCPU {vcpu}"),
        })?;
        match v.affinity.as_single() {
            Some(c) if c == cpu => {}
            Some(_) => self.actions.repins += 1,
            None => self.actions.placements += 1,
        }
        v.affinity = CpuSet::single(cpu);
        Ok(())
    }
    fn set_balloon(&mut self, dom: &DomainRef, target_kib: u64) -> Result<(), HostError> {
        let gi = self.guest(dom)?;
        let min = self.cfg.guest_min_kib;
        let g = &mut self.guests[gi];
        let t = target_kib.clamp(min.min(g.spec.max_kib), g.spec.max_kib);
        if t > g.current_kib.max(g.target_kib) {
            self.actions.grants_kib += t - g.current_kib.max(g.target_kib);
        }
        g.target_kib = t;
        Ok(())
    }
    fn set_stats_period(&mut self, dom: &DomainRef, _period_s: u32) -> Result<(), HostError> {
        self.guest(dom).map(|_| ())
    }
    fn pin_vcpu_set(&mut self, dom: &DomainRef, vcpu: u32, cpus: &CpuSet) -> Result<(), HostError> {
        let gi = self.guest(dom)?;
        let n = self.cfg.cpus;
        let bad = |detail: String| HostError::Refused {
            op: "pin",
            object: dom.name.clone(),
            class: ErrorClass::Permanent,
            detail,
        };
        if cpus.0.is_empty() || cpus.0.iter().any(|&c| c >= n) || !cpus.0.iter().any(|&c| self.is_online(c)) {
            return Err(bad(format!("cannot pin to {cpus}")));
        }
        let v = self.guests[gi].vcpus.get_mut(vcpu as usize).ok_or_else(|| bad(format!("no vCPU {vcpu}")))?;
        // A group pin (`--pin-granularity core|llc`) counts like a single-cpu one: a placement
        // when the vCPU floated over every cpu, else a repin. Giving back the floating affinity
        // is neither.
        let all = |s: &CpuSet| s.0.len() >= n as usize;
        if v.affinity != *cpus && !all(cpus) {
            if all(&v.affinity) {
                self.actions.placements += 1;
            } else {
                self.actions.repins += 1;
            }
        }
        v.affinity = cpus.clone();
        Ok(())
    }
    fn agent_pins(&mut self, dom: &DomainRef) -> Result<Vec<AgentPin>, HostError> {
        let gi = self.guest(dom)?;
        Ok(self.guests[gi].agent_pins.clone())
    }
    fn set_agent_pins(&mut self, dom: &DomainRef, pins: &[AgentPin]) -> Result<(), HostError> {
        let gi = self.guest(dom)?;
        let mut pins = pins.to_vec();
        pins.sort_by_key(|p| p.vcpu);
        self.guests[gi].agent_pins = pins;
        Ok(())
    }
    fn pin_thread(&mut self, dom: &DomainRef, thread: QemuThread, cpus: &CpuSet) -> Result<(), HostError> {
        let gi = self.guest(dom)?;
        let bad = |detail: String| HostError::Refused {
            op: "pin thread",
            object: dom.name.clone(),
            class: ErrorClass::Permanent,
            detail,
        };
        if cpus.0.is_empty() || cpus.0.iter().any(|&c| c >= self.cfg.cpus) {
            return Err(bad(format!("cannot pin to {cpus}")));
        }
        match thread {
            QemuThread::Emulator => self.guests[gi].emulator_pin = Some(cpus.clone()),
            QemuThread::IoThread(id) => return Err(bad(format!("no I/O thread {id}"))),
        }
        Ok(())
    }
    fn agent_threads(&mut self, dom: &DomainRef) -> Result<Vec<ThreadPin>, HostError> {
        let gi = self.guest(dom)?;
        Ok(self.guests[gi].agent_threads.clone())
    }
    fn set_agent_threads(&mut self, dom: &DomainRef, threads: &[ThreadPin]) -> Result<(), HostError> {
        let gi = self.guest(dom)?;
        let mut threads = threads.to_vec();
        threads.sort_by_key(|t| t.thread);
        self.guests[gi].agent_threads = threads;
        Ok(())
    }
}
