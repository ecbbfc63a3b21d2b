//! The `mosaic` command: `run` launches a microVM, `host-check` explains the host.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use vmm::config::memory::MemoryConfig;
use vmm::config::size::format_size;
use vmm::config::{RunPlan, VmConfig};
use vmm::error_chain;
use vmm::run::{self, report::RunReport};

/// Exit code for invalid flags or configuration.
const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(name = "mosaic", version, about = "A KVM microVM monitor built around its guest memory manager")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Launch a microVM and run it to the end; exits with the guest's exit code.
    Run(Box<RunArgs>),
    /// Show what this host can do for Mosaic.
    HostCheck {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Talk to a running VM through its API socket.
    Ctl(CtlArgs),
}

#[derive(Args)]
struct CtlArgs {
    /// The VM's API socket (`mosaic run --api-socket`).
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    /// Print the JSON answer instead of a summary.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    action: CtlAction,
}

#[derive(Subcommand, Clone)]
enum CtlAction {
    /// State, guest, vCPUs, uptime, memory zones.
    Vm,
    /// Regions, backends, page sizes, huge-page coverage, private/shared bytes.
    Memory,
    /// Pause the vCPUs.
    Pause,
    /// Resume paused vCPUs.
    Resume,
    /// Shut the VM down (mosaic run exits 0).
    Shutdown,
    /// Hand the running guest to a new Mosaic process (live update).
    LiveUpdate {
        /// The Mosaic binary to start (default: the one running the VM).
        #[arg(long, value_name = "PATH", conflicts_with = "incoming")]
        binary: Option<PathBuf>,
        /// Hand over to a process started with `mosaic run --incoming SOCKET`.
        #[arg(long, value_name = "SOCKET")]
        incoming: Option<PathBuf>,
    },
}

fn cmd_ctl(args: CtlArgs) -> ExitCode {
    let mut body = None;
    let (method, path) = match &args.action {
        CtlAction::Vm => ("GET", "/api/v1/vm"),
        CtlAction::Memory => ("GET", "/api/v1/vm/memory"),
        CtlAction::Pause => ("PUT", "/api/v1/vm/pause"),
        CtlAction::Resume => ("PUT", "/api/v1/vm/resume"),
        CtlAction::Shutdown => ("PUT", "/api/v1/vm/shutdown"),
        CtlAction::LiveUpdate { binary, incoming } => {
            let mut b = serde_json::Map::new();
            if let Some(p) = binary {
                b.insert("binary".into(), p.display().to_string().into());
            }
            if let Some(p) = incoming {
                b.insert("incoming".into(), p.display().to_string().into());
            }
            body = Some(serde_json::Value::Object(b).to_string());
            ("PUT", "/api/v1/vm/live-update")
        }
    };
    let answer = match vmm::api::client::request(&args.api_socket, method, path, body.as_deref()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mosaic: ctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !(200..300).contains(&answer.status) {
        let msg = answer.body["error"].as_str().unwrap_or("request failed");
        eprintln!("mosaic: ctl: {} ({})", msg, answer.status);
        return ExitCode::FAILURE;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&answer.body).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    match args.action {
        CtlAction::Vm => {
            let b = &answer.body;
            println!(
                "state {}, guest {}, {} vCPUs, up {} ms",
                b["state"].as_str().unwrap_or("?"),
                b["guest"].as_str().unwrap_or("?"),
                b["vcpus"],
                b["uptime_ms"]
            );
        }
        CtlAction::Memory => {
            let b = &answer.body;
            for r in b["regions"].as_array().into_iter().flatten() {
                println!(
                    "region {:#x} +{}: {} ({} pages), {} huge bytes on the host",
                    r["gpa"].as_u64().unwrap_or(0),
                    format_size(r["size"].as_u64().unwrap_or(0)),
                    r["backend"].as_str().unwrap_or("?"),
                    format_size(r["page_size"].as_u64().unwrap_or(0)),
                    r["host_huge_bytes"]
                );
            }
            let c = &b["coverage"];
            let p = &b["private_memory"];
            println!(
                "KVM maps {:.1}% of what it maps huge; private {} / shared {} bytes",
                c["kvm_huge_ratio"].as_f64().unwrap_or(0.0) * 100.0,
                p["private_bytes"],
                p["shared_bytes"]
            );
        }
        CtlAction::Pause => println!("paused"),
        CtlAction::Resume => println!("resumed"),
        CtlAction::Shutdown => println!("shutting down"),
        CtlAction::LiveUpdate { .. } => {
            let b = &answer.body;
            println!(
                "handed over to process {}: downtime {} us (pause {}, save {}, transfer {}, restore {}, resume {}), \
                 prepared in {} us, generation {}",
                b["pid"],
                b["downtime_us"],
                b["pause_us"],
                b["save_us"],
                b["transfer_us"],
                b["restore_us"],
                b["resume_us"],
                b["prepare_us"],
                b["generation"]
            );
        }
    }
    ExitCode::SUCCESS
}

#[derive(Args)]
struct RunArgs {
    /// Guest program: a built-in name (hello, memtest, fault, memlat, convert, convstress, convbench) or a path to a guest ELF.
    #[arg(long, value_name = "NAME|PATH")]
    guest: Option<String>,
    /// Linux kernel to boot (bzImage or ELF vmlinux).
    #[arg(long, value_name = "K")]
    kernel: Option<PathBuf>,
    /// initramfs for --kernel.
    #[arg(long, value_name = "I")]
    initramfs: Option<PathBuf>,
    /// Kernel command line for --kernel.
    #[arg(long, value_name = "C")]
    cmdline: Option<String>,
    /// Number of vCPUs (default 1).
    #[arg(long, value_name = "N")]
    vcpus: Option<u32>,
    /// A zone of guest RAM; repeat for several zones, placed in order
    /// (default size=128M,backend=memfd). Huge pages: backend=hugetlb[,page-size=2M|1G]
    /// [,reserve=auto], backend=thp[,shared=on], with [,fallback=error|thp|4k].
    #[arg(long, value_name = "size=SIZE,backend=anon|memfd|gmem|file|hugetlb|thp[,KEY=VALUE...]")]
    memory: Vec<String>,
    /// Serial console: stdout (default), file:PATH or none.
    #[arg(long, value_name = "stdout|file:P|none")]
    serial: Option<String>,
    /// Write run statistics as JSON to FILE at exit.
    #[arg(long, value_name = "FILE")]
    stats_json: Option<PathBuf>,
    /// Serve the HTTP API (docs/openapi.yaml) on this Unix socket (created 0600,
    /// removed at exit).
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Read the configuration from a JSON file with the same shape as these flags;
    /// flags given as well override it.
    #[arg(long, value_name = "FILE.json")]
    config: Option<PathBuf>,
    /// A number handed to the guest program in boot info (`arg`); heartbeat takes the
    /// number of live updates to wait for.
    #[arg(long, value_name = "N")]
    guest_arg: Option<u32>,
    /// Who enforces private memory (docs/PRIVATE-MEMORY.md): userspace (default, any
    /// host, ZERO and PRESERVE) or kernel (KVM memory attributes with guest_memfd, on
    /// hosts that offer them; ZERO only).
    #[arg(long, value_name = "userspace|kernel")]
    private_engine: Option<String>,
    /// Start guest programs at CPL 0 instead of 3 (for guests that make hypercalls;
    /// only hosts where `mosaic host-check` reports kernel-mode code as native run it
    /// at full speed).
    #[arg(long, value_name = "0|3")]
    guest_cpl: Option<u8>,
    /// Take over a running guest from another Mosaic process (live update): listen on
    /// SOCKET for it (`mosaic ctl live-update --incoming SOCKET`). Everything else about
    /// the VM comes from the old process, so no other VM flag may be given.
    #[arg(long, value_name = "SOCKET", conflicts_with_all = [
        "guest", "kernel", "initramfs", "cmdline", "vcpus", "memory", "serial", "api_socket", "config", "guest_arg",
        "private_engine", "guest_cpl"
    ])]
    incoming: Option<String>,
}

