//! Mosaic's VMM: VM and vCPUs, boot paths, devices, CLI and host checks.
#![deny(missing_docs)]

pub mod boot;
pub mod devices;
pub mod guests;
pub mod hostcheck;
pub mod kvm;
