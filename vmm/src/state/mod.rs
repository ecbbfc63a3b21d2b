//! Guest state that crosses a process boundary: what KVM holds per vCPU and per VM,
//! captured into serde types, and the checked, versioned frame it travels in.
//!
//! This is the groundwork of live update (a running guest handed to a new Mosaic
//! process): the old process pauses the vCPUs, captures [`StateV1`], encodes it with
//! [`format::encode`]; the new process decodes it with [`format::decode`] (which
//! refuses anything truncated, corrupted, or of a version it does not know), builds
//! an empty VM of the same shape and restores into it.
//!
//! - [`vcpu`]: [`vcpu::VcpuState`], everything KVM exposes per x86 vCPU.
//! - [`vm`]: [`vm::VmState`], the in-kernel irqchip, PIT and kvmclock.
//! - [`format`](mod@format): the wire frame (magic, version, length, payload, CRC-32) and
//!   [`format::StateV1`], the top-level state of format version 1.
//!
//! `docs/STATE-FORMAT.md` describes the frame and the version policy.

pub mod format;
pub mod vcpu;
pub mod vm;

pub use format::{decode, encode, FormatError, StateV1, FORMAT_VERSION, MAGIC};
pub use vcpu::VcpuState;
pub use vm::VmState;

use thiserror::Error;

/// Errors from capturing or restoring vCPU or VM state.
#[derive(Debug, Error)]
pub enum StateError {
    /// A KVM ioctl failed.
    #[error("{what} failed")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_SET_MSRS stopped before the end of the list: KVM refused this MSR.
    #[error("KVM_SET_MSRS refused MSR {index:#x} (value {data:#x}), {written} of {total} written")]
    MsrRefused {
        /// The MSR KVM refused.
        index: u32,
        /// The value that was being written.
        data: u64,
        /// MSRs written before it (in this batch).
        written: usize,
        /// MSRs in the batch.
        total: usize,
    },
    /// A CPUID or MSR list does not fit KVM's FAM structures.
    #[error("{what} has {len} entries, more than KVM takes")]
    TooManyEntries {
        /// Which list.
        what: &'static str,
        /// Its length.
        len: usize,
    },
    /// This process's guest XSAVE area is larger than the 4 KiB `kvm_xsave` that
    /// KVM_SET_XSAVE is given here (dynamically enabled XSTATE features such as AMX).
    #[error("guest XSAVE area is {size} bytes, larger than the 4096-byte kvm_xsave this VMM saves")]
    XsaveTooLarge {
        /// KVM_CAP_XSAVE2: the size KVM would read.
        size: usize,
    },
    /// The state holds a different number of vCPUs than the target VM has.
    #[error("state holds {state} vCPUs, the target VM has {target}")]
    VcpuCount {
        /// vCPUs in the state.
        state: usize,
        /// vCPUs in the target.
        target: usize,
    },
    /// The state holds PIT state and the target VM has no PIT (create it first).
    #[error("the state holds PIT state but the target VM has no PIT")]
    PitMissing,
    /// The target VM has a PIT and the state holds none.
    #[error("the target VM has a PIT but the state holds no PIT state")]
    PitUnexpected,
}

