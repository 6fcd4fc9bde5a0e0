//! The `interceptor` binary: CLI dispatch. `run` is the library's [`interceptor::app`].

use std::{collections::BTreeMap, process::ExitCode};

use anyhow::{Context, Result};
use clap::Parser;
use interceptor::{
    app::{self, App},
    cgroupfs,
    config::{
        self, AttachArgs, Cli, Command, LogFormat, PinArgs, ReadyArgs, ReportArgs, StatusArgs,
    },
    ebpf,
    observe::client,
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let usage = error.use_stderr();
            let _ = error.print();
            return ExitCode::from(if usage { config::EXIT_USAGE as u8 } else { 0 });
        }
    };
    init_tracing(&cli.log);
    let env: config::Env = std::env::vars().collect::<BTreeMap<_, _>>();
    let result = match &cli.command {
        Command::Attach(args) => attach(args, &env),
        Command::Detach(args) => detach(args),
        Command::Status(args) => status(args),
        Command::Run(args) => run(args, &env),
        Command::Report(args) => report(args),
        Command::Ready(args) => Ok(ready(args)),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            tracing::error!("{error:#}");
            if error.downcast_ref::<config::ConfigError>().is_some() {
                ExitCode::from(config::EXIT_USAGE as u8)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn init_tracing(log: &config::LogArgs) {
    let filter = EnvFilter::try_new(&log.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn attach(args: &AttachArgs, env: &config::Env) -> Result<ExitCode> {
    let redirect = args.redirect(env)?;
    let cgroup_root = match &args.cgroup_root {
        Some(path) => path.clone(),
        None => cgroupfs::default_cgroup_root()?,
    };
    let options = ebpf::Options {
        pin_dir: args.pins.bpf_pin_dir.clone(),
        cgroup_root: cgroup_root.clone(),
        redirect,
        reload: args.reload,
        kernel_log: tracing::enabled!(target: "interceptor::kernel", tracing::Level::DEBUG),
    };
    let datapath = ebpf::Datapath::open(&options)
        .with_context(|| format!("attaching to {}", cgroup_root.display()))?;
    tracing::info!(
        outcome = ?datapath.outcome(),
        cgroup = %cgroup_root.display(),
        cgroup_id = datapath.cgroup_id(),
        "programs attached"
    );
    Ok(ExitCode::SUCCESS)
}

fn run(args: &config::RunArgs, env: &config::Env) -> Result<ExitCode> {
    let config = args.validate(env)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async { App::build(config).await?.run(app::shutdown_signal()).await })?;
    Ok(ExitCode::SUCCESS)
}

fn detach(args: &PinArgs) -> Result<ExitCode> {
    let removed = ebpf::detach(&args.bpf_pin_dir)?;
    if removed.is_empty() {
        println!("nothing pinned under {}", args.bpf_pin_dir.display());
    }
    for path in removed {
        println!("removed {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `interceptor ready`: the readiness probe's answer is whether the file exists.
fn ready(args: &ReadyArgs) -> ExitCode {
    if args.file.exists() {
        ExitCode::SUCCESS
    } else {
        eprintln!("not ready: {} does not exist", args.file.display());
        ExitCode::FAILURE
    }
}

fn report(args: &ReportArgs) -> Result<ExitCode> {
    let report = client::fetch(args.admin_addr)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(ExitCode::SUCCESS)
}

/// What `status` says of the running agent's mode: observe mode is named loudly.
fn agent_mode(addr: std::net::SocketAddr) -> (Option<String>, String) {
    match client::mode(addr) {
        Ok(mode) if mode == client::OBSERVE => (
            Some(mode),
            format!(
                "agent:    OBSERVE MODE at {addr}: pods get the node's credentials; nothing is \
                 enforced (`interceptor report` shows what was observed)"
            ),
        ),
        Ok(mode) => {
            let line = format!("agent:    {mode} at {addr}");
            (Some(mode), line)
        }
        Err(error) => (None, format!("agent:    mode unknown: {error}")),
    }
}

fn status(args: &StatusArgs) -> Result<ExitCode> {
    // Detaching removes the pin directory: that is "not attached" (exit 3), not an error
    // of the command (which would exit 1 and read as "status could not tell").
    let status = match ebpf::status(&args.pins.bpf_pin_dir) {
        Err(error @ ebpf::Error::NotAttached(_)) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({ "attached": false, "reason": error.to_string() })
                );
            } else {
                println!("not attached: {error}");
            }
            return Ok(ExitCode::from(3));
        }
        other => other?,
    };
    let (mode, mode_line) = agent_mode(args.admin_addr);
    if args.json {
        let mut json = serde_json::to_value(&status)?;
        json["agent_mode"] = mode.into();
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        println!("{status}");
        println!("{mode_line}");
    }
    // Like `systemctl is-active`: scripts can test the exit status.
    Ok(if status.attached() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}
