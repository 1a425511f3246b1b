//! The servers the docs tell users to start: which one, on which port, serving which model.
//! Their start commands cannot run here (no GPU, no model); docs-check reads them instead, so
//! that every page names the same model and port for a server, and the emulators it starts for
//! the `vlm` commands serve exactly that.

use std::collections::BTreeMap;

use super::shell::Command;

/// A server start command, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStart {
    /// vllm, lmdeploy, triton, ollama, sglang, llama-cpp, trtllm-serve or lm-studio.
    pub kind: &'static str,
    /// The port it listens on (the server's default when the command gives none).
    pub port: Option<u16>,
    /// The model as the server will name it, when the command says.
    pub model: Option<String>,
}

/// The `vlm` backend for a server kind.
pub fn backend_of(kind: &str) -> &'static str {
    match kind {
        "vllm" => "vllm",
        "lmdeploy" => "lmdeploy",
        "triton" => "triton",
        "ollama" => "ollama",
        _ => "openai",
    }
}

/// Reads a server start command; `None` when the command starts no server.
pub fn parse_start(cmd: &Command) -> Option<ServerStart> {
    let argv = cmd.argv();
    let word = |i: usize| argv.get(i).map(String::as_str);
    let port = |name: &str, default: u16| {
        cmd.option(name)
            .and_then(|p| p.parse().ok())
            .or(Some(default))
    };
    let named = |flag: &str, positional: Option<&str>| {
        let positional = positional.filter(|p| !p.starts_with('-'));
        cmd.option(flag).or(positional).map(str::to_owned)
    };
    let start = match (word(0)?, word(1), word(2)) {
        ("vllm", Some("serve"), model) => ServerStart {
            kind: "vllm",
            port: port("--port", 8000),
            model: named("--served-model-name", model),
        },
        ("lmdeploy", Some("serve"), Some("api_server")) => ServerStart {
            kind: "lmdeploy",
            port: port("--server-port", 23333),
            model: named("--model-name", word(3)),
        },
        ("python" | "python3", Some(script), _) if script.ends_with("launch_triton_server.py") => {
            ServerStart {
                kind: "triton",
                port: Some(8000),
                model: None,
            }
        }
        ("tritonserver", _, _) => ServerStart {
            kind: "triton",
            port: port("--http-port", 8000),
            model: None,
        },
        ("ollama", Some("serve"), _) => ServerStart {
            kind: "ollama",
            port: ollama_port(cmd),
            model: None,
        },
        ("ollama", Some("pull" | "run"), Some(model)) => ServerStart {
            kind: "ollama",
            port: None,
            model: Some(model.to_owned()),
        },
        ("python" | "python3", Some("-m"), Some("sglang.launch_server")) => ServerStart {
            kind: "sglang",
            port: port("--port", 30000),
            model: named("--served-model-name", cmd.option("--model-path")),
        },
        ("llama-server", _, _) => ServerStart {
            kind: "llama-cpp",
            port: port("--port", 8080),
            model: cmd
                .option("--alias")
                .or(cmd.option("-a"))
                .or(cmd.option("-hf"))
                .or(cmd.option("-m"))
                .map(str::to_owned),
        },
        ("trtllm-serve", model, _) => ServerStart {
            kind: "trtllm-serve",
            port: port("--port", 8000),
            model: model.filter(|m| !m.starts_with('-')).map(str::to_owned),
        },
        ("lms", Some("server"), Some("start")) => ServerStart {
            kind: "lm-studio",
            port: port("--port", 1234),
            model: None,
        },
        ("lms", Some("load"), Some(model)) => ServerStart {
            kind: "lm-studio",
            port: None,
            model: Some(cmd.option("--identifier").unwrap_or(model).to_owned()),
        },
        _ => return None,
    };
    Some(start)
}

fn ollama_port(cmd: &Command) -> Option<u16> {
    match cmd.env_value("OLLAMA_HOST") {
        Some(host) => host.rsplit_once(':').and_then(|(_, p)| p.parse().ok()),
        None => Some(11434),
    }
}

