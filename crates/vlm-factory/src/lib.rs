//! # vlm-factory
//!
//! Chooses and builds an ImageWorks VLM client from configuration.
//!
//! [`VlmSettings`] is loaded with figment from, later winning: built-in defaults →
//! `pyproject.toml` (`[tool.imageworks.vlm]`, then the tool's own table such as
//! `[tool.imageworks.color_narrator]`) → an optional `--config` file (same keys, top level) →
//! `VLM_*` environment variables → explicit overrides from the command line. The base URL, model
//! and API key of the chosen backend B are resolved by the first found of: the CLI flag;
//! `VLM_B_X`; `VLM_X`; the files' `vlm_B_x`; the files' `vlm_x`; B's default (for the model,
//! discovery; for the key, none). So `--vlm-backend lmdeploy` alone switches to LMDeploy's URL
//! and model as configured.
//!
//! [`build_client`] maps the settings to the backend's client. Backends are cargo features
//! (`vllm` default, `lmdeploy`, `triton`, `all`); [`VlmBackend`] always knows every backend, so
//! one that is valid but not compiled in is a [`VlmError::BackendNotCompiled`] naming the
//! feature, never "unknown backend".
//!
//! ```no_run
//! use vlm_factory::{VlmSettings, build_client};
//!
//! # async fn run() -> Result<(), vlm_core::VlmError> {
//! let settings = VlmSettings::loader()
//!     .tool("color_narrator")
//!     .process_env()
//!     .set_override("vlm_backend", "lmdeploy", "--vlm-backend")
//!     .load()?;
//! let client = build_client(&settings)?;
//! let report = client.health().await?;
//! println!("🤖 VLM: {}/{}", client.backend(), client.model().unwrap_or("?"));
//! # let _ = report; Ok(()) }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod layers;
mod settings;

use std::sync::Arc;

pub use settings::{
    KEYS, KeySpec, SettingsLoader, Source, VlmSettings, find_pyproject, known_keys,
};
pub use vlm_core::{ReplicaOptions, Replicas, VlmBackend, VlmClient, VlmError};

/// The backends compiled into this build.
///
/// ```
/// let compiled = vlm_factory::compiled_backends();
/// assert_eq!(compiled.contains(&vlm_core::VlmBackend::Vllm), cfg!(feature = "vllm"));
/// ```
pub fn compiled_backends() -> Vec<VlmBackend> {
    VlmBackend::ALL
        .iter()
        .copied()
        .filter(|b| is_compiled(*b))
        .collect()
}

/// Whether `backend`'s client is compiled into this build.
pub fn is_compiled(backend: VlmBackend) -> bool {
    // One arm per backend, each naming its feature: clearer than one long `matches!`.
    #[allow(clippy::match_like_matches_macro)]
    match backend {
        VlmBackend::Vllm => cfg!(feature = "vllm"),
        VlmBackend::LmDeploy => cfg!(feature = "lmdeploy"),
        VlmBackend::Triton => cfg!(feature = "triton"),
        VlmBackend::Ollama => cfg!(feature = "ollama"),
        VlmBackend::OpenAi => cfg!(feature = "openai"),
        // A backend added to the enum before its client is wired in here.
        _ => false,
    }
}

/// Builds the client the settings describe. Nothing is sent to the server yet. With several
/// endpoints (`vlm_base_url` a list) it is a [`Replicas`] over one client each, with the default
/// [`ReplicaOptions`]; [`build_replicas`] chooses the options.
///
/// ```
/// use vlm_factory::{VlmSettings, build_client};
///
/// let settings = VlmSettings::loader()
///     .set_override("vlm_base_url", "http://127.0.0.1:8000/v1", "--vlm-base-url")
///     .load()
///     .unwrap();
/// match build_client(&settings) {
///     Ok(client) => assert_eq!(client.backend().to_string(), "vllm"),
///     // Built without the `vllm` feature:
///     Err(e) => assert!(e.to_string().contains("--features vllm")),
/// }
/// ```
pub fn build_client(settings: &VlmSettings) -> Result<Arc<dyn VlmClient>, VlmError> {
    if settings.base_urls.len() > 1 {
        return Ok(Arc::new(build_replicas(
            settings,
            replica_options(settings),
        )?));
    }
    build_one(settings, settings.client_config()?)
}

/// The replica options the settings imply: a request that may have run is sent to another
/// endpoint only under `vlm_retry_timeouts`.
pub fn replica_options(settings: &VlmSettings) -> ReplicaOptions {
    ReplicaOptions::default().resend_may_have_run(settings.retry_timeouts)
}

