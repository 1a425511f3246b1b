//! `VlmSettings`: the key registry, reading each layer (see `layers` for how figment merges
//! them), and checking each value.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Toml};
use figment::value::{Dict, Num, Value};

use crate::layers::Layers;
use vlm_core::support::edit_distance;
use vlm_core::{ApiKey, ClientConfig, Url, VlmBackend, VlmError, normalize_base_url};

/// One configuration key: its name, default and meaning. Every `vlm_x` key is also read from
/// the environment variable `VLM_X`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeySpec {
    /// The key as written in TOML, e.g. `vlm_timeout`.
    pub key: &'static str,
    /// The default, as shown to people (`"(none)"` when there is none).
    pub default: &'static str,
    /// What it means.
    pub doc: &'static str,
}

/// Every generic key. The per-backend keys `vlm_<backend>_base_url`, `vlm_<backend>_model` and
/// `vlm_<backend>_api_key` exist for each backend too (see [`known_keys`]).
pub const KEYS: &[KeySpec] = &[
    KeySpec {
        key: "vlm_backend",
        default: "vllm",
        doc: "the server that hosts the model: vllm, lmdeploy, triton, ollama, openai (any OpenAI-compatible server), or auto (detected from vlm_base_url)",
    },
    KeySpec {
        key: "vlm_base_url",
        default: "(the backend's default)",
        doc: "base URL of the server, e.g. http://localhost:8000/v1; several replicas of one model: a list (a TOML array, or comma-separated in a flag or variable)",
    },
    KeySpec {
        key: "vlm_model",
        default: "(discovered)",
        doc: "model name; when unset, the only model the server serves is used",
    },
    KeySpec {
        key: "vlm_api_key",
        default: "(none)",
        doc: "sent as `Authorization: Bearer <key>`; never logged or printed",
    },
    KeySpec {
        key: "vlm_timeout",
        default: "120",
        doc: "seconds to wait for one inference attempt (a number > 0)",
    },
    KeySpec {
        key: "vlm_connect_timeout",
        default: "5",
        doc: "seconds to wait for a connection (a number > 0); a server that does not accept in time is unreachable",
    },
    KeySpec {
        key: "vlm_health_timeout",
        default: "10",
        doc: "seconds to wait for each health probe (a number > 0)",
    },
    KeySpec {
        key: "vlm_max_retries",
        default: "2",
        doc: "how many times a failed request may be retried (connection errors, 408, 429, 500, 502, 503, 504)",
    },
    KeySpec {
        key: "vlm_retry_timeouts",
        default: "false",
        doc: "whether an inference that timed out is sent again (off: the server may still be generating it)",
    },
    KeySpec {
        key: "vlm_max_tokens",
        default: "300",
        doc: "max_tokens sent with each request",
    },
    KeySpec {
        key: "vlm_temperature",
        default: "0.1",
        doc: "temperature sent with each request (>= 0)",
    },
    KeySpec {
        key: "vlm_max_image_edge",
        default: "(off)",
        doc: "shrink an image whose longer edge is larger than this many pixels before sending it (16 to 16384; JPEG, or PNG with alpha; needs vlm's resize feature)",
    },
    KeySpec {
        key: "vlm_json_retries",
        default: "1",
        doc: "how many times an answer that is not valid JSON for the schema is asked for again (0 to 10)",
    },
    KeySpec {
        key: "vlm_prompt_template",
        default: "(none)",
        doc: "for servers that take a raw prompt (Triton): the text sent, with {prompt} where the prompt goes, e.g. \"<|image|>{prompt}\"",
    },
    KeySpec {
        key: "vlm_max_image_bytes",
        default: "33554432",
        doc: "largest image accepted, in bytes (32 MiB)",
    },
];

/// The fields that have per-backend keys.
const PER_BACKEND: [&str; 3] = ["base_url", "model", "api_key"];

/// Every key this crate knows, generic and per-backend.
pub fn known_keys() -> Vec<String> {
    let mut keys: Vec<String> = KEYS.iter().map(|k| k.key.to_owned()).collect();
    for &backend in VlmBackend::ALL {
        for field in PER_BACKEND {
            keys.push(format!("vlm_{backend}_{field}"));
        }
    }
    keys
}