/// What every page says of each server: one model and one port.
#[derive(Debug, Default)]
pub struct ServerTable {
    /// kind -> (port, where first said)
    ports: BTreeMap<&'static str, (u16, String)>,
    /// kind -> (model, where first said)
    models: BTreeMap<&'static str, (String, String)>,
}

impl ServerTable {
    /// Adds a start command read at `place`; an error when it disagrees with an earlier one.
    pub fn add(&mut self, start: &ServerStart, place: &str) -> Result<(), String> {
        if let Some(model) = start.model.as_deref().filter(|m| m.contains('<')) {
            return Err(format!(
                "{place}: `{model}` is a placeholder; name a real model, the one the other pages use"
            ));
        }
        if let Some(port) = start.port {
            let (known, first) = self
                .ports
                .entry(start.kind)
                .or_insert_with(|| (port, place.to_owned()));
            if *known != port {
                return Err(format!(
                    "{place}: {} on port {port}, but {first} starts it on port {known}",
                    start.kind
                ));
            }
        }
        if let Some(model) = &start.model {
            let (known, first) = self
                .models
                .entry(start.kind)
                .or_insert_with(|| (model.clone(), place.to_owned()));
            if known != model {
                return Err(format!(
                    "{place}: {} serves {model}, but {first} has it serve {known}",
                    start.kind
                ));
            }
        }
        Ok(())
    }

    /// The server kind a `vlm` backend meets at `port`, if the docs start one there.
    pub fn kind_at(&self, backend: &str, port: u16) -> Option<&'static str> {
        self.ports
            .iter()
            .find(|(kind, (p, _))| *p == port && backend_of(kind) == backend)
            .map(|(kind, _)| *kind)
    }

    /// The model the docs have `kind` serve.
    pub fn model(&self, kind: &str) -> Option<&str> {
        self.models.get(kind).map(|(m, _)| m.as_str())
    }

    /// The port the docs have `kind` listen on.
    pub fn port(&self, kind: &str) -> Option<u16> {
        self.ports.get(kind).map(|(p, _)| *p)
    }

    /// How many servers the docs start.
    pub fn len(&self) -> usize {
        self.ports.len().max(self.models.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(line: &str) -> ServerStart {
        let cmd = Command::parse(line).unwrap_or_else(|| panic!("no command in {line}"));
        parse_start(&cmd).unwrap_or_else(|| panic!("no server in {line}"))
    }

    #[test]
    fn start_commands_name_port_and_model() {
        let vllm = start("vllm serve Qwen/Qwen2-VL-2B-Instruct --port 8000 --api-key \"$K\"");
        assert_eq!((vllm.kind, vllm.port), ("vllm", Some(8000)));
        assert_eq!(vllm.model.as_deref(), Some("Qwen/Qwen2-VL-2B-Instruct"));
        let lmdeploy = start("lmdeploy serve api_server OpenGVLab/InternVL2-2B");
        assert_eq!(lmdeploy.port, Some(23333));
        let ollama = start("OLLAMA_HOST=0.0.0.0:11500 ollama serve");
        assert_eq!(ollama.port, Some(11500));
        let sglang = start("python -m sglang.launch_server --model-path M --port 30000");
        assert_eq!(
            (sglang.kind, sglang.model.as_deref()),
            ("sglang", Some("M"))
        );
        assert_eq!(start("lms server start").port, Some(1234));
    }

    #[test]
    fn the_table_refuses_a_second_model_or_port() {
        let mut table = ServerTable::default();
        assert!(
            table
                .add(&start("vllm serve A --port 8000"), "a.md:1")
                .is_ok()
        );
        assert!(table.add(&start("vllm serve A"), "b.md:1").is_ok());
        let err = table.add(&start("vllm serve B"), "c.md:2").err();
        assert!(err.is_some_and(|e| e.contains("a.md:1")));
        assert!(
            table
                .add(&start("vllm serve A --port 9000"), "d.md:1")
                .is_err()
        );
        assert!(table.add(&start("trtllm-serve <model>"), "e.md:1").is_err());
        assert_eq!(table.kind_at("vllm", 8000), Some("vllm"));
        assert_eq!(table.kind_at("openai", 8000), None);
    }
}
