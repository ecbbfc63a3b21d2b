//! KVM helpers rust-vmm does not provide: capability numbers, binary stats.
