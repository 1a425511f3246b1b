//! The configuration layers, merged by figment.
//!
//! Each place a value can come from is one named figment provider: a table of a TOML file
//! (`pyproject.toml [tool.imageworks.vlm]`, then the tool's own table, then `--config`), one
//! `VLM_*` environment variable, one override from the command line. figment merges them in that
//! order, later winning, and its [`Metadata`] says which provider a value came from; that is
//! turned back into a [`Source`] for `vlm config`. The per-backend rule is
//! [`Layers::per_backend`] on top: of `vlm_x` and `vlm_<backend>_x`, the value from the later layer wins, and within one
//! layer the backend's own key does.

use std::collections::HashMap;
use std::path::PathBuf;

use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use vlm_core::VlmBackend;

use crate::settings::Source;

/// Where a provider's values come from, and how late its layer is merged.
#[derive(Debug, Clone)]
enum Origin {
    File {
        path: PathBuf,
        table: Option<String>,
    },
    Env {
        var: String,
    },
    Cli {
        flag: String,
    },
}

impl Origin {
    /// Files, then the environment, then the command line.
    fn rank(&self) -> u8 {
        match self {
            Origin::File { .. } => 0,
            Origin::Env { .. } => 1,
            Origin::Cli { .. } => 2,
        }
    }

    fn source(&self, key: &str) -> Source {
        match self {
            Origin::File { path, table } => Source::File {
                path: path.clone(),
                table: table.clone(),
                key: key.to_owned(),
            },
            Origin::Env { var } => Source::Env { var: var.clone() },
            Origin::Cli { flag } => Source::Cli { flag: flag.clone() },
        }
    }
}

/// One named provider: the `vlm_*` values of one place.
struct Named {
    name: String,
    values: Dict,
}

impl Provider for Named {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.values.clone()))
    }
}

/// A value, whether it came as text (environment, command line) or typed (TOML), and where.
#[derive(Debug, Clone)]
pub(crate) struct Found {
    pub(crate) value: Value,
    pub(crate) typed: bool,
    pub(crate) source: Source,
    rank: u8,
}

/// Every layer, merged. Build with [`Layers::file`], [`Layers::env`] and [`Layers::flag`] in
/// merge order (later wins).
pub(crate) struct Layers {
    figment: Figment,
    origins: HashMap<String, Origin>,
}

/// Whether a value counts as set: an empty string (`VLM_MODEL=`) leaves the key to lower
/// layers.
fn is_set(value: &Value) -> bool {
    !matches!(value, Value::String(_, s) if s.trim().is_empty())
}

/// `value` without the tag of the figment it was read with (a TOML file's), so that this
/// figment tags it with the provider it comes from.
fn untagged(value: Value) -> Value {
    Value::serialize(&value).unwrap_or(value)
}

impl Layers {
    pub(crate) fn new() -> Self {
        Layers {
            figment: Figment::new(),
            origins: HashMap::new(),
        }
    }

    fn add(mut self, name: String, origin: Origin, values: Dict) -> Self {
        self.origins.insert(name.clone(), origin);
        let values = values
            .into_iter()
            .filter(|(_, v)| is_set(v))
            .map(|(k, v)| (k, untagged(v)))
            .collect();
        self.figment = self.figment.merge(Named { name, values });
        self
    }

    /// A table of a TOML file (`table: None` for a `--config` file's top level).
    pub(crate) fn file(self, path: PathBuf, table: Option<String>, values: Dict) -> Self {
        let name = match &table {
            Some(t) => format!("{} [{t}]", path.display()),
            None => path.display().to_string(),
        };
        self.add(name, Origin::File { path, table }, values)
    }

    /// One environment variable (`VLM_TIMEOUT`) for its key (`vlm_timeout`).
    pub(crate) fn env(self, var: &str, key: &str, value: &str) -> Self {
        let values = Dict::from([(key.to_owned(), Value::from(value.to_owned()))]);
        let origin = Origin::Env {
            var: var.to_owned(),
        };
        self.add(format!("environment variable {var}"), origin, values)
    }

    /// One value given on the command line (or by an embedding app) as `flag`.
    pub(crate) fn flag(self, flag: &str, key: &str, value: &str) -> Self {
        let values = Dict::from([(key.to_owned(), Value::from(value.to_owned()))]);
        let origin = Origin::Cli {
            flag: flag.to_owned(),
        };
        self.add(format!("{flag} ({key})"), origin, values)
    }

    /// The merged value of `key` and the provider figment took it from.
    fn find(&self, key: &str) -> Option<Found> {
        let value = self.figment.find_value(key).ok()?;
        let metadata = self.figment.find_metadata(key)?;
        let origin = self.origins.get(metadata.name.as_ref())?;
        Some(Found {
            typed: matches!(origin, Origin::File { .. }),
            source: origin.source(key),
            rank: origin.rank(),
            value,
        })
    }

    /// A generic key: the command line > `VLM_X` > the files (later file tables win).
    pub(crate) fn plain(&self, key: &str) -> Option<Found> {
        self.find(key)
    }

    /// `base_url`, `model` or `api_key` of backend `b`: the later layer of `vlm_x` and
    /// `vlm_<b>_x` wins; within one layer, the backend's own key. So: flag > `VLM_B_X` >
    /// `VLM_X` > files' `vlm_B_x` > files' `vlm_x` (and an override of `vlm_B_x` before one of
    /// `vlm_x`).
    pub(crate) fn per_backend(&self, field: &str, b: VlmBackend) -> Option<Found> {
        let generic = self.find(&format!("vlm_{field}"));
        let specific = self.find(&format!("vlm_{b}_{field}"));
        match (generic, specific) {
            (Some(g), Some(s)) if g.rank > s.rank => Some(g),
            (_, Some(s)) => Some(s),
            (g, None) => g,
        }
    }
}