fn closest_key(key: &str) -> Option<String> {
    known_keys()
        .into_iter()
        .map(|k| (edit_distance(key, &k), k))
        .filter(|(d, _)| *d <= 4)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Source {
    /// The built-in default.
    Default,
    /// Not configured: the model is discovered from the server.
    Discovery,
    /// A TOML file: `pyproject.toml` (with its table) or a `--config` file.
    File {
        /// The file, as given.
        path: PathBuf,
        /// The table within it (`tool.imageworks.color_narrator`), `None` for top level.
        table: Option<String>,
        /// The key read.
        key: String,
    },
    /// An environment variable.
    Env {
        /// Its name, e.g. `VLM_LMDEPLOY_BASE_URL`.
        var: String,
    },
    /// A command-line flag.
    Cli {
        /// The flag, e.g. `--vlm-backend`.
        flag: String,
    },
    /// Detected by probing the server (`vlm_backend = "auto"`).
    Detected {
        /// What was found, e.g. `ollama from GET / ("Ollama is running")`.
        from: String,
    },
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::Discovery => f.write_str("discovered from the server"),
            Source::File {
                path,
                table: Some(table),
                key,
            } => {
                write!(f, "{} [{table}] {key}", path.display())
            }
            Source::File {
                path,
                table: None,
                key,
            } => write!(f, "{} {key}", path.display()),
            Source::Env { var } => f.write_str(var),
            Source::Cli { flag } => f.write_str(flag),
            Source::Detected { from } => write!(f, "auto: {from}"),
        }
    }
}

/// A raw value before it is checked: a string (environment, flags) or a TOML value.
#[derive(Debug, Clone, PartialEq)]
enum Raw {
    Text(String),
    Toml(Value),
}

impl Raw {
    /// The value as text, leniently: `VLM_API_KEY=12345` or `vlm_api_key = 12345` is the
    /// string "12345".
    fn text(&self) -> Option<String> {
        match self {
            Raw::Text(s) => Some(s.clone()),
            Raw::Toml(Value::String(_, s)) => Some(s.clone()),
            Raw::Toml(Value::Char(_, c)) => Some(c.to_string()),
            Raw::Toml(Value::Num(_, n)) => Some(num_text(n)),
            Raw::Toml(Value::Bool(_, b)) => Some(b.to_string()),
            Raw::Toml(_) => None,
        }
    }

    /// The value as the user wrote it (`nan` stays `nan`, a string is quoted).
    fn shown(&self) -> String {
        match self {
            Raw::Text(s) => format!("{s:?}"),
            Raw::Toml(Value::String(_, s)) => format!("{s:?}"),
            Raw::Toml(Value::Array(..)) => "(an array)".to_owned(),
            Raw::Toml(Value::Dict(..)) => "(a table)".to_owned(),
            Raw::Toml(Value::Empty(..)) => "(empty)".to_owned(),
            Raw::Toml(_) => self.text().unwrap_or_default(),
        }
    }
}

/// A TOML number as written: `30`, `0.5`, `nan`, `inf`.
fn num_text(n: &Num) -> String {
    match n.to_actual() {
        figment::error::Actual::Unsigned(u) => u.to_string(),
        figment::error::Actual::Signed(i) => i.to_string(),
        // As TOML spells them (Rust would say "NaN").
        figment::error::Actual::Float(f) if f.is_nan() => "nan".to_owned(),
        figment::error::Actual::Float(f) => f.to_string(),
        other => other.to_string(),
    }
}

fn num_f64(n: &Num) -> f64 {
    match n.to_actual() {
        figment::error::Actual::Unsigned(u) => u as f64,
        figment::error::Actual::Signed(i) => i as f64,
        figment::error::Actual::Float(f) => f,
        _ => f64::NAN,
    }
}

/// A resolved value and its source.
type Found = (Raw, Source);

/// A merged value as `resolve` reads it: typed when it came from TOML, text otherwise.
fn raw(found: crate::layers::Found) -> Found {
    let value = if found.typed {
        Raw::Toml(found.value)
    } else {
        Raw::Text(found.value.as_str().unwrap_or_default().to_owned())
    };
    (value, found.source)
}

fn plain(layers: &Layers, key: &str) -> Option<Found> {
    layers.plain(key).map(raw)
}

fn per_backend(layers: &Layers, field: &str, b: VlmBackend) -> Option<Found> {
    layers.per_backend(field, b).map(raw)
}

/// Reads settings from every layer; see [`VlmSettings::loader`].
#[derive(Clone)]
#[must_use]
pub struct SettingsLoader {
    tool: String,
    cwd: PathBuf,
    env: BTreeMap<String, String>,
    config_file: Option<PathBuf>,
    overrides: BTreeMap<String, (String, String)>,
    /// The backend `auto` detected, and what it was detected from.
    detected: Option<(VlmBackend, String)>,
}

