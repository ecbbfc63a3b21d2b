//! VM-wide KVM state: the in-kernel irqchip (both PICs and the IOAPIC), the PIT
//! where one was created, and kvmclock.
//!
//! Restore into a VM built the same way (in-kernel irqchip created, PIT created iff
//! the state has one) before its vCPUs are restored and run. Order, as in
//! Firecracker: PIT, clock, then the irqchip.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::{kvm_err, StateError};

/// VM-wide KVM state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// PIC master (KVM_GET_IRQCHIP, chip 0).
    pub pic_master: kvm_irqchip,
    /// PIC slave (chip 1).
    pub pic_slave: kvm_irqchip,
    /// IOAPIC (chip 2).
    pub ioapic: kvm_irqchip,
    /// The in-kernel PIT (KVM_GET_PIT2), if the VM has one.
    pub pit: Option<kvm_pit_state2>,
    /// kvmclock (KVM_GET_CLOCK). Its flags are kept: with KVM_CLOCK_REALTIME set,
    /// KVM_SET_CLOCK advances the clock by the wall time that passed since capture.
    pub clock: kvm_clock_data,
}

fn get_chip(vm: &VmFd, chip_id: u32, what: &'static str) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip { chip_id, ..Default::default() };
    vm.get_irqchip(&mut chip).map_err(kvm_err(what))?;
    Ok(chip)
}

/// Reads the PIT, or `None` where the VM has none (KVM_GET_PIT2 fails with ENXIO).
fn get_pit(vm: &VmFd) -> Result<Option<kvm_pit_state2>, StateError> {
    match vm.get_pit2() {
        Ok(p) => Ok(Some(p)),
        Err(e) if e.errno() == libc::ENXIO => Ok(None),
        Err(e) => Err(StateError::Kvm { what: "KVM_GET_PIT2", source: e }),
    }
}

/// Captures the VM-wide state of `vm` (which has an in-kernel irqchip); its vCPUs
/// must be paused.
pub fn capture(vm: &VmFd) -> Result<VmState, StateError> {
    Ok(VmState {
        pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP (PIC master)")?,
        pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP (PIC slave)")?,
        ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP (IOAPIC)")?,
        pit: get_pit(vm)?,
        clock: vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
    })
}

/// Restores `s` into `vm`, which was built like the captured one: in-kernel irqchip
/// created, and a PIT created exactly when `s.pit` is `Some`.
pub fn restore(vm: &VmFd, s: &VmState) -> Result<(), StateError> {
    match (&s.pit, get_pit(vm)?) {
        (Some(pit), Some(_)) => vm.set_pit2(pit).map_err(kvm_err("KVM_SET_PIT2"))?,
        (Some(_), None) => return Err(StateError::PitMissing),
        (None, Some(_)) => return Err(StateError::PitUnexpected),
        (None, None) => {}
    }
    vm.set_clock(&s.clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
    // The chip ids travel inside the structs; force them so a damaged state cannot
    // write one chip's bytes into another.
    for (chip, id, what) in [
        (&s.pic_master, KVM_IRQCHIP_PIC_MASTER, "KVM_SET_IRQCHIP (PIC master)"),
        (&s.pic_slave, KVM_IRQCHIP_PIC_SLAVE, "KVM_SET_IRQCHIP (PIC slave)"),
        (&s.ioapic, KVM_IRQCHIP_IOAPIC, "KVM_SET_IRQCHIP (IOAPIC)"),
    ] {
        let mut c = *chip;
        c.chip_id = id;
        vm.set_irqchip(&c).map_err(kvm_err(what))?;
    }
    Ok(())
}
