//! A readable account of a snapshot: what each vCPU was doing and waiting
//! for (registers, halt state, LAPIC timer, pending and in-service
//! interrupts), the IOAPIC pins of the devices, and each virtio queue's
//! positions as the device and the driver saw them. `vmc system
//! inspect-snapshot` prints it; a snapshot that restores into a silent guest
//! is diagnosed from it.

use std::fmt::Write as _;
use std::path::Path;

use vm_memory::{Bytes, GuestAddress};

use super::{map_memory, VcpuState, VmState};
use crate::devices::virtio::{INT_CONFIG, INT_VRING};
use crate::memory::{ram_regions, VIRTIO_IRQ_BASE};

const MSR_TSC: u32 = 0x10;
const MSR_TSC_DEADLINE: u32 = 0x6e0;
const LAPIC_ISR: usize = 0x100;
const LAPIC_TMR: usize = 0x180;
const LAPIC_IRR: usize = 0x200;
const LAPIC_LVTT: usize = 0x320;
const LAPIC_TMICT: usize = 0x380;
const LAPIC_TMCCT: usize = 0x390;
const LAPIC_TPR: usize = 0x80;

fn lapic_u32(v: &VcpuState, off: usize) -> u32 {
    let r = &v.lapic.regs;
    u32::from_le_bytes([
        r[off] as u8,
        r[off + 1] as u8,
        r[off + 2] as u8,
        r[off + 3] as u8,
    ])
}

/// The vectors set in a 256-bit LAPIC register (IRR, ISR, TMR).
fn vectors(v: &VcpuState, base: usize) -> Vec<u8> {
    (0..8usize)
        .flat_map(|i| {
            let word = lapic_u32(v, base + i * 0x10);
            (0..32u32)
                .filter(move |b| word & (1 << b) != 0)
                .map(move |b| (i as u32 * 32 + b) as u8)
        })
        .collect()
}

fn msr(v: &VcpuState, index: u32) -> Option<u64> {
    v.msrs.iter().find(|m| m.index == index).map(|m| m.data)
}

/// The IOAPIC redirection entry of `pin` (vector, masked, level, remote IRR).
fn ioapic_pin(state: &VmState, pin: u32) -> Option<(u8, bool, bool, bool)> {
    let chip = state.irqchips.iter().find(|c| c.chip_id == 2)?;
    // SAFETY: chip 2 is the IOAPIC (KVM_IRQCHIP_IOAPIC), so the union holds
    // a kvm_ioapic_state; redirtbl entries are plain u64 bit fields.
    let bits = unsafe { chip.chip.ioapic.redirtbl.get(pin as usize)?.bits };
    Some((
        bits as u8,
        bits & (1 << 16) != 0,
        bits & (1 << 15) != 0,
        bits & (1 << 14) != 0,
    ))
}

/// What the report concludes: interrupts a device raised that no vCPU has
/// pending or in service (the guest will not look at those queues again).
pub fn owed_interrupts(state: &VmState) -> Vec<String> {
    let mut out = Vec::new();
    for (i, d) in state.devices.iter().enumerate() {
        if !d.active || d.interrupt_status & (INT_VRING | INT_CONFIG) == 0 {
            continue;
        }
        let pin = VIRTIO_IRQ_BASE + i as u32;
        let Some((vector, masked, _, _)) = ioapic_pin(state, pin) else {
            continue;
        };
        let seen = state.vcpus.iter().any(|v| {
            vectors(v, LAPIC_IRR).contains(&vector) || vectors(v, LAPIC_ISR).contains(&vector)
        });
        if !seen && !masked {
            out.push(format!(
                "device {i} (type {}): interrupt status {:#x} but vector {vector:#x} (pin {pin}) is neither pending nor in service",
                d.device_type, d.interrupt_status
            ));
        }
    }
    out
}