impl std::fmt::Debug for SettingsLoader {
    /// Values of `*_api_key` variables and overrides are shown as `***`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret = |k: &str| k.to_ascii_lowercase().ends_with("_api_key");
        let env: BTreeMap<&str, &str> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), if secret(k) { "***" } else { v.as_str() }))
            .collect();
        let overrides: BTreeMap<&str, &str> = self
            .overrides
            .iter()
            .map(|(k, (v, _))| (k.as_str(), if secret(k) { "***" } else { v.as_str() }))
            .collect();
        f.debug_struct("SettingsLoader")
            .field("tool", &self.tool)
            .field("cwd", &self.cwd)
            .field("env", &env)
            .field("config_file", &self.config_file)
            .field("overrides", &overrides)
            .finish()
    }
}

impl SettingsLoader {
    /// The tool whose table in `pyproject.toml` is read after `[tool.imageworks.vlm]`
    /// (default `color_narrator`).
    pub fn tool(mut self, tool: impl Into<String>) -> Self {
        self.tool = tool.into();
        self
    }

    /// The directory the settings are looked for from (default: the current directory): the
    /// nearest `pyproject.toml` with a `[tool.imageworks]` table, here or in a parent, is read.
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = dir.into();
        self
    }

    /// The environment to read `VLM_*` variables from (default: none, so tests never depend on
    /// the process environment).
    pub fn env<K: Into<String>, V: Into<String>>(
        mut self,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        self.env = vars
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        self
    }

    /// Reads `VLM_*` variables from the process environment (non-UTF-8 values are skipped).
    pub fn process_env(self) -> Self {
        let vars: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| k.to_ascii_uppercase().starts_with("VLM_"))
            .collect();
        self.env(vars)
    }

    /// A TOML file whose top-level `vlm_*` keys override `pyproject.toml`; it must exist.
    pub fn config_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config_file = Some(path.into());
        self
    }

    /// An explicit value from the command line, e.g. `("vlm_backend", "lmdeploy",
    /// "--vlm-backend")`. Overrides win over every other layer.
    pub fn set_override(
        mut self,
        key: &str,
        value: impl Into<String>,
        flag: impl Into<String>,
    ) -> Self {
        self.overrides
            .insert(key.to_ascii_lowercase(), (value.into(), flag.into()));
        self
    }

    /// Reads every layer and resolves the settings.
    pub fn load(self) -> Result<VlmSettings, VlmError> {
        let mut warnings = Vec::new();
        for key in self.overrides.keys() {
            if !known_keys().contains(key) {
                return Err(VlmError::config(format!(
                    "unknown setting {key:?} given as an override"
                )));
            }
        }
        if !self
            .tool
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            || self.tool.is_empty()
        {
            return Err(VlmError::config(format!(
                "invalid tool name {:?} (--tool); use letters, digits, '_' or '-', e.g. color_narrator",
                self.tool
            )));
        }
        // Merged by figment in this order, later winning: the pyproject tables, a --config
        // file, each VLM_* variable, each override.
        let mut layers = Layers::new();
        let pyproject = find_pyproject(&self.cwd);
        if let Some(path) = &pyproject {
            for (table, values) in self.pyproject_tables(path, &mut warnings)? {
                layers = layers.file(shown_path(&self.cwd, path), Some(table), values);
            }
        }
        if let Some(path) = &self.config_file {
            layers = layers.file(path.clone(), None, config_values(path, &mut warnings)?);
        }
        for (var, key, value) in self.env_vars(&mut warnings) {
            layers = layers.env(var, &key, value);
        }
        for (key, (value, flag)) in &self.overrides {
            layers = layers.flag(flag, key, value);
        }
        for w in &warnings {
            tracing::warn!("{w}");
        }
        let (mut settings, auto) = resolve(&layers, self.tool.clone(), self.detected.as_ref())?;
        if auto {
            settings.auto = Some(Box::new(self.clone()));
        }
        settings.warnings = warnings;
        settings.pyproject = pyproject;
        Ok(settings)
    }

    /// The `vlm_*` keys of `[tool.imageworks.vlm]`, then of the tool's own table.
    fn pyproject_tables(
        &self,
        path: &Path,
        warnings: &mut Vec<String>,
    ) -> Result<Vec<(String, Dict)>, VlmError> {
        let mut tables = vec!["tool.imageworks.vlm".to_owned()];
        let own = format!("tool.imageworks.{}", self.tool);
        if !tables.contains(&own) {
            tables.push(own);
        }
        let root = Figment::from(Toml::file_exact(path));
        let mut layers = Vec::new();
        for table in tables {
            let values: Dict = root.focus(&table).extract().map_err(|e| {
                VlmError::config(format!(
                    "cannot read {} [{table}]: {}; fix the TOML or move the file aside",
                    path.display(),
                    toml_error(&e)
                ))
            })?;
            let mut kept = BTreeMap::new();
            for (key, value) in values {
                let lower = key.to_ascii_lowercase();
                if !lower.starts_with("vlm_") {
                    continue; // ImageWorks tool tables hold other keys too.
                }
                if !known_keys().contains(&lower) {
                    warnings.push(unknown_key_message(
                        &key,
                        &format!("pyproject.toml [{table}]"),
                    ));
                    continue;
                }
                kept.insert(lower, value);
            }
            layers.push((table, kept));
        }
        Ok(layers)
    }

    /// The known `VLM_*` variables as (variable, key, value); unknown ones are warned about.
    fn env_vars(&self, warnings: &mut Vec<String>) -> Vec<(&str, String, &str)> {
        let mut out = Vec::new();
        for (var, value) in &self.env {
            let key = var.to_ascii_lowercase();
            if !key.starts_with("vlm_") {
                continue;
            }
            if known_keys().contains(&key) {
                out.push((var.as_str(), key, value.as_str()));
            } else {
                warnings.push(unknown_key_message(var, "the environment"));
            }
        }
        out
    }
}

