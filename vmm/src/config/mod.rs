//! `mosaic run` configuration: the flags, the same shape as a JSON file
//! (`--config`), and their validation into a [`RunPlan`].
//!
//! Every error names the flag it is about and is reported before anything is
//! created (exit code 2).

pub mod memory;
pub mod size;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use guest_mem::{capacity, BackendKind, EngineKind, LayoutError, MemoryLayout};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::boot::linux::LinuxConfig;
use crate::boot::program::{elf, layout::MAX_VCPUS};
use crate::devices::SerialOutput;
use memory::{MemoryConfig, MemoryFlagError};
use size::format_size;

/// Guest RAM when no `--memory` is given.
pub const DEFAULT_MEMORY: &str = "128M";
/// The guest program run when neither `--guest` nor `--kernel` is given.
pub const DEFAULT_GUEST: &str = "hello";

/// Errors in the configuration; each names its flag.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("--config: cannot read '{path}': {source}")]
    ConfigRead {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// The config file is not valid.
    #[error("--config: '{path}' is not a valid Mosaic config: {message}")]
    ConfigParse {
        /// Path.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A bad `--memory` value.
    #[error("--memory: {0}")]
    Memory(#[from] MemoryFlagError),
    /// Memory that cannot be laid out.
    #[error("--memory: {0}")]
    Layout(#[from] LayoutError),
    /// More RAM-backed memory than the host has available.
    #[error("--memory: {total} of RAM-backed guest memory is more than this host can back ({available} available)")]
    TooMuchMemory {
        /// Asked.
        total: String,
        /// Available.
        available: String,
    },
    /// `--guest` and `--kernel` together.
    #[error("--guest and --kernel cannot be used together")]
    GuestAndKernel,
    /// `--initramfs`/`--cmdline` without `--kernel`.
    #[error("{0} needs --kernel")]
    NeedsKernel(&'static str),
    /// `--guest` names nothing.
    #[error("--guest: '{0}' is neither a built-in guest ({builtins}) nor a file", builtins = crate::guests::NAMES.join(", "))]
    GuestNotFound(String),
    /// `--guest` file unreadable.
    #[error("--guest: cannot read '{path}': {source}")]
    GuestRead {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// `--guest` file is not a guest program.
    #[error("--guest: '{name}' is not a guest program: {source}")]
    GuestImage {
        /// Name or path.
        name: String,
        /// Cause.
        source: elf::ElfError,
    },
    /// `--kernel`/`--initramfs` unreadable.
    #[error("{flag}: cannot open '{path}': {source}")]
    FileMissing {
        /// Flag.
        flag: &'static str,
        /// Path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// Bad vCPU count.
    #[error("--vcpus: {0} is out of range (1 to {MAX_VCPUS})")]
    Vcpus(u32),
    /// Bad `--serial`.
    #[error("--serial: '{0}' is not stdout, none or file:PATH")]
    Serial(String),
    /// A `file` backing that cannot be guest RAM.
    #[error("--memory: '{0}' is neither a regular file nor a DAX device, so it cannot back guest RAM")]
    NotRam(PathBuf),
    /// More RAM than guest programs can map.
    #[error("--memory: guest programs can use RAM up to {limit} of guest-physical space; this layout ends at {end}")]
    ProgramRam {
        /// End of RAM.
        end: String,
        /// Limit.
        limit: String,
    },
    /// A bad `--api-socket`.
    #[error("--api-socket: {0}")]
    ApiSocket(String),
    /// A bad `--guest-cpl`.
    #[error("--guest-cpl: {0}")]
    GuestCpl(String),
    /// A bad `--private-engine`.
    #[error("--private-engine: {0}")]
    Engine(String),
    /// `--guest-arg` with `--kernel`.
    #[error("--guest-arg is for guest programs, not --kernel")]
    GuestArgWithKernel,
    /// `--stats-json` in a directory that does not exist.
    #[error("--stats-json: directory '{0}' does not exist")]
    StatsDir(PathBuf),
}

/// The configuration as flags or a JSON file give it; flags override the file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Built-in guest program name or path to a guest ELF.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<String>,
    /// Linux kernel (bzImage or ELF vmlinux).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// initramfs for the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Number of vCPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// Memory zones, in guest-physical order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub memory: Vec<MemoryConfig>,
    /// `stdout`, `none` or `file:PATH`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Where to write run statistics at exit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats_json: Option<PathBuf>,
    /// Serve the API on this Unix socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_socket: Option<PathBuf>,
    /// A number for the guest program (boot info `arg`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_arg: Option<u32>,
    /// Privilege level guest programs start at: 3 (default) or 0 (for hypercalls;
    /// native only where host-check says kernel-mode code is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_cpl: Option<u8>,
    /// The conversion engine: `userspace` (default) or `kernel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_engine: Option<String>,
}

impl VmConfig {
    /// Reads a JSON config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| ConfigError::ConfigRead { path: path.into(), source })?;
        serde_json::from_str(&text).map_err(|e| ConfigError::ConfigParse { path: path.into(), message: e.to_string() })
    }

    /// `self` with every field `over` sets replaced.
    pub fn overridden_by(mut self, over: VmConfig) -> Self {
        macro_rules! take {
            ($($f:ident),*) => { $( if over.$f.is_some() { self.$f = over.$f; } )* };
        }
        take!(
            guest,
            kernel,
            initramfs,
            cmdline,
            vcpus,
            serial,
            stats_json,
            api_socket,
            guest_arg,
            private_engine,
            guest_cpl
        );
        if !over.memory.is_empty() {
            self.memory = over.memory;
        }
        self
    }

    /// Validates everything and resolves names into a plan.
    pub fn resolve(self) -> Result<RunPlan, ConfigError> {
        let vcpus = self.vcpus.unwrap_or(1);
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(vcpus));
        }
        let memory = if self.memory.is_empty() {
            vec![MemoryConfig::parse_flag(&format!("size={DEFAULT_MEMORY}"))?]
        } else {
            self.memory
        };
        let zones = memory.iter().map(MemoryConfig::to_zone).collect::<Result<Vec<_>, _>>()?;
        let engine: EngineKind = match self.private_engine.as_deref() {
            None => EngineKind::Userspace,
            Some(s) => s.parse().map_err(ConfigError::Engine)?,
        };
        if engine == EngineKind::Kernel {
            if zones.iter().any(|z| z.backend.kind == BackendKind::Gmem) {
                return Err(ConfigError::Engine(
                    "the kernel engine keeps private pages in a guest_memfd of its own; a gmem zone cannot be its \
                     shared side (use memfd, hugetlb or file)"
                        .into(),
                ));
            }
            if self.kernel.is_some() && zones.iter().any(|z| z.backend.private) {
                return Err(ConfigError::Engine(
                    "with the kernel engine, private=on covers the free RAM of guest programs only (private pages \
                     start zeroed, so a kernel image cannot start private)"
                        .into(),
                ));
            }
        }
        for z in &zones {
            if let Some(path) = &z.backend.path {
                writable_backing(path)?;
            }
        }
        let layout = MemoryLayout::place(zones)?;
        check_capacity(&layout)?;
        let boot = match (self.guest, self.kernel) {
            (Some(_), Some(_)) => return Err(ConfigError::GuestAndKernel),
            (None, Some(_)) if self.guest_arg.is_some() => return Err(ConfigError::GuestArgWithKernel),
            (None, Some(_)) if self.guest_cpl.is_some() => {
                return Err(ConfigError::GuestCpl("is for guest programs, not --kernel".into()))
            }
            (None, Some(kernel)) => {
                readable("--kernel", &kernel)?;
                if let Some(i) = &self.initramfs {
                    readable("--initramfs", i)?;
                }
                BootSource::Linux(LinuxConfig {
                    kernel,
                    initramfs: self.initramfs,
                    cmdline: self.cmdline.unwrap_or_else(|| crate::boot::linux::DEFAULT_CMDLINE.to_string()),
                })
            }
            (guest, None) => {
                if self.initramfs.is_some() {
                    return Err(ConfigError::NeedsKernel("--initramfs"));
                }
                if self.cmdline.is_some() {
                    return Err(ConfigError::NeedsKernel("--cmdline"));
                }
                let limit = crate::boot::program::layout::MAX_MAPPED;
                if layout.ram_end() > limit {
                    return Err(ConfigError::ProgramRam {
                        end: format_size(layout.ram_end()),
                        limit: format_size(limit),
                    });
                }
                let kernel_mode = match self.guest_cpl {
                    None | Some(3) => false,
                    Some(0) => true,
                    Some(n) => return Err(ConfigError::GuestCpl(format!("{n} is not 0 or 3"))),
                };
                program(guest.as_deref().unwrap_or(DEFAULT_GUEST), kernel_mode)?
            }
        };
        let serial = match self.serial.as_deref() {
            None | Some("stdout") => SerialOutput::Stdout,
            Some("none") => SerialOutput::None,
            Some(s) => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => SerialOutput::File(p.into()),
                _ => return Err(ConfigError::Serial(s.into())),
            },
        };
        if let Some(p) = &self.stats_json {
            let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            if !dir.is_dir() {
                return Err(ConfigError::StatsDir(dir.into()));
            }
        }
        if let Some(p) = &self.api_socket {
            let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            if !dir.is_dir() {
                return Err(ConfigError::ApiSocket(format!("directory '{}' does not exist", dir.display())));
            }
            if p.exists() {
                return Err(ConfigError::ApiSocket(format!(
                    "'{}' already exists (a running Mosaic, or a stale socket to remove)",
                    p.display()
                )));
            }
        }
        Ok(RunPlan {
            boot,
            vcpus,
            layout,
            serial,
            stats_json: self.stats_json,
            api_socket: self.api_socket,
            guest_arg: self.guest_arg.unwrap_or(0),
            pool_grants: Vec::new(),
            engine,
        })
    }
}

fn readable(flag: &'static str, path: &Path) -> Result<(), ConfigError> {
    fs::File::open(path).map(drop).map_err(|source| ConfigError::FileMissing { flag, path: path.into(), source })
}

/// A `file` backing must exist, be writable, and be able to back guest RAM (the
/// same check the backend makes when it opens it).
fn writable_backing(path: &Path) -> Result<(), ConfigError> {
    use guest_mem::backend::{check_backing_file, BackendError};
    let err = |source| ConfigError::FileMissing { flag: "--memory", path: path.into(), source };
    if path.is_dir() {
        return Err(err(io::Error::from(io::ErrorKind::IsADirectory)));
    }
    match check_backing_file(path) {
        Ok(_) => Ok(()),
        Err(BackendError::File { source, .. }) => Err(err(source)),
        Err(_) => Err(ConfigError::NotRam(path.into())),
    }
}

fn program(name: &str, kernel_mode: bool) -> Result<BootSource, ConfigError> {
    let image = match crate::guests::builtin(name) {
        Some(b) => b.to_vec(),
        None => {
            let path = Path::new(name);
            if !path.exists() {
                return Err(ConfigError::GuestNotFound(name.into()));
            }
            fs::read(path).map_err(|source| ConfigError::GuestRead { path: path.into(), source })?
        }
    };
    elf::parse(&image, crate::boot::program::layout::IMAGE_START)
        .map_err(|source| ConfigError::GuestImage { name: name.into(), source })?;
    Ok(BootSource::Program { name: name.into(), image, kernel_mode })
}

/// Refuses more RAM-backed guest memory than `MemAvailable`.
fn check_capacity(layout: &MemoryLayout) -> Result<(), ConfigError> {
    let ram_backed: u64 = layout
        .zones()
        .iter()
        .filter(|z| {
            matches!(z.backend.kind, BackendKind::Anon | BackendKind::Memfd | BackendKind::Gmem | BackendKind::Thp)
        })
        .map(|z| z.size)
        .sum();
    if let Ok(avail) = capacity::mem_available() {
        if ram_backed > avail {
            return Err(ConfigError::TooMuchMemory {
                total: format_size(ram_backed),
                available: format!("{:.1}G", avail as f64 / f64::from(1u32 << 30)),
            });
        }
    }
    Ok(())
}

/// What to boot.
#[derive(Debug, Clone)]
pub enum BootSource {
    /// A guest program.
    Program {
        /// Name or path as given.
        name: String,
        /// The ELF image.
        image: Vec<u8>,
        /// Enter at CPL0 (host-check's probe only; the CLI always uses CPL3).
        kernel_mode: bool,
    },
    /// A Linux kernel.
    Linux(LinuxConfig),
}

/// A validated run.
#[derive(Debug, Clone)]
pub struct RunPlan {
    /// What to boot.
    pub boot: BootSource,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM layout.
    pub layout: MemoryLayout,
    /// Console output.
    pub serial: SerialOutput,
    /// Statistics file.
    pub stats_json: Option<PathBuf>,
    /// API socket path.
    pub api_socket: Option<PathBuf>,
    /// Boot info `arg` for guest programs.
    pub guest_arg: u32,
    /// Hugetlb pool pages this VM added (reserve=auto), filled in from the preflight:
    /// a live update hands them to the next process, which gives them back.
    pub pool_grants: Vec<crate::preflight::PoolGrant>,
    /// The conversion engine.
    pub engine: EngineKind,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file() {
        let file: VmConfig =
            serde_json::from_str(r#"{"vcpus": 2, "memory": [{"size": "256M", "backend": "anon"}], "serial": "none"}"#)
                .unwrap();
        let flags = VmConfig { vcpus: Some(4), ..Default::default() };
        let c = file.overridden_by(flags);
        assert_eq!(c.vcpus, Some(4));
        assert_eq!(c.memory.len(), 1);
        assert_eq!(c.serial.as_deref(), Some("none"));
    }

    #[test]
    fn unknown_config_fields_are_refused() {
        assert!(serde_json::from_str::<VmConfig>(r#"{"vcpu": 2}"#).is_err());
        assert!(serde_json::from_str::<VmConfig>(r#"{"memory": [{"size": 1, "colour": 2}]}"#).is_err());
    }

    #[test]
    fn validation_names_the_flag() {
        let bad = |c: VmConfig| c.resolve().unwrap_err().to_string();
        assert!(bad(VmConfig { vcpus: Some(0), ..Default::default() }).starts_with("--vcpus:"));
        assert!(bad(VmConfig { vcpus: Some(999), ..Default::default() }).starts_with("--vcpus:"));
        assert!(bad(VmConfig { guest: Some("nope".into()), ..Default::default() }).starts_with("--guest:"));
        assert!(bad(VmConfig { kernel: Some("/nonexistent".into()), ..Default::default() }).starts_with("--kernel:"));
        assert!(bad(VmConfig { serial: Some("tty".into()), ..Default::default() }).starts_with("--serial:"));
        let huge = MemoryConfig::parse_flag("size=64T").unwrap();
        assert!(bad(VmConfig { memory: vec![huge], ..Default::default() }).starts_with("--memory:"));
        let zero = MemoryConfig::parse_flag("size=64M,backend=file,path=/dev/zero").unwrap();
        assert!(bad(VmConfig { memory: vec![zero], ..Default::default() }).contains("neither a regular file nor a DAX"));
        let missing = MemoryConfig::parse_flag("size=64M,backend=file,path=/nonexistent/ram").unwrap();
        assert!(bad(VmConfig { memory: vec![missing], ..Default::default() }).starts_with("--memory: cannot open"));
        let g = VmConfig { guest: Some("hello".into()), kernel: Some("/x".into()), ..Default::default() };
        assert_eq!(bad(g), "--guest and --kernel cannot be used together");
        assert_eq!(bad(VmConfig { cmdline: Some("x".into()), ..Default::default() }), "--cmdline needs --kernel");
    }

    #[test]
    fn defaults_resolve_to_hello() {
        let p = VmConfig::default().resolve().unwrap();
        assert!(matches!(p.boot, BootSource::Program { ref name, .. } if name == "hello"));
        assert_eq!(p.layout.ram_size(), 128 << 20);
        assert_eq!(p.vcpus, 1);
    }
}