/// One client per endpoint of the settings (one or several), behind one [`Replicas`]: requests
/// go to the ready endpoint with the fewest in flight, failed endpoints leave the rotation and
/// are probed back, an outage is waited out up to `options.outage_wait`.
///
/// ```
/// use vlm_factory::{VlmSettings, build_replicas, replica_options};
///
/// let settings = VlmSettings::loader()
///     .set_override("vlm_base_url", "http://gpu1:8000/v1,http://gpu2:8000/v1", "--vlm-base-url")
///     .load()
///     .unwrap();
/// assert_eq!(settings.base_urls.len(), 2);
/// if let Ok(replicas) = build_replicas(&settings, replica_options(&settings).adaptive(64)) {
///     assert_eq!(replicas.clients().count(), 2);
/// }
/// ```
pub fn build_replicas(
    settings: &VlmSettings,
    options: ReplicaOptions,
) -> Result<Replicas, VlmError> {
    let clients = settings
        .client_configs()?
        .into_iter()
        .map(|config| build_one(settings, config))
        .collect::<Result<Vec<_>, _>>()?;
    Replicas::new(clients, options)
}

fn build_one(
    settings: &VlmSettings,
    config: vlm_core::ClientConfig,
) -> Result<Arc<dyn VlmClient>, VlmError> {
    if settings.is_auto() {
        return Err(VlmError::config(
            "vlm_backend = \"auto\": the backend is not detected yet; call \
             vlm_factory::resolve_backend(settings) before build_client",
        ));
    }
    let built: Result<Arc<dyn VlmClient>, VlmError> = match settings.backend {
        #[cfg(feature = "vllm")]
        VlmBackend::Vllm => vlm_vllm::VllmClient::new(config).map(|c| Arc::new(c) as _),
        #[cfg(feature = "lmdeploy")]
        VlmBackend::LmDeploy => vlm_lmdeploy::LmDeployClient::new(config).map(|c| Arc::new(c) as _),
        #[cfg(feature = "triton")]
        VlmBackend::Triton => vlm_triton::TritonClient::new(config).map(|c| Arc::new(c) as _),
        #[cfg(feature = "ollama")]
        VlmBackend::Ollama => vlm_ollama::OllamaClient::new(config).map(|c| Arc::new(c) as _),
        #[cfg(feature = "openai")]
        VlmBackend::OpenAi => vlm_openai::OpenAiClient::new(config).map(|c| Arc::new(c) as _),
        other => {
            drop(config);
            Err(not_compiled(other))
        }
    };
    let client = built?;
    tracing::debug!(
        backend = %client.backend(),
        base_url = %client.base_url(),
        model = client.model().unwrap_or("(discovered)"),
        "built VLM client"
    );
    Ok(client)
}

/// For `vlm_backend = "auto"` (also `--vlm-backend auto`, `VLM_BACKEND=auto`): probes the generic
/// base URL once, briefly, and returns the settings as if the backend found had been named (its
/// per-backend keys apply), with what was found. Settings that name a backend come back as they
/// are, with `None`. A backend found but not compiled in is then refused by [`build_client`]
/// with [`VlmError::BackendNotCompiled`], as an explicit choice is.
///
/// ```no_run
/// use vlm_factory::{VlmSettings, build_client, resolve_backend};
///
/// # async fn run() -> Result<(), vlm_core::VlmError> {
/// let settings = VlmSettings::loader()
///     .set_override("vlm_backend", "auto", "--vlm-backend")
///     .set_override("vlm_base_url", "http://localhost:11434", "--vlm-base-url")
///     .load()?;
/// let (settings, detected) = resolve_backend(settings).await?;
/// if let Some(found) = &detected {
///     println!("detected: {found}"); // ollama from GET / ("Ollama is running")
/// }
/// let client = build_client(&settings)?;
/// # let _ = client; Ok(()) }
/// ```
pub async fn resolve_backend(
    settings: VlmSettings,
) -> Result<(VlmSettings, Option<vlm_core::Detection>), VlmError> {
    if !settings.is_auto() {
        return Ok((settings, None));
    }
    let found = vlm_core::detect_backend(&settings.client_config()?).await?;
    tracing::info!("vlm_backend = auto: detected {found}");
    match settings.redo_detected(found.backend, found.to_string()) {
        Some(resolved) => Ok((resolved?, Some(found))),
        None => Ok((settings, None)),
    }
}

fn not_compiled(backend: VlmBackend) -> VlmError {
    VlmError::BackendNotCompiled {
        backend,
        feature: backend.cargo_feature(),
        compiled: compiled_backends(),
    }
}
