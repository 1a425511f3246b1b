//! The emulators docs-check starts in place of the servers the docs name: one `vlm emulate`
//! per documented address (`http://gpu-box:23333`), on 127.0.0.1 and a free port, serving the
//! model the docs have that server serve.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// What to emulate.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Spec {
    /// `--backend`
    pub backend: String,
    /// `--flavor` (openai) or `--triton-model` (triton)
    pub variant: Option<String>,
    /// `--model`
    pub model: Option<String>,
    /// `--api-key`
    pub api_key: Option<String>,
}

impl Spec {
    fn args(&self) -> Vec<String> {
        let mut args = vec![
            "emulate".to_owned(),
            "--backend".to_owned(),
            self.backend.clone(),
        ];
        let mut push = |flag: &str, value: &Option<String>| {
            if let Some(value) = value {
                args.push(flag.to_owned());
                args.push(value.clone());
            }
        };
        let variant_flag = if self.backend == "triton" {
            "--triton-model"
        } else {
            "--flavor"
        };
        push(variant_flag, &self.variant);
        push("--model", &self.model);
        push("--api-key", &self.api_key);
        args
    }
}

/// The running emulators of one page, stopped when dropped.
pub struct Emulators {
    vlm: PathBuf,
    /// (documented origin, spec) -> (child, the emulator's origin, its printed base URL)
    running: BTreeMap<(String, Spec), (Child, String, String)>,
}

impl Emulators {
    /// No emulator yet; `vlm` is the binary that runs them.
    pub fn new(vlm: &Path) -> Self {
        Self {
            vlm: vlm.to_owned(),
            running: BTreeMap::new(),
        }
    }

    /// The emulator standing for `origin` (`http://host:port`), started on first use. Returns
    /// its origin (`http://127.0.0.1:P`) and its base URL as it prints it.
    pub fn origin_for(&mut self, origin: &str, spec: &Spec) -> Result<(String, String), String> {
        let key = (origin.to_owned(), spec.clone());
        if let Some((_, emulated, base)) = self.running.get(&key) {
            return Ok((emulated.clone(), base.clone()));
        }
        let (child, base) = start(&self.vlm, &spec.args())?;
        let emulated = origin_of(&base).unwrap_or_else(|| base.clone());
        self.running
            .insert(key, (child, emulated.clone(), base.clone()));
        Ok((emulated, base))
    }

    /// Pairs (emulated origin, documented origin), to write outputs back in the docs' terms.
    pub fn back_map(&self) -> Vec<(String, String)> {
        self.running
            .iter()
            .map(|((documented, _), (_, emulated, _))| (emulated.clone(), documented.clone()))
            .collect()
    }
}

impl Drop for Emulators {
    fn drop(&mut self) {
        for (child, _, _) in self.running.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `vlm <args>` and waits (at most 20 s) for the first line it prints, the base URL.
pub fn start(vlm: &Path, args: &[String]) -> Result<(Child, String), String> {
    let mut child = Command::new(vlm)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", vlm.display()))?;
    let stdout = child.stdout.take().ok_or("the emulator has no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(line) if line.starts_with("http://127.0.0.1:") => Ok((child, line.trim().to_owned())),
        other => {
            let _ = child.kill();
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            Err(format!(
                "`vlm {}` did not print its URL ({other:?}, {status})",
                args.join(" ")
            ))
        }
    }
}

/// `http://host:port` of a URL (`None` without a port).
pub fn origin_of(url: &str) -> Option<String> {
    let rest = url.strip_prefix("http://")?;
    let end = rest
        .find(['/', ',', ' ', '"', '\'', ')'])
        .unwrap_or(rest.len());
    let host_port = &rest[..end];
    host_port.rsplit_once(':')?.1.parse::<u16>().ok()?;
    Some(format!("http://{host_port}"))
}

/// The port of an origin `http://host:port`.
pub fn port_of(origin: &str) -> Option<u16> {
    origin.rsplit_once(':')?.1.parse().ok()
}

/// Every distinct `http://host:port` in a command line, in order.
pub fn origins_in(text: &str) -> Vec<String> {
    let mut origins: Vec<String> = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("http://") {
        if let Some(origin) = origin_of(&rest[at..])
            && !origins.contains(&origin)
        {
            origins.push(origin);
        }
        rest = &rest[at + "http://".len()..];
    }
    origins
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_found_in_lists_and_flags() {
        assert_eq!(
            origins_in("vlm narrate p --vlm-base-url http://gpu1:8000/v1,http://gpu2:8000/v1 -o x"),
            ["http://gpu1:8000", "http://gpu2:8000"]
        );
        assert_eq!(
            origins_in("VLM_BASE_URL=http://gpu-box:23333/v1 vlm health"),
            ["http://gpu-box:23333"]
        );
        assert!(origins_in("http://example/no-port").is_empty());
        assert_eq!(port_of("http://localhost:11434"), Some(11434));
    }
}