/// A TOML error without the source lines it quotes: the offending line may hold an API key
/// (an unquoted `vlm_api_key = sk-...` is the commonest mistake). The position stays.
fn toml_error(e: &figment::Error) -> String {
    let quoted = |line: &str| {
        let t = line.trim_start();
        t.starts_with('|')
            || t.split_once('|').is_some_and(|(n, _)| {
                !n.trim().is_empty() && n.trim().chars().all(|c| c.is_ascii_digit())
            })
    };
    e.to_string()
        .lines()
        .filter(|l| !quoted(l))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

fn unknown_key_message(key: &str, place: &str) -> String {
    let upper = key.chars().any(|c| c.is_ascii_uppercase());
    match closest_key(&key.to_ascii_lowercase()) {
        Some(k) if upper => format!(
            "unknown setting {key} in {place} is ignored; did you mean {}?",
            k.to_ascii_uppercase()
        ),
        Some(k) => format!("unknown setting {key} in {place} is ignored; did you mean {k}?"),
        None => format!("unknown setting {key} in {place} is ignored"),
    }
}

/// The `vlm_*` keys of a `--config` file (an unknown `vlm_*` key there is an error).
fn config_values(path: &Path, warnings: &mut Vec<String>) -> Result<Dict, VlmError> {
    if !path.is_file() {
        return Err(VlmError::config(format!(
            "config file {} (--config) does not exist or is not a file; check the path",
            path.display()
        )));
    }
    let values: Dict = Figment::from(Toml::file_exact(path))
        .extract()
        .map_err(|e| {
            VlmError::config(format!(
                "cannot read config file {} (--config): {}",
                path.display(),
                toml_error(&e)
            ))
        })?;
    let mut kept = BTreeMap::new();
    for (key, value) in values {
        let lower = key.to_ascii_lowercase();
        if known_keys().contains(&lower) {
            kept.insert(lower, value);
        } else if lower.starts_with("vlm_") {
            let hint = closest_key(&lower)
                .map(|k| format!("; did you mean {k}?"))
                .unwrap_or_default();
            return Err(VlmError::config(format!(
                "unknown setting {key} in config file {}{hint} (known: {})",
                path.display(),
                KEYS.iter().map(|k| k.key).collect::<Vec<_>>().join(", ")
            )));
        } else {
            warnings.push(format!(
                "config file {}: {key} is not a vlm_* setting and is ignored",
                path.display()
            ));
        }
    }
    Ok(kept)
}

/// The resolved settings: what every client and tool needs, with where each value came from.
///
/// ```
/// use vlm_factory::VlmSettings;
/// use vlm_core::VlmBackend;
///
/// let dir = std::env::temp_dir().join("vlm-settings-doc");
/// std::fs::create_dir_all(&dir).unwrap();
/// std::fs::write(dir.join("pyproject.toml"), r#"
/// [tool.imageworks.color_narrator]
/// vlm_backend = "vllm"
/// vlm_lmdeploy_base_url = "http://gpu:24001/v1"
/// "#).unwrap();
///
/// let settings = VlmSettings::loader()
///     .cwd(&dir)
///     .env([("VLM_TIMEOUT", "30")])
///     .set_override("vlm_backend", "lmdeploy", "--vlm-backend")
///     .load()
///     .unwrap();
/// assert_eq!(settings.backend, VlmBackend::LmDeploy);
/// assert_eq!(settings.base_url.as_str(), "http://gpu:24001/v1/");
/// assert_eq!(settings.timeout.as_secs(), 30);
/// assert_eq!(settings.source("vlm_backend").unwrap().to_string(), "--vlm-backend");
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct VlmSettings {
    /// The tool whose table was read.
    pub tool: String,
    /// The backend (`vlm_backend`).
    pub backend: VlmBackend,
    /// The normalised base URL for that backend (the first of [`base_urls`](Self::base_urls)).
    pub base_url: Url,
    /// Every endpoint, when `vlm_base_url` lists several (a TOML array, or comma-separated);
    /// never empty.
    pub base_urls: Vec<Url>,
    /// The model, `None` to discover it.
    pub model: Option<String>,
    /// The API key; its `Debug` shows `***`.
    pub api_key: Option<ApiKey>,
    /// Per-attempt inference timeout (`vlm_timeout`).
    pub timeout: Duration,
    /// Connect timeout (`vlm_connect_timeout`).
    pub connect_timeout: Duration,
    /// Timeout of each health probe (`vlm_health_timeout`).
    pub health_timeout: Duration,
    /// Retries (`vlm_max_retries`).
    pub max_retries: u32,
    /// Whether timed-out inferences are re-sent (`vlm_retry_timeouts`).
    pub retry_timeouts: bool,
    /// `max_tokens` for requests (`vlm_max_tokens`).
    pub max_tokens: u32,
    /// `temperature` for requests (`vlm_temperature`).
    pub temperature: f64,
    /// Image size limit (`vlm_max_image_bytes`).
    pub max_image_bytes: u64,
    /// The raw-prompt template (`vlm_prompt_template`), for Triton.
    pub prompt_template: Option<String>,
    /// How many times an invalid JSON answer is asked for again (`vlm_json_retries`).
    pub json_retries: u32,
    /// Shrink images whose longer edge is larger (`vlm_max_image_edge`); off when `None`.
    pub max_image_edge: Option<u32>,
    sources: BTreeMap<&'static str, Source>,
    warnings: Vec<String>,
    /// For `vlm_backend = "auto"`: the loader to run again once the backend is detected.
    auto: Option<Box<SettingsLoader>>,
    /// The `pyproject.toml` read, if any.
    pyproject: Option<PathBuf>,
}

impl VlmSettings {
    /// Starts loading settings: tool `color_narrator`, the current directory, no environment,
    /// no config file, no overrides.
    pub fn loader() -> SettingsLoader {
        SettingsLoader {
            tool: "color_narrator".to_owned(),
            cwd: PathBuf::from("."),
            env: BTreeMap::new(),
            config_file: None,
            overrides: BTreeMap::new(),
            detected: None,
        }
    }

    /// The `pyproject.toml` read (the nearest with a `[tool.imageworks]` table, in the working
    /// directory or a parent), or `None` when there is none.
    pub fn pyproject(&self) -> Option<&Path> {
        self.pyproject.as_deref()
    }

    /// Where the resolved value of a generic key (`vlm_base_url`, `vlm_timeout`, ...) came from.
    pub fn source(&self, key: &str) -> Option<&Source> {
        self.sources.get(key)
    }

    /// Whether the backend is still to be detected (`vlm_backend = "auto"`): then
    /// [`resolve_backend`](crate::resolve_backend) probes the server before a client is built.
    /// Until then `backend` is a placeholder.
    pub fn is_auto(&self) -> bool {
        self.auto.is_some()
    }

    /// For `auto`: the settings as if `backend` had been named, with where it was found.
    pub(crate) fn redo_detected(
        &self,
        backend: VlmBackend,
        from: String,
    ) -> Option<Result<VlmSettings, VlmError>> {
        let mut loader = (**self.auto.as_ref()?).clone();
        loader.detected = Some((backend, from));
        Some(loader.load())
    }

    /// Warnings found while loading (unknown keys), also logged at warn.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Every resolved setting as `(key, value, source)`, the API key redacted as `***`; what
    /// `vlm config` prints.
    pub fn entries(&self) -> Vec<(&'static str, String, String)> {
        // Each key is named once: its source is looked up from the same name.
        let row = |key: &'static str, value: String| {
            let source = self
                .sources
                .get(key)
                .map_or_else(|| "default".to_owned(), ToString::to_string);
            (key, value, source)
        };
        let secs = |d: Duration| {
            let s = d.as_secs_f64();
            if s.fract() == 0.0 {
                format!("{s:.0}")
            } else {
                s.to_string()
            }
        };
        let api_key = if self.api_key.is_some() {
            "***"
        } else {
            "(none)"
        };
        vec![
            row(
                "vlm_backend",
                if self.is_auto() {
                    "auto".to_owned()
                } else {
                    self.backend.to_string()
                },
            ),
            row(
                "vlm_base_url",
                self.base_urls
                    .iter()
                    .map(Url::as_str)
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            row(
                "vlm_model",
                self.model
                    .clone()
                    .unwrap_or_else(|| "(discover)".to_owned()),
            ),
            row("vlm_api_key", api_key.to_owned()),
            row("vlm_timeout", secs(self.timeout)),
            row("vlm_connect_timeout", secs(self.connect_timeout)),
            row("vlm_health_timeout", secs(self.health_timeout)),
            row("vlm_max_retries", self.max_retries.to_string()),
            row("vlm_retry_timeouts", self.retry_timeouts.to_string()),
            row("vlm_max_tokens", self.max_tokens.to_string()),
            row("vlm_temperature", self.temperature.to_string()),
            row("vlm_max_image_bytes", self.max_image_bytes.to_string()),
            row("vlm_json_retries", self.json_retries.to_string()),
            row(
                "vlm_max_image_edge",
                self.max_image_edge
                    .map_or_else(|| "(off)".to_owned(), |e| e.to_string()),
            ),
            row(
                "vlm_prompt_template",
                self.prompt_template
                    .clone()
                    .unwrap_or_else(|| "(none)".to_owned()),
            ),
        ]
    }

    /// The client configuration these settings describe (for the first endpoint).
    pub fn client_config(&self) -> Result<ClientConfig, VlmError> {
        self.client_config_for(&self.base_url)
    }

    /// One client configuration per endpoint, in the order listed.
    pub fn client_configs(&self) -> Result<Vec<ClientConfig>, VlmError> {
        self.base_urls
            .iter()
            .map(|url| self.client_config_for(url))
            .collect()
    }

    fn client_config_for(&self, base_url: &Url) -> Result<ClientConfig, VlmError> {
        let mut config = ClientConfig::new(self.backend, base_url.as_str())?
            .with_timeout(self.timeout)
            .with_connect_timeout(self.connect_timeout)
            .with_health_timeout(self.health_timeout)
            .with_max_retries(self.max_retries)
            .with_retry_timeouts(self.retry_timeouts)
            .with_max_image_bytes(self.max_image_bytes);
        if let Some(template) = &self.prompt_template {
            config = config.with_prompt_template(template.clone());
        }
        if let Some(edge) = self.max_image_edge {
            config = config.with_max_image_edge(edge);
        }
        if let Some(model) = &self.model {
            config = config.with_model(model.clone());
        }
        if let Some(key) = &self.api_key {
            config = config.with_api_key(key.expose());
        }
        Ok(config)
    }
}

fn invalid(key: &str, raw: &Raw, source: &Source, expected: &str) -> VlmError {
    VlmError::config(format!(
        "invalid {key} {} (from {source}): expected {expected}",
        raw.shown()
    ))
}

fn number(raw: &Raw) -> Option<f64> {
    match raw {
        Raw::Toml(Value::Num(_, n)) => Some(num_f64(n)),
        other => other.text()?.trim().parse::<f64>().ok(),
    }
}

/// The `pyproject.toml` settings are read from: the nearest one, in `cwd` or a parent, that has
/// a `[tool.imageworks]` table (as ruff looks for the nearest with `[tool.ruff]`), so a run from a
/// project's subfolder finds the project's settings and a sub-package's own pyproject without
/// ImageWorks settings is passed over. A file that cannot be read is taken as the one (its error
/// is then reported), not silently skipped.
pub fn find_pyproject(cwd: &Path) -> Option<PathBuf> {
    let cwd = std::path::absolute(cwd).unwrap_or_else(|_| cwd.to_path_buf());
    cwd.ancestors()
        .map(|dir| dir.join("pyproject.toml"))
        .filter(|path| path.is_file())
        .find(|path| match std::fs::read_to_string(path) {
            Ok(text) => text.contains("[tool.imageworks") || text.contains("tool.imageworks."),
            Err(_) => true,
        })
}

/// The file as sources name it: `pyproject.toml` when it is in `cwd`, else its whole path.
fn shown_path(cwd: &Path, found: &Path) -> PathBuf {
    let here = std::path::absolute(cwd).map(|d| d.join("pyproject.toml"));
    if here.is_ok_and(|h| h == found) {
        PathBuf::from("pyproject.toml")
    } else {
        found.to_path_buf()
    }
}

/// `vlm_base_url` as one URL or several: a TOML array, or comma-separated text (a flag, a
/// variable, a TOML string). Each is normalised; an empty or repeated entry is an error.
fn base_url_list(backend: VlmBackend, raw: &Raw, source: &Source) -> Result<Vec<Url>, VlmError> {
    let items: Vec<String> = match raw {
        Raw::Toml(Value::Array(_, items)) => items
            .iter()
            .map(|item| Raw::Toml(item.clone()).text())
            .collect::<Option<Vec<String>>>()
            .ok_or_else(|| invalid("vlm_base_url", raw, source, "a URL or a list of URLs"))?,
        other => other
            .text()
            .ok_or_else(|| invalid("vlm_base_url", raw, source, "a URL or a list of URLs"))?
            .split(',')
            .map(str::to_owned)
            .collect(),
    };
    let mut urls: Vec<Url> = Vec::with_capacity(items.len());
    for item in &items {
        let text = item.trim();
        if text.is_empty() {
            return Err(VlmError::config(format!(
                "invalid vlm_base_url {} (from {source}): an empty entry; give URLs separated by \
                 commas, e.g. http://gpu1:8000/v1,http://gpu2:8000/v1",
                raw.shown()
            )));
        }
        let url = normalize_base_url(backend, text)
            .map_err(|e| VlmError::config(format!("invalid vlm_base_url (from {source}): {e}")))?;
        if urls.contains(&url) {
            return Err(VlmError::config(format!(
                "vlm_base_url (from {source}) names {url} twice; list each endpoint once"
            )));
        }
        urls.push(url);
    }
    Ok(urls)
}

/// The longest timeout accepted: 7 days.
const MAX_SECONDS: f64 = 86_400.0 * 7.0;

/// The backend chosen: named, detected, or still to be detected (`auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Choice {
    Named(VlmBackend),
    Auto,
}