/// The whole report for the snapshot in `dir`.
pub fn report(dir: &Path) -> Result<String, super::SnapshotError> {
    let state = VmState::read(dir)?;
    let mem = map_memory(&dir.join("memory.img"), &ram_regions(state.mem_size), None).ok();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "snapshot {} ({} MiB, {} vCPUs)",
        state.key,
        state.mem_size >> 20,
        state.vcpus.len()
    );
    let _ = writeln!(
        s,
        "kvm clock {} ns, flags {:#x}",
        state.clock.clock, state.clock.flags
    );
    let seal = std::fs::File::open(dir.join("memory.img"))
        .map_err(super::SnapshotError::from)
        .and_then(|f| state.memory.check(&f));
    let _ = match seal {
        Ok(()) => writeln!(s, "memory.img: matches its seal"),
        Err(e) => writeln!(s, "memory.img: BAD: {e}"),
    };
    for (i, v) in state.vcpus.iter().enumerate() {
        let lvtt = lapic_u32(v, LAPIC_LVTT);
        let mode = match (lvtt >> 17) & 3 {
            0 => "one-shot",
            1 => "periodic",
            2 => "tsc-deadline",
            _ => "reserved",
        };
        let _ = writeln!(
            s,
            "vcpu{i}: rip {:#x} rflags {:#x} (IF {}) mp_state {} (0 runnable, 3 halted)",
            v.regs.rip,
            v.regs.rflags,
            (v.regs.rflags >> 9) & 1,
            v.mp_state.mp_state
        );
        let _ = writeln!(
            s,
            "  events: interrupt injected {} nr {:#x} shadow {}; nmi injected {} pending {}; exception injected {} pending {} nr {}",
            v.events.interrupt.injected,
            v.events.interrupt.nr,
            v.events.interrupt.shadow,
            v.events.nmi.injected,
            v.events.nmi.pending,
            v.events.exception.injected,
            v.events.exception.pending,
            v.events.exception.nr
        );
        let _ = writeln!(
            s,
            "  lapic timer: {mode}{} vector {:#x}, tmict {} tmcct {}; tsc {:?} deadline {:?}",
            if lvtt & (1 << 16) != 0 {
                " (masked)"
            } else {
                ""
            },
            lvtt & 0xff,
            lapic_u32(v, LAPIC_TMICT),
            lapic_u32(v, LAPIC_TMCCT),
            msr(v, MSR_TSC),
            msr(v, MSR_TSC_DEADLINE),
        );
        let _ = writeln!(
            s,
            "  lapic: tpr {:#x} irr {:x?} isr {:x?} tmr {:x?}",
            lapic_u32(v, LAPIC_TPR),
            vectors(v, LAPIC_IRR),
            vectors(v, LAPIC_ISR),
            vectors(v, LAPIC_TMR)
        );
    }
    if let Some(chip) = state.irqchips.iter().find(|c| c.chip_id == 2) {
        // SAFETY: chip 2 is the IOAPIC; irr is a plain u32.
        let irr = unsafe { chip.chip.ioapic.irr };
        let _ = writeln!(s, "ioapic irr {irr:#x}");
    }
    for (i, d) in state.devices.iter().enumerate() {
        let pin = VIRTIO_IRQ_BASE + i as u32;
        let p = ioapic_pin(&state, pin)
            .map(|(v, m, l, r)| {
                format!(
                    "vector {v:#x}{}{}{}",
                    if m { " masked" } else { "" },
                    if l { " level" } else { " edge" },
                    if r { " remote-irr" } else { "" }
                )
            })
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "device {i}: type {} status {:#x} active {} interrupt status {:#x}; pin {pin} {p}",
            d.device_type, d.status, d.active, d.interrupt_status
        );
        for (n, q) in d.queues.iter().enumerate().filter(|(_, q)| q.ready) {
            let read16 = |a: u64| {
                mem.as_ref()
                    .and_then(|m| m.read_obj::<u16>(GuestAddress(a)).ok())
                    .map_or("?".to_string(), |v| v.to_string())
            };
            let size = q.size as u64;
            let _ = writeln!(
                s,
                "  queue {n}: size {} next_avail {} next_used {} event_idx {}; driver: avail.idx {} used_event {}; used.idx {} avail_event {}",
                q.size,
                q.next_avail,
                q.next_used,
                q.event_idx,
                read16(q.avail_ring + 2),
                read16(q.avail_ring + 4 + 2 * size),
                read16(q.used_ring + 2),
                read16(q.used_ring + 4 + 8 * size),
            );
        }
    }
    for o in owed_interrupts(&state) {
        let _ = writeln!(s, "LOST: {o}");
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use kvm_bindings::{kvm_clock_data, kvm_irqchip};

    use super::super::{MemorySeal, TransportSnap};
    use super::*;

    const VECTOR: u8 = 0x25;

    /// A one-device machine whose device raised `status` on an IOAPIC pin
    /// routed to [`VECTOR`] (`masked` or not), with one halted vCPU that has
    /// `pending` in its LAPIC's IRR.
    fn machine(status: u32, masked: bool, pending: Option<u8>) -> VmState {
        let mut ioapic = kvm_irqchip {
            chip_id: 2,
            ..Default::default()
        };
        let pin = VIRTIO_IRQ_BASE as usize;
        // SAFETY: chip 2 is the IOAPIC; redirtbl entries are u64 bit fields.
        unsafe {
            ioapic.chip.ioapic.redirtbl[pin].bits =
                VECTOR as u64 | if masked { 1 << 16 } else { 0 };
        }
        let mut vcpu = VcpuState {
            cpuid: Vec::new(),
            mp_state: Default::default(),
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            debug_regs: Default::default(),
            lapic: Default::default(),
            msrs: Vec::new(),
            events: Default::default(),
        };
        vcpu.mp_state.mp_state = 3;
        if let Some(v) = pending {
            let at = LAPIC_IRR + (v as usize / 32) * 0x10 + (v as usize % 32) / 8;
            vcpu.lapic.regs[at] |= (1u8 << (v % 8)) as std::ffi::c_char;
        }
        VmState {
            key: "k".into(),
            mem_size: 64 << 20,
            memory: MemorySeal {
                digest: [0; 32],
                ino: 0,
                size: 0,
                ctime: (0, 0),
            },
            vcpus: vec![vcpu],
            irqchips: vec![ioapic],
            clock: kvm_clock_data::default(),
            devices: vec![TransportSnap {
                device_type: 19,
                status: 0xf,
                driver_features: 0,
                device_features_sel: 0,
                driver_features_sel: 0,
                queue_sel: 0,
                interrupt_status: status,
                config_generation: 0,
                active: true,
                queues: Vec::new(),
                device: Vec::new(),
            }],
        }
    }

    fn report_of(state: &VmState) -> String {
        let dir = tempfile::tempdir().unwrap();
        state.write(dir.path()).unwrap();
        report(dir.path()).unwrap()
    }

    /// What `vmc system inspect-snapshot` prints for a snapshot taken while
    /// an interrupt was in flight (raised, not pending in any LAPIC): a
    /// `LOST:` line naming the device and vector; none once the vector is
    /// pending, the pin masked or nothing raised.
    #[test]
    fn an_interrupt_raised_but_not_pending_is_reported_lost() {
        let lost = report_of(&machine(INT_VRING, false, None));
        let line = lost
            .lines()
            .find(|l| l.starts_with("LOST: "))
            .unwrap_or_else(|| panic!("no LOST: line in\n{lost}"));
        assert_eq!(
            line,
            "LOST: device 0 (type 19): interrupt status 0x1 but vector 0x25 (pin 5) is neither pending nor in service"
        );
        assert!(lost.contains("vcpu0: "), "{lost}");
        assert!(lost.contains("memory.img: BAD"), "{lost}");
        assert!(report_of(&machine(INT_CONFIG, false, None)).contains("LOST: device 0"));
        for fine in [
            machine(INT_VRING, false, Some(VECTOR)),
            machine(INT_VRING, true, None),
            machine(0, false, None),
        ] {
            let r = report_of(&fine);
            assert!(!r.contains("LOST:"), "{r}");
            assert!(owed_interrupts(&fine).is_empty());
        }
        // Another vector pending does not account for this one.
        assert_eq!(
            owed_interrupts(&machine(INT_VRING, false, Some(0x30))).len(),
            1
        );
    }
}