impl RunArgs {
    fn plan(self) -> Result<RunPlan, vmm::config::ConfigError> {
        let base = match &self.config {
            Some(p) => VmConfig::from_file(p)?,
            None => VmConfig::default(),
        };
        let memory = self.memory.iter().map(|m| MemoryConfig::parse_flag(m)).collect::<Result<Vec<_>, _>>()?;
        let flags = VmConfig {
            guest: self.guest,
            kernel: self.kernel,
            initramfs: self.initramfs,
            cmdline: self.cmdline,
            vcpus: self.vcpus,
            memory,
            serial: self.serial,
            stats_json: self.stats_json,
            api_socket: self.api_socket,
            guest_arg: self.guest_arg,
            private_engine: self.private_engine,
            guest_cpl: self.guest_cpl,
        };
        base.overridden_by(flags).resolve()
    }
}

fn start_line(plan: &RunPlan, choices: &[vmm::preflight::ZoneChoice]) -> String {
    let guest = match &plan.boot {
        vmm::config::BootSource::Program { name, .. } => format!("guest program {name}"),
        vmm::config::BootSource::Linux(l) => format!("kernel {}", l.kernel.display()),
    };
    let zones: Vec<String> = plan
        .layout
        .zones()
        .iter()
        .zip(choices)
        .map(|(z, c)| {
            let pf = match (z.backend.prefault, z.backend.private) {
                (true, true) => ", prefaulted, private",
                (true, false) => ", prefaulted",
                (false, true) => ", private",
                (false, false) => "",
            };
            let mut s = format!("{} {} ({} pages{pf})", format_size(z.size), c.got, format_size(c.page_size_got));
            if c.asked != c.got {
                s.push_str(&format!(" [asked {}]", c.asked));
            }
            if let Some(n) = &c.note {
                s.push_str(&format!(" [{n}]"));
            }
            s
        })
        .collect();
    let v = plan.vcpus;
    format!("mosaic: starting {guest}: {v} vCPU{}, RAM {}", if v == 1 { "" } else { "s" }, zones.join(" + "))
}