fn choose_backend(
    layers: &Layers,
    detected: Option<&(VlmBackend, String)>,
    sources: &mut BTreeMap<&'static str, Source>,
) -> Result<Choice, VlmError> {
    if let Some((backend, from)) = detected {
        sources.insert("vlm_backend", Source::Detected { from: from.clone() });
        return Ok(Choice::Named(*backend));
    }
    let Some((raw, source)) = plain(layers, "vlm_backend") else {
        return Ok(Choice::Named(VlmBackend::default()));
    };
    let text = raw
        .text()
        .ok_or_else(|| invalid("vlm_backend", &raw, &source, "a string"))?;
    let choice = if text.trim().eq_ignore_ascii_case("auto") {
        Choice::Auto
    } else {
        let backend = text.parse::<VlmBackend>().map_err(|_| {
            VlmError::config(format!(
                "{} (or \"auto\" to detect it)",
                VlmError::unknown_backend(&text, Some(&source.to_string()))
            ))
        })?;
        Choice::Named(backend)
    };
    sources.insert("vlm_backend", source);
    Ok(choice)
}

/// `vlm_x`, or for a named backend B the six-step rule over `vlm_B_x` and `vlm_x`. While the
/// backend is still to be detected only the generic key counts.
fn for_backend(layers: &Layers, field: &str, choice: Choice) -> Option<Found> {
    match choice {
        Choice::Named(b) => per_backend(layers, field, b),
        Choice::Auto => plain(layers, &format!("vlm_{field}")),
    }
}

