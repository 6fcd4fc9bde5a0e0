//! Running system tools, failing with what they printed.

use std::process::{Command, Output};

/// Runs `program args`, panicking with its output if it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = output(program, args);
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `program args` and returns whatever happened; for cleanup and probing.
pub fn output(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("could not start {program}: {error}"))
}

/// Best effort, for guards: never panics (a panic in Drop during a panic aborts).
pub fn quiet(program: &str, args: &[&str]) {
    let _ = Command::new(program).args(args).output();
}
