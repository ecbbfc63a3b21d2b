//! Builds the built-in guest programs (resources/guests) with the system C compiler.
//!
//! Each program becomes `$OUT_DIR/<name>.elf`, a static ELF64 executable linked at
//! guest-physical 0x200000 (docs/GUEST-ABI.md), embedded by `src/guests.rs`. The
//! compiler is `$CC` if set (it may carry arguments, e.g. `ccache gcc`), else `gcc`.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

/// The guest programs and their sources, in link order (crt0 first).
const GUESTS: &[(&str, &[&str])] = &[
    ("hello", &["crt0.S", "rt.c", "hello.c"]),
    ("memtest", &["crt0.S", "rt.c", "memtest.c"]),
    ("fault", &["crt0.S", "rt.c", "fault.c"]),
    ("memlat", &["crt0.S", "rt.c", "memlat.c"]),
    ("convert", &["crt0.S", "rt.c", "convert.c"]),
    ("convstress", &["crt0.S", "rt.c", "convstress.c"]),
    ("convbench", &["crt0.S", "rt.c", "convbench.c"]),
    ("heartbeat", &["crt0.S", "rt.c", "heartbeat.c"]),
    ("hypercall", &["crt0.S", "rt.c", "hypercall.c"]),
    ("probe", &["probe.S"]),
];

/// Compile and link flags for every guest (freestanding, static, no PIE, no AVX).
const FLAGS: &[&str] = &[
    "-std=gnu11",
    "-O2",
    "-Wall",
    "-Wextra",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-no-pie",
    "-nostdlib",
    "-static",
    "-mno-red-zone",
    "-mno-avx",
    "-mno-avx2",
    "-mno-avx512f",
    "-mno-80387",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fcf-protection=none",
    "-fno-ident",
    "-ffunction-sections",
    "-fdata-sections",
    "-Wl,-T,link.ld",
    "-Wl,--build-id=none",
    "-Wl,--gc-sections",
    "-Wl,-z,max-page-size=4096",
    "-Wl,-z,noexecstack",
    "-Wl,--orphan-handling=error",
];

/// Lowest guest-physical address a PT_LOAD segment may use.
const IMAGE_BASE: u64 = 0x20_0000;

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let src_dir = manifest.join("../resources/guests");
    let src_dir = fs::canonicalize(&src_dir).unwrap_or(src_dir);
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));

    println!("cargo:rerun-if-env-changed=CC");
    println!("cargo:rerun-if-changed={}", src_dir.display());
    let entries = fs::read_dir(&src_dir)
        .unwrap_or_else(|e| fail(&format!("cannot read guest sources in {}: {e}", src_dir.display())));
    for entry in entries.flatten() {
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }

    let cc = env::var("CC").ok().filter(|s| !s.trim().is_empty());
    let cc = cc.as_deref().unwrap_or("gcc");
    for (name, sources) in GUESTS {
        let out = out_dir.join(format!("{name}.elf"));
        compile(cc, &src_dir, sources, &out);
        if let Err(e) = check_elf(&out) {
            fail(&format!("guest `{name}` ({}): {e}", out.display()));
        }
    }
}

/// Compiles and links one guest; exits the build with the compiler's output on failure.
fn compile(cc: &str, src_dir: &Path, sources: &[&str], out: &Path) {
    let mut words = cc.split_whitespace();
    let program = words.next().unwrap_or("gcc");
    let mut cmd = Command::new(program);
    // Run in the source directory with relative source names, so no build paths end
    // up in the images' symbol tables.
    cmd.current_dir(src_dir).args(words).args(FLAGS).arg("-o").arg(out).args(sources);

    let output = cmd.output().unwrap_or_else(|e| {
        fail(&format!(
            "cannot run the C compiler `{cc}` to build the guest programs in {}: {e}\n\
             Install gcc (e.g. `apt-get install gcc`) or set CC to an x86-64 gcc.",
            src_dir.display()
        ))
    });
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        fail(&format!(
            "building guest {} with `{cc}` failed ({}):\n{:?}\n{}{}",
            out.display(),
            status_text(output.status),
            cmd,
            String::from_utf8_lossy(&output.stdout),
            stderr
        ));
    }
    let name = out.file_name().unwrap_or_default().to_string_lossy();
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning=guest {name}: {line}");
    }
}

fn status_text(status: ExitStatus) -> String {
    match status.code() {
        Some(code) => format!("exit code {code}"),
        None => "killed by a signal".to_string(),
    }
}

/// Checks the rules of docs/GUEST-ABI.md that a different compiler or linker could
/// break: static ELF64 x86-64 EXEC, PT_LOAD at or above 2 MiB with paddr == vaddr,
/// no PT_INTERP or PT_DYNAMIC.
fn check_elf(path: &Path) -> Result<(), String> {
    let data = fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let u16_at = |off: usize| data.get(off..off + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |off: usize| data.get(off..off + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
    let u64_at = |off: usize| data.get(off..off + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
    let short = || "truncated ELF".to_string();

    if data.get(..4) != Some(b"\x7fELF".as_slice()) || data.get(4) != Some(&2) || data.get(5) != Some(&1) {
        return Err("not a little-endian ELF64 file".into());
    }
    if u16_at(16).ok_or_else(short)? != 2 || u16_at(18).ok_or_else(short)? != 62 {
        return Err("not an x86-64 EXEC (static, non-PIE) image".into());
    }
    let phoff = usize::try_from(u64_at(32).ok_or_else(short)?).map_err(|_| short())?;
    let phentsize = usize::from(u16_at(54).ok_or_else(short)?);
    let phnum = usize::from(u16_at(56).ok_or_else(short)?);
    let mut loads = 0;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let p_type = u32_at(ph).ok_or_else(short)?;
        let vaddr = u64_at(ph + 16).ok_or_else(short)?;
        let paddr = u64_at(ph + 24).ok_or_else(short)?;
        match p_type {
            1 => {
                loads += 1;
                if paddr < IMAGE_BASE || paddr != vaddr {
                    return Err(format!(
                        "PT_LOAD at paddr {paddr:#x} vaddr {vaddr:#x}: must be equal and >= {IMAGE_BASE:#x}"
                    ));
                }
            }
            2 | 3 => return Err("has PT_DYNAMIC or PT_INTERP".into()),
            _ => {}
        }
    }
    if loads == 0 {
        return Err("no PT_LOAD segment".into());
    }
    Ok(())
}

/// Prints `msg` as a build error and stops the build.
fn fail(msg: &str) -> ! {
    eprintln!("error: mosaic guest programs: {msg}");
    std::process::exit(1);
}
