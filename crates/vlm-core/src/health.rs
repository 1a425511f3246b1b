//! The health model: a state with its reason, not only a bool.

use std::fmt;

use url::Url;

use crate::backend::VlmBackend;
use crate::error::VlmError;
use crate::text::shown_model;

/// Where a server stands.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HealthState {
    /// Live, ready, and serving the configured model.
    Ready,
    /// Up but still starting (e.g. LMDeploy's 503 "initializing", Triton's 503 while loading).
    Starting {
        /// What the server said.
        reason: String,
    },
    /// Answering, but not able to serve the configured model.
    Unhealthy {
        /// Why, and what to do.
        reason: String,
    },
    /// Nothing answered (connection refused, DNS failure, timeout).
    Unreachable {
        /// Why, with the command that starts the server.
        reason: String,
    },
}

impl HealthState {
    /// A short label: `ready`, `starting`, `unhealthy`, `unreachable`.
    pub fn label(&self) -> &'static str {
        match self {
            HealthState::Ready => "ready",
            HealthState::Starting { .. } => "starting",
            HealthState::Unhealthy { .. } => "unhealthy",
            HealthState::Unreachable { .. } => "unreachable",
        }
    }

    /// The reason, if the state is not ready.
    pub fn reason(&self) -> Option<&str> {
        match self {
            HealthState::Ready => None,
            HealthState::Starting { reason }
            | HealthState::Unhealthy { reason }
            | HealthState::Unreachable { reason } => Some(reason),
        }
    }
}

/// One HTTP probe made while checking health.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HealthProbe {
    /// The route, e.g. `GET /health`.
    pub route: String,
    /// The status, or `None` when nothing answered.
    pub status: Option<u16>,
    /// A short note (body summary, error).
    pub note: String,
}

impl HealthProbe {
    /// A probe of `route` (e.g. `GET /health`), its status (`None` when nothing answered) and a
    /// short note.
    pub fn new(route: impl Into<String>, status: Option<u16>, note: impl Into<String>) -> Self {
        HealthProbe {
            route: route.into(),
            status,
            note: note.into(),
        }
    }
}

/// What a health check found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HealthReport {
    /// The backend checked.
    pub backend: VlmBackend,
    /// The base URL checked.
    pub base_url: Url,
    /// The verdict.
    pub state: HealthState,
    /// The model that will be used (configured, or adopted because it is the only one served).
    pub model: Option<String>,
    /// The models the server says it serves, when it said.
    pub served_models: Vec<String>,
    /// The server's version, when it exposes one.
    pub server_version: Option<String>,
    /// How the model takes images, when the server says (Triton: which input, and how many).
    pub image_input: Option<String>,
    /// Each probe made, in order.
    pub probes: Vec<HealthProbe>,
}

impl HealthReport {
    /// A report in the given state with no probes yet.
    pub fn new(backend: VlmBackend, base_url: Url, state: HealthState) -> Self {
        HealthReport {
            backend,
            base_url,
            state,
            model: None,
            served_models: Vec::new(),
            server_version: None,
            image_input: None,
            probes: Vec::new(),
        }
    }

    /// Whether the server is ready to serve the model.
    pub fn is_ready(&self) -> bool {
        self.state == HealthState::Ready
    }
}

impl fmt::Display for HealthReport {
    /// A multi-line, human-readable report.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "backend: {}", self.backend)?;
        writeln!(f, "base url: {}", self.base_url)?;
        writeln!(f, "state: {}", self.state.label())?;
        if let Some(reason) = self.state.reason() {
            writeln!(f, "reason: {reason}")?;
        }
        // Names and versions are the server's choice: shown escaped and capped.
        let model = self
            .model
            .as_deref()
            .map_or("(unknown)".to_owned(), shown_model);
        writeln!(f, "model: {model}")?;
        if !self.served_models.is_empty() {
            let served: Vec<String> = self.served_models.iter().map(|m| shown_model(m)).collect();
            writeln!(f, "served models: {}", served.join(", "))?;
        }
        if let Some(v) = &self.server_version {
            writeln!(f, "server version: {}", shown_model(v))?;
        }
        if let Some(i) = &self.image_input {
            writeln!(f, "image input: {i}")?;
        }
        for p in &self.probes {
            let status = p.status.map_or("-".to_owned(), |s| s.to_string());
            writeln!(f, "  {} -> {} {}", p.route, status, p.note)?;
        }
        Ok(())
    }
}

/// A short note for a probe that failed.
pub fn err_note(err: &VlmError) -> String {
    match err {
        VlmError::Http { message, .. } => message.clone(),
        VlmError::Unreachable { reason, .. } | VlmError::Transport { reason, .. } => reason.clone(),
        VlmError::Timeout { after, .. } => format!("no answer within {:.1} s", after.as_secs_f64()),
        other => other.to_string(),
    }
}

/// The health state a failed probe implies.
pub fn state_for_error(err: &VlmError, what: &str) -> HealthState {
    match err {
        VlmError::Unreachable { .. } | VlmError::Timeout { .. } => HealthState::Unreachable {
            reason: err.to_string(),
        },
        VlmError::Http { status: 503, .. } => HealthState::Starting {
            reason: format!("{what} answered 503: {}", err_note(err)),
        },
        VlmError::Http {
            status: 401 | 403, ..
        } => HealthState::Unhealthy {
            reason: err.to_string(),
        },
        _ => HealthState::Unhealthy {
            reason: format!("{what} failed: {err}"),
        },
    }
}
