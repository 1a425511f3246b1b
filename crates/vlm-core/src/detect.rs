//! `vlm_backend = "auto"`: which server answers at a URL, from a few GETs asked once.
//!
//! The routes are fetched together (each bounded by a short timeout), then each backend's rule
//! looks at the answers, in this order: Triton (`GET /v2` names triton), Ollama (`GET /` says
//! "Ollama is running", or `GET /api/version` answers), vLLM (`/v1/models` entries owned by
//! `vllm`), LMDeploy (owned by `lmdeploy`, or `GET /health` answers its `{"status":...}`),
//! otherwise any OpenAI-compatible server (`/v1/models` answers). The rules live here, beside
//! [`VlmBackend`], so that a server whose client is not compiled in is still recognised (and
//! then refused with `BackendNotCompiled`, as an explicit choice would be).

use std::fmt;
use std::time::Duration;

use serde_json::Value;

use crate::backend::VlmBackend;
use crate::config::ClientConfig;
use crate::error::VlmError;
use crate::text::ServerText;
use crate::transport::{Auth, Budget, RawResponse, Transport};

/// What detection found, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Detection {
    /// The backend that answers.
    pub backend: VlmBackend,
    /// The route whose answer decided it, e.g. `GET /api/version`.
    pub route: String,
    /// What in that answer decided it, e.g. `version 0.6.2`.
    pub evidence: String,
}

impl fmt::Display for Detection {
    /// `ollama from GET /api/version (version 0.6.2)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} from {} ({})",
            self.backend, self.route, self.evidence
        )
    }
}

/// The answers of the probed routes (a failed probe is absent).
struct Answers {
    v2: Option<RawResponse>,
    root: Option<RawResponse>,
    api_version: Option<RawResponse>,
    health: Option<RawResponse>,
    models: Option<RawResponse>,
    clean: ServerText,
}

fn json(resp: &Option<RawResponse>) -> Option<Value> {
    resp.as_ref()
        .filter(|r| r.is_success())
        .and_then(|r| serde_json::from_slice(&r.body).ok())
}

fn found(backend: VlmBackend, route: &str, evidence: String) -> Option<Detection> {
    Some(Detection {
        backend,
        route: route.to_owned(),
        evidence,
    })
}

impl Answers {
    fn route(resp: &Option<RawResponse>) -> String {
        resp.as_ref()
            .map_or_else(String::new, |r| format!("GET {}", r.url.path()))
    }

    /// Who owns the models `/v1/models` lists (`vllm`, `lmdeploy`, `library`, `sglang`, ...).
    fn owners(&self) -> Vec<String> {
        json(&self.models)
            .and_then(|v| v.get("data").and_then(Value::as_array).cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|m| m.get("owned_by").and_then(Value::as_str).map(str::to_owned))
            .collect()
    }

    fn triton(&self) -> Option<Detection> {
        let v2 = json(&self.v2)?;
        let name = v2.get("name")?.as_str()?;
        if !name.to_ascii_lowercase().contains("triton") {
            return None;
        }
        let version = v2.get("version").and_then(Value::as_str).unwrap_or("?");
        found(
            VlmBackend::Triton,
            &Self::route(&self.v2),
            self.clean
                .clean(&format!("name {name:?}, version {version}"), 200),
        )
    }

    fn ollama(&self) -> Option<Detection> {
        if let Some(root) = self.root.as_ref().filter(|r| r.is_success())
            && String::from_utf8_lossy(&root.body).starts_with("Ollama is running")
        {
            return found(
                VlmBackend::Ollama,
                &Self::route(&self.root),
                "\"Ollama is running\"".to_owned(),
            );
        }
        let version = json(&self.api_version)?;
        let version = version.get("version")?.as_str()?;
        found(
            VlmBackend::Ollama,
            &Self::route(&self.api_version),
            self.clean.clean(&format!("version {version}"), 200),
        )
    }

    fn owned_by(&self, backend: VlmBackend, owner: &str) -> Option<Detection> {
        self.owners().iter().any(|o| o == owner).then(|| Detection {
            backend,
            route: Self::route(&self.models),
            evidence: format!("models owned_by {owner:?}"),
        })
    }