fn write_stats(path: &std::path::Path, report: &RunReport) -> Result<(), String> {
    let text = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
    std::fs::write(path, text + "\n").map_err(|e| format!("cannot write '{}': {e}", path.display()))
}

/// `mosaic run --incoming`: receive a guest from another Mosaic process and run it.
fn cmd_incoming(spec: &str, stats_override: Option<PathBuf>) -> ExitCode {
    let incoming: vmm::live::Incoming = match spec.parse() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("mosaic: --incoming: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let adopted = match vmm::live::incoming::receive(&incoming) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mosaic: live update refused, nothing ran here: {}", error_chain(&e));
            return ExitCode::from(vmm::vm::control::EXIT_VM_FAILED as u8);
        }
    };
    let vmm::live::incoming::Adopted { machine, api, zones, info, gate } = adopted;
    let committed = gate.committed();
    let mut reservations: Vec<_> =
        info.pool_grants.iter().map(|g| vmm::preflight::PoolReservation::adopt(*g)).collect();
    let stats_json = stats_override.or_else(|| info.stats_json.clone());
    let opts = run::DriveOptions {
        deadline: None,
        api,
        zones,
        handover: vmm::live::HandoverInfo { stats_json: stats_json.clone(), ..info },
        gate: Some(Box::new(gate)),
    };
    let guest = machine.guest.clone();
    let result = run::drive(machine, opts);
    if !committed.load(std::sync::atomic::Ordering::SeqCst) {
        // The old process kept the guest: its stats file and pool pages are not ours.
        reservations.iter_mut().for_each(vmm::preflight::PoolReservation::disarm);
        if let Ok(r) = &result {
            eprintln!("mosaic: {}", r.outcome.description);
        }
        return ExitCode::from(vmm::vm::control::EXIT_VM_FAILED as u8);
    }
    eprintln!("mosaic: live update: ran guest {guest} (pid {}) to the end", std::process::id());
    finish_run(result, stats_json.as_deref(), reservations)
}

/// Reports the end of a run: stats file, outcome line, pool reservations, exit code.
fn finish_run(
    result: Result<RunReport, run::RunError>,
    stats_json: Option<&std::path::Path>,
    mut reservations: Vec<vmm::preflight::PoolReservation>,
) -> ExitCode {
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mosaic: {}", error_chain(&e));
            return ExitCode::from(vmm::vm::control::EXIT_VM_FAILED as u8);
        }
    };
    if report.outcome.kind == "handed_over" {
        // The next process runs the guest: it writes the stats and gives the pool
        // pages back when the guest ends.
        eprintln!("mosaic: {}", report.outcome.description);
        reservations.iter_mut().for_each(vmm::preflight::PoolReservation::disarm);
        return ExitCode::SUCCESS;
    }
    if report.outcome.kind != "exit" && report.outcome.kind != "reset" {
        eprintln!("mosaic: {}", report.outcome.description);
    }
    if let Some(p) = stats_json {
        if let Err(e) = write_stats(p, &report) {
            eprintln!("mosaic: --stats-json: {e}");
        }
    }
    drop(reservations);
    ExitCode::from(report.exit_code.clamp(0, 255) as u8)
}

fn cmd_run(args: RunArgs, start: Instant, start_ns: u64) -> ExitCode {
    if let Some(spec) = args.incoming.clone() {
        return cmd_incoming(&spec, args.stats_json);
    }
    let mut plan = match args.plan() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("mosaic: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if plan.engine == guest_mem::EngineKind::Kernel {
        let caps = vmm::kvm::caps::Caps::probe().unwrap_or_default();
        if let Err(e) = vmm::preflight::check_engine(plan.engine, &caps) {
            eprintln!("mosaic: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    }
    // Huge pages are checked (and pools grown) before anything else is built; the
    // reservations are given back when `pre` is dropped, after the VM is gone.
    let pre = match vmm::preflight::run(&plan.layout) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("mosaic: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    plan.layout = pre.layout.clone();
    plan.pool_grants = pre.reservations.iter().map(vmm::preflight::PoolReservation::grant).collect();
    eprintln!("{}", start_line(&plan, &pre.choices));
    let result = run::execute(&plan, start, start_ns, None).map(|mut r| {
        r.zones = pre.choices.clone();
        r
    });
    finish_run(result, plan.stats_json.as_deref(), pre.reservations)
}

fn cmd_host_check(json: bool) -> ExitCode {
    let probe = run::probe::kernel_mode_probe();
    match vmm::hostcheck::run(json, Some(probe)) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mosaic: host-check: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let start = Instant::now();
    let start_ns = run::monotonic_ns();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            // One line, like every other usage error: clap's first line without its
            // "error: " prefix (the usage block follows with --help).
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("mosaic: {} (see mosaic --help)", first.trim_start_matches("error: "));
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    match cli.command {
        Command::Run(args) => cmd_run(*args, start, start_ns),
        Command::HostCheck { json } => cmd_host_check(json),
        Command::Ctl(args) => cmd_ctl(args),
    }
}
