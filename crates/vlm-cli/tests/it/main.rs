//! End-to-end tests of the `vlm` binary against the testkit emulators (one test binary).
// Builds with only some backends (`cargo xtask matrix`) compile fewer tests, leaving helpers idle.
#![cfg_attr(
    not(all(feature = "vllm", feature = "lmdeploy", feature = "triton")),
    allow(unused_imports, dead_code)
)]

mod batch;
mod hostile;
mod narrate;
mod reliability;
mod scale;
mod servers;
mod settings;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

/// The built `vlm`, with no `VLM_*` variables inherited from the test's environment.
pub fn vlm(cwd: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vlm"));
    cmd.current_dir(cwd);
    for (key, _) in std::env::vars_os() {
        if key
            .to_string_lossy()
            .to_ascii_uppercase()
            .starts_with("VLM_")
        {
            cmd.env_remove(key);
        }
    }
    cmd.env_remove("RUST_LOG").env("NO_COLOR", "1");
    cmd
}

/// `vlm narrate images --vlm-base-url URL` in `dir`, then `extra`.
pub fn narrate_in(dir: &Path, base_url: &str, extra: &[&str]) -> Command {
    let mut cmd = vlm(dir);
    cmd.args(["narrate", "images", "--vlm-base-url", base_url])
        .args(extra);
    cmd
}

/// A vLLM emulator with its default model.
pub async fn vllm_emulator() -> vlm_testkit::Emulator {
    vlm_testkit::Emulator::start(vlm_testkit::EmulatorConfig::new(vlm_core::VlmBackend::Vllm))
        .await
        .unwrap()
}

/// Runs the command off the async runtime's threads (the emulators live there).
pub async fn run(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn records(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect()
}

pub fn samples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/samples")
}

/// A fresh directory holding copies of the sample images under `images/`.
pub fn workdir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vlm-cli-it-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("images")).unwrap();
    for entry in std::fs::read_dir(samples()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join("images").join(entry.file_name())).unwrap();
    }
    dir
}

pub fn sha256_prefix(path: &Path) -> String {
    vlm_testkit::analysis::sha256_prefix(&std::fs::read(path).unwrap())
}