/// The settings, and whether the backend is still to be detected (`auto`).
fn resolve(
    layers: &Layers,
    tool: String,
    detected: Option<&(VlmBackend, String)>,
) -> Result<(VlmSettings, bool), VlmError> {
    let mut sources: BTreeMap<&'static str, Source> = BTreeMap::new();

    let choice = choose_backend(layers, detected, &mut sources)?;
    // While `auto` waits for detection, the generic URL is read as any OpenAI-style one.
    let backend = match choice {
        Choice::Named(b) => b,
        Choice::Auto => VlmBackend::OpenAi,
    };

    let base_urls = match for_backend(layers, "base_url", choice) {
        Some((raw, source)) => {
            let urls = base_url_list(backend, &raw, &source)?;
            sources.insert("vlm_base_url", source);
            urls
        }
        None if choice == Choice::Auto => {
            return Err(VlmError::config(
                "vlm_backend = \"auto\" needs the URL to probe: set --vlm-base-url, VLM_BASE_URL \
                 or vlm_base_url (e.g. http://gpu-box:8000/v1)",
            ));
        }
        None => match backend.default_base_url() {
            Some(url) => vec![normalize_base_url(backend, url)?],
            None => return Err(vlm_core::no_default_url(backend)),
        },
    };
    let base_url = base_urls[0].clone();

    let model = match for_backend(layers, "model", choice) {
        Some((raw, source)) => {
            let text = raw
                .text()
                .ok_or_else(|| invalid("vlm_model", &raw, &source, "a model name"))?;
            sources.insert("vlm_model", source);
            Some(text.trim().to_owned())
        }
        None => {
            sources.insert("vlm_model", Source::Discovery);
            None
        }
    };

    let api_key = match for_backend(layers, "api_key", choice) {
        Some((raw, source)) => {
            // Never echo the key's value in an error.
            let text = raw.text().ok_or_else(|| {
                VlmError::config(format!(
                    "invalid vlm_api_key (from {source}): expected a string"
                ))
            })?;
            sources.insert("vlm_api_key", source);
            Some(ApiKey::new(text))
        }
        None => None,
    };

    let mut seconds = |key: &'static str, default: Duration| -> Result<Duration, VlmError> {
        let Some((raw, source)) = plain(layers, key) else {
            return Ok(default);
        };
        let secs = number(&raw)
            .filter(|s| s.is_finite() && *s > 0.0 && *s <= MAX_SECONDS)
            .ok_or_else(|| {
                invalid(
                    key,
                    &raw,
                    &source,
                    "seconds as a number > 0 and at most 604800 (7 days), e.g. 120",
                )
            })?;
        sources.insert(key, source);
        Ok(Duration::from_secs_f64(secs))
    };
    let timeout = seconds("vlm_timeout", ClientConfig::DEFAULT_TIMEOUT)?;
    let connect_timeout = seconds("vlm_connect_timeout", ClientConfig::DEFAULT_CONNECT_TIMEOUT)?;
    let health_timeout = seconds("vlm_health_timeout", ClientConfig::DEFAULT_HEALTH_TIMEOUT)?;

    let mut whole =
        |key: &'static str, default: u64, min: u64, max: u64| -> Result<u64, VlmError> {
            let Some((raw, source)) = plain(layers, key) else {
                return Ok(default);
            };
            let n = number(&raw)
                .filter(|n| n.fract() == 0.0 && *n >= min as f64 && *n <= max as f64)
                .ok_or_else(|| {
                    invalid(
                        key,
                        &raw,
                        &source,
                        &format!("a whole number from {min} to {max}"),
                    )
                })?;
            sources.insert(key, source);
            Ok(n as u64)
        };
    let max_retries = whole(
        "vlm_max_retries",
        u64::from(ClientConfig::DEFAULT_MAX_RETRIES),
        0,
        100,
    )? as u32;
    let max_tokens = whole("vlm_max_tokens", 300, 1, u64::from(u32::MAX))? as u32;
    let json_retries = whole("vlm_json_retries", 1, 0, 10)? as u32;
    let max_image_edge = match plain(layers, "vlm_max_image_edge") {
        Some(_) => Some(whole("vlm_max_image_edge", 0, 16, 16384)? as u32),
        None => None,
    };
    let max_image_bytes = whole(
        "vlm_max_image_bytes",
        ClientConfig::DEFAULT_MAX_IMAGE_BYTES,
        1,
        1 << 40,
    )?;

    let retry_timeouts = match plain(layers, "vlm_retry_timeouts") {
        Some((raw, source)) => {
            let on = match &raw {
                Raw::Toml(Value::Bool(_, b)) => Some(*b),
                other => match other
                    .text()
                    .unwrap_or_default()
                    .trim()
                    .to_ascii_lowercase()
                    .as_str()
                {
                    "true" | "1" | "yes" | "on" => Some(true),
                    "false" | "0" | "no" | "off" => Some(false),
                    _ => None,
                },
            }
            .ok_or_else(|| invalid("vlm_retry_timeouts", &raw, &source, "true or false"))?;
            sources.insert("vlm_retry_timeouts", source);
            on
        }
        None => false,
    };

    let temperature = match plain(layers, "vlm_temperature") {
        Some((raw, source)) => {
            let t = number(&raw)
                .filter(|t| t.is_finite() && *t >= 0.0)
                .ok_or_else(|| {
                    invalid("vlm_temperature", &raw, &source, "a number >= 0, e.g. 0.1")
                })?;
            sources.insert("vlm_temperature", source);
            t
        }
        None => 0.1,
    };

    let prompt_template = match plain(layers, "vlm_prompt_template") {
        Some((raw, source)) => {
            let text = raw
                .text()
                .ok_or_else(|| invalid("vlm_prompt_template", &raw, &source, "a string"))?;
            if !text.contains("{prompt}") {
                return Err(invalid(
                    "vlm_prompt_template",
                    &raw,
                    &source,
                    "a text with {prompt} where the prompt goes, e.g. \"<|image|>{prompt}\"",
                ));
            }
            sources.insert("vlm_prompt_template", source);
            Some(text)
        }
        None => None,
    };

    let settings = VlmSettings {
        tool,
        backend,
        base_url,
        base_urls,
        model,
        api_key,
        timeout,
        connect_timeout,
        health_timeout,
        max_retries,
        retry_timeouts,
        max_tokens,
        temperature,
        max_image_bytes,
        json_retries,
        max_image_edge,
        prompt_template,
        sources,
        warnings: Vec::new(),
        auto: None,
        pyproject: None,
    };
    Ok((settings, choice == Choice::Auto))
}
