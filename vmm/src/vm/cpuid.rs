//! Per-vCPU CPUID: what KVM supports, with this vCPU's APIC ID and the VM's
//! vCPU count filled in.

use kvm_bindings::CpuId;

/// CPUID for vCPU `index` of `count`.
pub fn for_vcpu(supported: &CpuId, index: u32, count: u32) -> CpuId {
    let mut c = supported.clone();
    for e in c.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (index << 24) | ((count.min(255)) << 16);
                e.ecx |= 1 << 31; // running under a hypervisor
            }
            0xb | 0x1f => e.edx = index,
            _ => {}
        }
    }
    c
}