/// Maps a kvm-ioctls error to [`StateError::Kvm`] naming the ioctl.
pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_mem::attrs::{Attributes, PageState};
    use guest_mem::backend::{BackendKind, BackendSpec};
    use guest_mem::{MemoryLayout, ZoneSpec};
    use kvm_bindings::{kvm_msr_entry, kvm_pit_config, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_HALTED};
    use kvm_ioctls::{Kvm, VcpuFd, VmFd};

    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC_AUX: u32 = 0xc000_0103;
    /// APIC spurious-interrupt vector register offset in the LAPIC page.
    const APIC_SPIV: usize = 0xf0;
    /// APIC task priority register offset.
    const APIC_TPR: usize = 0x80;

    /// A VM with an in-kernel irqchip (and a PIT if `pit`) and one vCPU with CPUID set.
    fn vm_with_vcpu(kvm: &Kvm, pit: bool) -> (VmFd, VcpuFd) {
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        if pit {
            vm.create_pit2(kvm_pit_config::default()).unwrap();
        }
        let vcpu = vm.create_vcpu(0).unwrap();
        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        vcpu.set_cpuid2(&crate::vm::cpuid::for_vcpu(&supported, 0, 1)).unwrap();
        (vm, vcpu)
    }

    fn set_msr(vcpu: &VcpuFd, index: u32, data: u64) -> bool {
        let msrs = Msrs::from_entries(&[kvm_msr_entry { index, data, ..Default::default() }]).unwrap();
        vcpu.set_msrs(&msrs).unwrap_or(0) == 1
    }

    /// Puts distinctive values in every part of the vCPU the test checks.
    fn make_distinctive(vcpu: &VcpuFd) -> bool {
        let mut sregs = vcpu.get_sregs().unwrap();
        // 64-bit long mode at CPL3, as guest programs run here.
        let code = kvm_bindings::kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x23,
            type_: 0xb,
            present: 1,
            dpl: 3,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        let data = kvm_bindings::kvm_segment { selector: 0x1b, type_: 3, db: 1, l: 0, ..code };
        sregs.cs = code;
        (sregs.ds, sregs.es, sregs.ss) = (data, data, data);
        sregs.fs = kvm_bindings::kvm_segment { base: 0x7000_1000, ..data };
        sregs.gs = kvm_bindings::kvm_segment { base: 0x7000_2000, ..data };
        sregs.gdt.base = 0x5000;
        sregs.gdt.limit = 0x7f;
        sregs.idt.base = 0x6000;
        sregs.idt.limit = 0xfff;
        sregs.cr3 = 0x9000;
        sregs.cr4 = 0x620; // PAE | OSFXSR | OSXMMEXCPT
        sregs.cr0 = 0x8001_0033;
        sregs.efer = 0x500; // LME | LMA
        sregs.cr2 = 0xdead_b000;
        vcpu.set_sregs(&sregs).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rax = 0x1234_5678_9abc_def0;
        regs.rbx = 0x0bad_cafe;
        regs.r15 = 0xfeed_f00d;
        regs.rsp = 0x7fff_f000;
        regs.rip = 0x0040_1234;
        regs.rflags = 0x202;
        vcpu.set_regs(&regs).unwrap();
        let mut fpu = vcpu.get_fpu().unwrap();
        fpu.xmm[0] = *b"mosaic-state-xmm";
        fpu.mxcsr = 0x1fa0;
        vcpu.set_fpu(&fpu).unwrap();
        let mut dr = vcpu.get_debug_regs().unwrap();
        dr.db = [0x1000, 0x2000, 0x3000, 0x4000];
        vcpu.set_debug_regs(&dr).unwrap();
        let mut lapic = vcpu.get_lapic().unwrap();
        lapic.regs[APIC_SPIV..APIC_SPIV + 4].copy_from_slice(&0x1ffu32.to_le_bytes().map(|b| b as _));
        lapic.regs[APIC_TPR..APIC_TPR + 4].copy_from_slice(&0x20u32.to_le_bytes().map(|b| b as _));
        vcpu.set_lapic(&lapic).unwrap();
        assert!(set_msr(vcpu, MSR_LSTAR, 0xffff_8000_dead_0000));
        assert!(set_msr(vcpu, MSR_KERNEL_GS_BASE, 0x7000_3000));
        let tsc_aux = set_msr(vcpu, MSR_IA32_TSC_AUX, 0x2a);
        vcpu.set_mp_state(kvm_bindings::kvm_mp_state { mp_state: KVM_MP_STATE_HALTED }).unwrap();
        tsc_aux
    }

    fn layout_and_attrs() -> (MemoryLayout, guest_mem::attrs::AttrState) {
        let layout =
            MemoryLayout::place(vec![ZoneSpec { size: 64 << 20, backend: BackendSpec::new(BackendKind::Memfd) }])
                .unwrap();
        let ram: Vec<(u64, u64)> = layout.regions().iter().map(|r| (r.gpa, r.size)).collect();
        let mut attrs = Attributes::new(&ram, PageState::Shared);
        attrs.set(0x20_0000, 0x10_0000, PageState::Private).unwrap();
        (layout, attrs.to_state())
    }

    /// MSRs that move on their own between two captures (time) and so are not compared.
    fn time_varying(index: u32) -> bool {
        matches!(index, vcpu::MSR_IA32_TSC)
    }

    /// Captures read the FPU state from the XSAVE area's legacy region instead of
    /// KVM_GET_FPU: both must say the same (MXCSR aside: KVM_GET_FPU leaves it 0).
    #[test]
    fn the_fpu_state_read_from_xsave_is_what_kvm_get_fpu_says() {
        let kvm = Kvm::new().expect("/dev/kvm");
        let (_vm, vcpu) = vm_with_vcpu(&kvm, true);
        let mut x = vcpu.get_xsave().expect("KVM_GET_XSAVE");
        // Distinct bytes in the whole legacy region (the FXSAVE image), then
        // XSTATE_BV's x87 and SSE bits, so that KVM takes them.
        for (i, w) in x.region[..128].iter_mut().enumerate() {
            *w = 0x0101_0101u32.wrapping_mul(i as u32 + 1);
        }
        x.region[6] = 0x1f80; // MXCSR: a valid value
        x.region[7] = 0xffff; // MXCSR_MASK
        x.region[128] |= 3;
        // SAFETY: a 4 KiB kvm_xsave (KVM_CAP_XSAVE2 is 4096 for this process: no
        // dynamic XSTATE features are asked for), alive for the call.
        unsafe { vcpu.set_xsave(&x) }.unwrap();
        let x = vcpu.get_xsave().unwrap();
        let mut from_kvm = vcpu::FpuState::from(&vcpu.get_fpu().unwrap());
        let from_xsave = vcpu::FpuState::from_xsave(&x);
        assert_eq!(from_xsave.mxcsr, 0x1f80);
        from_kvm.mxcsr = from_xsave.mxcsr;
        assert_eq!(from_xsave, from_kvm);
        assert_ne!(from_xsave.xmm[15], [0; 16]);
        assert_ne!(from_xsave.fpr[7], [0; 16]);
    }

    #[test]
    fn vcpu_and_vm_state_round_trip_into_a_second_vm() {
        let kvm = Kvm::new().expect("/dev/kvm");
        let (vm_a, vcpu_a) = vm_with_vcpu(&kvm, true);
        let tsc_aux = make_distinctive(&vcpu_a);
        let cap_a = vcpu::capture(&vcpu_a, &kvm).unwrap();
        let vm_state_a = vm::capture(&vm_a).unwrap();
        eprintln!(
            "captured: {} MSRs, {} unreadable {:x?}; TSC_AUX writable: {tsc_aux}; xsave: {}; xcrs: {}; tsc_khz: {:?}; \
             PIT: {}",
            cap_a.msrs.len(),
            cap_a.msrs_unreadable.len(),
            cap_a.msrs_unreadable,
            cap_a.xsave.is_some(),
            cap_a.xcrs.is_some(),
            cap_a.tsc_khz,
            vm_state_a.pit.is_some(),
        );
        assert_eq!(cap_a.regs.rax, 0x1234_5678_9abc_def0);
        assert_eq!(cap_a.msr(MSR_LSTAR), Some(0xffff_8000_dead_0000));
        if tsc_aux {
            assert_eq!(cap_a.msr(MSR_IA32_TSC_AUX), Some(0x2a));
        }

        let (layout, attrs) = layout_and_attrs();
        let entry = format::VcpuEntry {
            kvm: Some(cap_a.clone()),
            ports: Default::default(),
            tsc_offset: vcpu::tsc_offset(&vcpu_a),
        };
        let state = format::StateV2 {
            layout: layout.clone(),
            attrs: attrs.clone(),
            vcpus: vec![entry.clone()],
            vm: vm_state_a.clone(),
            devices: Default::default(),
            captured_ns: 1,
        };
        let bytes = encode(FORMAT_VERSION, &state).unwrap();
        let v1 = StateV1 { layout: layout.clone(), attrs: attrs.clone(), vcpus: vec![cap_a.clone()], vm: vm_state_a };
        let v1_bytes = encode(1, &v1).unwrap();
        eprintln!("state frame with one vCPU: {} bytes (version 1, JSON: {} bytes)", bytes.len(), v1_bytes.len());
        assert!(bytes.len() * 2 < v1_bytes.len(), "the binary encoding is not smaller");
        // A newer build reads the previous version's state.
        let old = format::decode_state(&v1_bytes, 16 << 20).unwrap();
        assert_eq!(old.vcpus[0].kvm.as_ref(), Some(&cap_a));
        assert_eq!(old.layout, layout);
        let back = format::decode_state(&bytes, 16 << 20).unwrap();
        assert_eq!(back.layout, layout);
        assert_eq!(back.attrs, attrs);
        assert_eq!(back.vcpus, vec![entry]);
        assert_eq!(back.captured_ns, 1);

        let (vm_b, vcpu_b) = vm_with_vcpu(&kvm, true);
        vm::restore(&vm_b, &back.vm).unwrap();
        let kvm_states: Vec<VcpuState> = back.vcpus.iter().filter_map(|v| v.kvm.clone()).collect();
        vcpu::restore_all(std::slice::from_ref(&vcpu_b), &kvm_states).unwrap();
        let cap_b = vcpu::capture(&vcpu_b, &kvm).unwrap();
        let vm_state_b = vm::capture(&vm_b).unwrap();

        assert_eq!(cap_b.regs, cap_a.regs);
        for (name, a, b) in [
            ("cs", cap_a.sregs.cs, cap_b.sregs.cs),
            ("ds", cap_a.sregs.ds, cap_b.sregs.ds),
            ("ss", cap_a.sregs.ss, cap_b.sregs.ss),
            ("fs", cap_a.sregs.fs, cap_b.sregs.fs),
            ("gs", cap_a.sregs.gs, cap_b.sregs.gs),
            ("tr", cap_a.sregs.tr, cap_b.sregs.tr),
        ] {
            assert_eq!(a, b, "segment {name}");
        }
        let cr = |s: &kvm_bindings::kvm_sregs| (s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base);
        assert_eq!(cr(&cap_b.sregs), cr(&cap_a.sregs));
        assert_eq!((cap_b.sregs.gdt, cap_b.sregs.idt), (cap_a.sregs.gdt, cap_a.sregs.idt));
        assert_eq!(cap_b.sregs, cap_a.sregs);
        assert_eq!(cap_b.fpu, cap_a.fpu);
        assert_eq!(cap_b.xsave, cap_a.xsave);
        assert_eq!(cap_b.xcrs, cap_a.xcrs);
        assert_eq!(cap_b.debug_regs, cap_a.debug_regs);
        assert_eq!(cap_b.lapic.regs, cap_a.lapic.regs);
        assert_eq!(cap_b.mp_state, cap_a.mp_state);
        assert_eq!(cap_b.mp_state.mp_state, KVM_MP_STATE_HALTED);
        assert_eq!(cap_b.cpuid, cap_a.cpuid);
        assert_eq!(cap_b.vcpu_events, cap_a.vcpu_events);
        assert_eq!(cap_b.msrs_unreadable, cap_a.msrs_unreadable);
        assert_eq!(cap_b.msrs.len(), cap_a.msrs.len());
        let differing: Vec<_> = cap_a
            .msrs
            .iter()
            .zip(&cap_b.msrs)
            .filter(|(a, b)| a.index != b.index || (a.data != b.data && !time_varying(a.index)))
            .collect();
        assert!(differing.is_empty(), "MSRs that did not round-trip: {differing:x?}");
        assert_eq!(cap_b.msr(MSR_LSTAR), Some(0xffff_8000_dead_0000));
        assert_eq!(cap_b.msr(MSR_KERNEL_GS_BASE), Some(0x7000_3000));
        if tsc_aux {
            assert_eq!(cap_b.msr(MSR_IA32_TSC_AUX), Some(0x2a));
        }

        let bytes_of = |c: &kvm_bindings::kvm_irqchip| serde_json::to_value(c).unwrap();
        assert_eq!(bytes_of(&vm_state_b.pic_master), bytes_of(&back.vm.pic_master));
        assert_eq!(bytes_of(&vm_state_b.pic_slave), bytes_of(&back.vm.pic_slave));
        assert_eq!(bytes_of(&vm_state_b.ioapic), bytes_of(&back.vm.ioapic));
        assert!(vm_state_b.pit.is_some());
        assert!(vm_state_b.clock.clock >= back.vm.clock.clock, "kvmclock went backwards");
    }

    #[test]
    fn vm_restore_refuses_a_pit_mismatch_and_vcpu_count_mismatch() {
        let kvm = Kvm::new().expect("/dev/kvm");
        let (with_pit, _v1) = vm_with_vcpu(&kvm, true);
        let (without_pit, v2) = vm_with_vcpu(&kvm, false);
        let s_pit = vm::capture(&with_pit).unwrap();
        let s_none = vm::capture(&without_pit).unwrap();
        assert!(s_pit.pit.is_some() && s_none.pit.is_none());
        assert!(matches!(vm::restore(&without_pit, &s_pit), Err(StateError::PitMissing)));
        assert!(matches!(vm::restore(&with_pit, &s_none), Err(StateError::PitUnexpected)));
        let e = vcpu::restore_all(std::slice::from_ref(&v2), &[]).unwrap_err();
        assert!(matches!(e, StateError::VcpuCount { state: 0, target: 1 }), "{e}");
    }

    #[test]
    fn a_refused_msr_is_named() {
        let kvm = Kvm::new().expect("/dev/kvm");
        let (_vm, vcpu) = vm_with_vcpu(&kvm, false);
        let mut s = vcpu::capture(&vcpu, &kvm).unwrap();
        // A non-canonical LSTAR is refused by KVM.
        s.msrs.retain(|m| m.index == MSR_LSTAR);
        s.msrs[0].data = 0x8000_0000_0000_0000;
        let e = vcpu::restore(&vcpu, &s).unwrap_err();
        assert!(matches!(e, StateError::MsrRefused { index: MSR_LSTAR, .. }), "{e}");
        assert!(e.to_string().contains("0xc0000082"), "{e}");
    }
}
