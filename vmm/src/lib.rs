//! Mosaic's VMM: VM and vCPUs, boot paths, devices, CLI configuration, runs and
//! host checks. The `mosaic` binary (`main.rs`) is a thin layer over this library.
#![deny(missing_docs)]

pub mod api;
pub mod boot;
pub mod config;
pub mod devices;
pub mod guests;
pub mod hostcheck;
pub mod kvm;
pub mod live;
pub mod preflight;
pub mod run;
pub mod state;
pub mod vm;

/// An error and its chain of causes on one line: `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.ends_with(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
