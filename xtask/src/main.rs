//! `cargo xtask <task>`: the project's automation, in plain Rust with no dependencies.
//!
//! - `ci`: formatting, clippy (`-D warnings`, all targets, all features), the workspace tests,
//!   rustdoc with `-D warnings`, the feature matrix, then `cargo deny` (licences, bans, sources)
//!   when cargo-deny is installed. This is the README's test command and what `.ci/run` runs.
//! - `matrix`: `vlm-factory` and `vlm-cli` tested with each backend feature alone, with all, and
//!   with none: seven explicit combinations, not a powerset. Then `cargo tree` checks that a
//!   `vlm` built without the `emulate` feature has no emulator, HTTP server or image decoder.
//! - `publish-check`: every publishable crate packages and verifies on its own.
//! - `bench [--quick]`: payload, end-to-end and memory benchmarks, written to
//!   docs/performance.md.
//! - `samples`: re-makes the sample images in `assets/samples/` (deterministic).
//! - `demo`: narrates `assets/samples` through the real `vlm` CLI against the built-in emulator.

mod bench;
mod docs_check;
mod samples;

use std::process::{Command, ExitCode};
use std::time::Instant;

/// The feature combinations of the matrix: each backend alone, all, and none (seven explicit
/// ones, not a powerset).
const MATRIX: [(&str, &[&str]); 7] = [
    ("none", &["--no-default-features"]),
    ("vllm", &["--no-default-features", "--features", "vllm"]),
    (
        "lmdeploy",
        &["--no-default-features", "--features", "lmdeploy"],
    ),
    ("triton", &["--no-default-features", "--features", "triton"]),
    ("ollama", &["--no-default-features", "--features", "ollama"]),
    ("openai", &["--no-default-features", "--features", "openai"]),
    ("all", &["--features", "all"]),
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("matrix") => matrix(),
        Some("publish-check") => publish_check(),
        Some("bench") => bench::run(args.iter().any(|a| a == "--quick")),
        Some("docs-check") => docs_check::run(args.iter().any(|a| a == "--bless")),
        Some("samples") => samples::write_all(&workspace_root().join("assets/samples")),
        Some("demo") => cargo(
            &[
                "run",
                "--quiet",
                "-p",
                "vlm-cli",
                "--",
                "narrate",
                "--emulate",
                "assets/samples",
            ],
            &[],
        ),
        Some("-h" | "--help" | "help") | None => {
            eprintln!(
                "usage: cargo xtask <ci | matrix | publish-check | bench | docs-check | samples | demo>"
            );
            eprintln!(
                "  ci      fmt check, clippy -D warnings, tests, rustdoc -D warnings, feature matrix"
            );
            eprintln!(
                "  matrix  test vlm-factory and vlm-cli with each backend feature alone, all, and none"
            );
            eprintln!("  publish-check  package and verify every publishable crate on its own");
            eprintln!(
                "  bench [--quick]  payload, end-to-end and memory benchmarks -> docs/performance.md"
            );
            eprintln!(
                "  docs-check [--bless]  run every command in README.md and docs/ against the emulators"
            );
            eprintln!("  samples re-make assets/samples (deterministic sample images)");
            eprintln!(
                "  demo    narrate assets/samples through the vlm CLI against the built-in emulator"
            );
            return if args.is_empty() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
        Some(other) => Err(format!("unknown task {other:?}; run `cargo xtask help`")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default()
}

pub(crate) fn cargo(args: &[&str], env: &[(&str, &str)]) -> Result<(), String> {
    let started = Instant::now();
    eprintln!("==> cargo {}", args.join(" "));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(cargo)
        .current_dir(workspace_root())
        .args(args)
        .envs(env.iter().copied())
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    eprintln!("<== {:.1} s", started.elapsed().as_secs_f64());
    if status.success() {
        Ok(())
    } else {
        Err(format!("`cargo {}` failed ({status})", args.join(" ")))
    }
}

fn ci() -> Result<(), String> {
    let started = Instant::now();
    cargo(&["fmt", "--all", "--", "--check"], &[])?;
    cargo(
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--all-features",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )?;
    cargo(&["test", "--workspace", "--all-features"], &[])?;
    // The benches once each, as tests (quick; `cargo xtask bench` measures for real).
    cargo(&["test", "-p", "vlm-core", "--benches"], &[])?;
    cargo(
        &["doc", "--workspace", "--all-features", "--no-deps"],
        &[("RUSTDOCFLAGS", "-D warnings")],
    )?;
    docs_check::run(false)?;
    matrix()?;
    lean()?;
    deny()?;
    eprintln!("ci passed in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn matrix() -> Result<(), String> {
    for package in ["vlm-factory", "vlm-cli"] {
        for (name, flags) in MATRIX {
            eprintln!("--- matrix: {package} with {name}");
            let mut args = vec!["test", "-p", package];
            args.extend_from_slice(flags);
            cargo(&args, &[])?;
        }
    }
    Ok(())
}

/// `cargo install vlm-cli --no-default-features --features vllm` stays lean: no emulator, no
/// HTTP server and no image decoders in its dependency tree.
fn lean() -> Result<(), String> {
    let args = [
        "tree",
        "-p",
        "vlm-cli",
        "--no-default-features",
        "--features",
        "vllm",
        "--edges",
        "normal",
        "--prefix",
        "none",
        "--format",
        "{p} {f}",
    ];
    eprintln!("==> cargo {}", args.join(" "));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let out = Command::new(cargo)
        .current_dir(workspace_root())
        .args(args)
        .output()
        .map_err(|e| format!("cannot run cargo tree: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`cargo {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let tree = String::from_utf8_lossy(&out.stdout);
    let heavy: Vec<&str> = tree
        .lines()
        .filter(|line| {
            let name = line.split_whitespace().next().unwrap_or_default();
            let features = line.split_whitespace().nth(2).unwrap_or_default();
            matches!(
                name,
                "vlm-testkit" | "image" | "png" | "zune-jpeg" | "image-webp"
            ) || (name == "hyper" && features.split(',').any(|f| f == "server"))
        })
        .collect();
    if heavy.is_empty() {
        eprintln!(
            "<== the lean vlm (vllm only, no emulate) has no emulator, HTTP server or image decoder"
        );
        Ok(())
    } else {
        Err(format!(
            "vlm-cli without `emulate` still depends on: {}",
            heavy.join("; ")
        ))
    }
}

/// `cargo deny check licenses bans sources` (advisories need the network's RustSec database).
fn deny() -> Result<(), String> {
    let cargo_bin = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let installed = Command::new(&cargo_bin)
        .args(["deny", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        // Enforced, never skipped: install the pinned version (about two minutes, once).
        eprintln!("--- cargo-deny is not installed; installing cargo-deny@{DENY_VERSION}");
        cargo(
            &["install", "--locked", &format!("cargo-deny@{DENY_VERSION}")],
            &[],
        )?;
    }
    cargo(
        &[
            "deny",
            "--all-features",
            "check",
            "licenses",
            "bans",
            "sources",
        ],
        &[],
    )
}

/// The cargo-deny version CI and `cargo xtask ci` install.
const DENY_VERSION: &str = "0.20.2";

/// The publishable crates in dependency order.
const PUBLISHED: [&str; 9] = [
    "vlm-core",
    "vlm-vllm",
    "vlm-lmdeploy",
    "vlm-triton",
    "vlm-ollama",
    "vlm-openai",
    "vlm-testkit",
    "vlm-factory",
    "vlm-cli",
];

fn publish_check() -> Result<(), String> {
    forget_earlier_packages()?;
    // `cargo package --workspace` resolves the workspace's own unpublished crates locally, so
    // each package is built and verified from its .crate file as crates.io would.
    let mut args = vec!["package", "--allow-dirty", "--no-verify"];
    for p in PUBLISHED {
        args.extend(["-p", p]);
    }
    cargo(&args, &[])?;
    let mut args = vec!["package", "--allow-dirty"];
    for p in PUBLISHED {
        args.extend(["-p", p]);
    }
    cargo(&args, &[])
}

/// Cargo unpacks the local registry `cargo package` builds into `$CARGO_HOME/registry/src/-<hash>`
/// and never unpacks a version again, so a second check would verify against the first one's
/// sources. Remove our crates from those local-registry folders (crates.io's are left alone).
fn forget_earlier_packages() -> Result<(), String> {
    let home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cargo")))
        .ok_or("xtask: neither CARGO_HOME nor HOME is set")?;
    let src = home.join("registry").join("src");
    let Ok(registries) = std::fs::read_dir(&src) else {
        return Ok(());
    };
    for registry in registries.flatten() {
        if !registry.file_name().to_string_lossy().starts_with('-') {
            continue;
        }
        for entry in std::fs::read_dir(registry.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if PUBLISHED.iter().any(|p| name.starts_with(&format!("{p}-"))) {
                std::fs::remove_dir_all(entry.path())
                    .map_err(|e| format!("xtask: cannot remove {}: {e}", entry.path().display()))?;
            }
        }
    }
    Ok(())
}
