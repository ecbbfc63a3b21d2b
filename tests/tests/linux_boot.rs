//! Boots a real Debian kernel with the `mosaic` binary, where the host can run it.
//!
//! Linux runs at CPL0, which KVM only emulates on nested `kvm_pvm` hosts (see
//! shared/HOST-KVM.md), so this test first asks `mosaic host-check --json` and skips
//! unless `kernel_mode.native` is true. It also skips without a test kernel (fetched by
//! `resources/scripts/fetch-test-kernel.sh`, found through `MOSAIC_TEST_KERNEL_DIR`), or
//! fails then if `MOSAIC_REQUIRE_TEST_KERNEL=1`.
//!
//! With no root file system and no initramfs the kernel panics after mounting root
//! fails; `panic=1 reboot=k` makes it reset through the i8042 a second later, and
//! Mosaic turns that reset into a clean exit.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mosaic_tests::*;

const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// The test kernel's bzImage, or `None` after reporting the skip.
fn test_kernel() -> Option<PathBuf> {
    let dir = std::env::var_os("MOSAIC_TEST_KERNEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-kernel"));
    let kernel = dir.join("vmlinuz");
    if kernel.is_file() {
        return Some(kernel);
    }
    if std::env::var("MOSAIC_REQUIRE_TEST_KERNEL").as_deref() == Ok("1") {
        panic!("no test kernel {} (run resources/scripts/fetch-test-kernel.sh)", kernel.display());
    }
    skip("no test kernel (run resources/scripts/fetch-test-kernel.sh)");
    None
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[test]
fn linux_boots_to_the_missing_root_panic_and_reboots() {
    let hc = host_check();
    let native = hc["kernel_mode"]["native"]
        .as_bool()
        .unwrap_or_else(|| panic!("host-check JSON has no boolean kernel_mode.native:\n{hc:#}"));
    if !native {
        skip("linux real boot: kernel-mode guest code is emulated on this host (host-check kernel_mode.native=false)");
        return;
    }
    let Some(kernel) = test_kernel() else { return };

    let start = Instant::now();
    let kernel_flag = format!("--kernel={}", kernel.display());
    let cmdline_flag = format!("--cmdline={CMDLINE}");
    let out = run_guest(&[&kernel_flag, "--memory=size=256M", &cmdline_flag], BOOT_TIMEOUT);
    let context = format!(
        "exit code {:?}\nserial (last 40 lines):\n{}\nmosaic stderr (last 40 lines):\n{}",
        out.code,
        tail(&out.serial, 40),
        tail(&out.stderr, 40)
    );
    assert!(out.code.is_some(), "mosaic did not exit within {BOOT_TIMEOUT:?}; killed.\n{context}");
    assert!(out.serial.contains("Linux version"), "no kernel banner on the serial console.\n{context}");
    assert!(
        out.serial.contains("VFS: Unable to mount root") || out.serial.contains("Kernel panic"),
        "the kernel did not reach the missing-root panic.\n{context}"
    );
    assert_eq!(out.code, Some(0), "mosaic should exit 0 after the guest's i8042 reset.\n{context}");
    println!("linux booted, panicked for lack of root and reset in {:.1?}", start.elapsed());
}