    fn lmdeploy(&self) -> Option<Detection> {
        if let Some(d) = self.owned_by(VlmBackend::LmDeploy, "lmdeploy") {
            return Some(d);
        }
        // LMDeploy >= 0.14: `{"status":"healthy","message":""}` (no other server answers so).
        let health = json(&self.health)?;
        let status = health.get("status")?.as_str()?;
        health.get("message")?;
        found(
            VlmBackend::LmDeploy,
            &Self::route(&self.health),
            self.clean
                .clean(&format!("status {status:?} with a message"), 200),
        )
    }

    fn openai(&self) -> Option<Detection> {
        json(&self.models)?.get("data")?;
        let owners = self.owners();
        let evidence = match owners.first() {
            Some(owner) => format!("an OpenAI model list, owned_by {owner:?}"),
            None => "an OpenAI model list".to_owned(),
        };
        found(
            VlmBackend::OpenAi,
            &Self::route(&self.models),
            self.clean.clean(&evidence, 200),
        )
    }

    /// The first rule that matches, in the documented order.
    fn decide(&self) -> Option<Detection> {
        self.triton()
            .or_else(|| self.ollama())
            .or_else(|| self.owned_by(VlmBackend::Vllm, "vllm"))
            .or_else(|| self.lmdeploy())
            .or_else(|| self.openai())
    }
}

/// The longest wait for each detection probe: detection is brief.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Probes `config`'s base URL once (`GET /v2`, `/`, `/api/version`, `/health` on the server
/// root and `GET <base>/models` with the key) and says which backend answers there.
///
/// An address where nothing answers is [`VlmError::Unreachable`]; one that answers but matches
/// no rule is a configuration error asking to name the backend.
///
/// ```no_run
/// use vlm_core::{ClientConfig, VlmBackend};
///
/// # async fn run() -> Result<(), vlm_core::VlmError> {
/// let config = ClientConfig::new(VlmBackend::OpenAi, "http://gpu-box:11434")?;
/// let found = vlm_core::detect_backend(&config).await?;
/// println!("detected: {found}"); // ollama from GET / ("Ollama is running")
/// # Ok(()) }
/// ```
pub async fn detect_backend(config: &ClientConfig) -> Result<Detection, VlmError> {
    let mut config = config.clone();
    config.backend = VlmBackend::OpenAi;
    config.health_timeout = config.health_timeout.min(PROBE_TIMEOUT);
    let transport = Transport::new(&config)?;
    let get_root = |path: &'static str| {
        let url = transport.root_endpoint(path);
        let transport = &transport;
        async move { transport.get(&url, Auth::None, Budget::Health).await }
    };
    let models_url = transport.endpoint("models");
    let (v2, root, api_version, health, models) = futures_util::future::join5(
        get_root("v2"),
        get_root(""),
        get_root("api/version"),
        get_root("health"),
        transport.get(&models_url, Auth::Bearer, Budget::Health),
    )
    .await;
    let answered = [&v2, &root, &api_version, &health, &models]
        .iter()
        .any(|r| r.is_ok());
    if !answered {
        // Nothing answered: say why, from the model list's attempt.
        return Err(models
            .err()
            .unwrap_or_else(|| VlmError::config("nothing answered")));
    }
    let answers = Answers {
        v2: v2.ok(),
        root: root.ok(),
        api_version: api_version.ok(),
        health: health.ok(),
        models: models.ok(),
        clean: transport.server_text().clone(),
    };
    if let Some(found) = answers.decide() {
        return Ok(found);
    }
    // A server that answers 503 everywhere is still starting (llama.cpp loading its model):
    // retryable, so `--wait` can ride it out.
    let starting = [
        &answers.models,
        &answers.health,
        &answers.root,
        &answers.v2,
        &answers.api_version,
    ]
    .into_iter()
    .flatten()
    .find(|r| r.status == 503);
    if let Some(resp) = starting {
        return Err(transport.http_error(resp));
    }
    Err({
        VlmError::config(format!(
            "vlm_backend = \"auto\" found no VLM server it knows at {}: no Triton /v2, no Ollama \
             banner, no OpenAI model list at {models_url}; name the backend with --vlm-backend \
             (vllm, lmdeploy, triton, ollama or openai) or check the URL",
            transport.base_url()
        ))
    })
}
