//! The `imds-probe` client, run inside pods.

use std::process::Command;

/// What one probe run reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    pub connected: usize,
    pub failed: usize,
    pub replies: usize,
    pub first_error: String,
}

/// The probe binary: cargo builds it beside the test executables' `deps/` directory.
pub fn binary() -> &'static str {
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        // Test executables live in target/<profile>/deps, binaries one level up.
        let exe = std::env::current_exe().expect("current_exe");
        let probe = exe
            .ancestors()
            .skip(1)
            .take(2)
            .map(|dir| dir.join("imds-probe"))
            .find(|path| path.is_file())
            .unwrap_or_else(|| panic!("no imds-probe near {}: build with cargo", exe.display()));
        probe.display().to_string()
    })
}

/// Runs a prepared probe command (see `Pod::command`) and parses its summary line.
pub fn run(mut command: Command) -> ProbeReport {
    let out = command
        .output()
        .unwrap_or_else(|error| panic!("could not start the probe: {error}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|line| line.starts_with("connected="))
        .unwrap_or_else(|| {
            panic!(
                "the probe printed no summary ({}): {stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|part| part.strip_prefix(&format!("{name}=")))
            .unwrap_or_default()
            .to_owned()
    };
    let number = |name: &str| field(name).parse().unwrap_or(usize::MAX);
    ProbeReport {
        connected: number("connected"),
        failed: number("failed"),
        replies: number("replies"),
        first_error: line
            .split_once("first_error=")
            .map(|(_, error)| error.to_owned())
            .unwrap_or_default(),
    }
}
