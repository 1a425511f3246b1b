//! The model a client sends: configured, or adopted from the server; and how a health report
//! settles it from the served models.

use std::sync::OnceLock;

use crate::error::VlmError;
use crate::health::{HealthReport, HealthState};
use crate::text::shown_model;

/// Holds the model: configured, or adopted once from the server.
#[derive(Debug, Default)]
pub struct ModelSlot {
    configured: Option<String>,
    discovered: OnceLock<String>,
}

impl ModelSlot {
    /// A slot with the configured model, if any.
    pub fn new(configured: Option<String>) -> Self {
        ModelSlot {
            configured,
            discovered: OnceLock::new(),
        }
    }

    /// The model, or `None` while unknown.
    pub fn get(&self) -> Option<&str> {
        self.configured
            .as_deref()
            .or_else(|| self.discovered.get().map(String::as_str))
    }

    /// The configured model, if one was configured.
    pub fn configured(&self) -> Option<&str> {
        self.configured.as_deref()
    }

    /// Whether a model is known.
    pub fn is_known(&self) -> bool {
        self.get().is_some()
    }

    /// Adopts a discovered model (the first adoption wins; a configured model always does) and
    /// returns the model now in use.
    pub fn adopt<'a>(&'a self, model: &'a str) -> &'a str {
        if self.configured.is_none() {
            let _ = self.discovered.set(model.to_owned());
        }
        self.get().unwrap_or(model)
    }
}

/// How a server names its models: when a configured name means a served one, and what to do
/// when it is not served. The default is exact names and the usual advice.
pub trait ModelNames: Send + Sync {
    /// Whether the configured `model` names the served `served` (Ollama: `qwen2.5vl` is
    /// `qwen2.5vl:latest`).
    fn same_model(&self, configured: &str, served: &str) -> bool {
        configured == served
    }

    /// What to do when `model` is not served, when there is more to say than choosing one of the
    /// served models (Ollama: `ollama pull <model>`).
    fn not_served_advice(&self, model: &str) -> Option<String> {
        let _ = model;
        None
    }
}

/// Exact model names (vLLM, LMDeploy, Triton, most servers).
#[derive(Debug, Clone, Copy, Default)]
pub struct ExactNames;

impl ModelNames for ExactNames {}

/// Sets the report's model and state from its served models and the configured model.
pub fn resolve_model(
    report: &mut HealthReport,
    slot: &ModelSlot,
    names: &dyn ModelNames,
) -> Result<(), VlmError> {
    let served = &report.served_models;
    match slot.configured() {
        Some(model) => {
            report.model = Some(model.to_owned());
            let advice = names.not_served_advice(model);
            if served.iter().any(|m| names.same_model(model, m)) {
                report.state = HealthState::Ready;
            } else if served.is_empty() {
                report.state = HealthState::Unhealthy {
                    reason: match advice {
                        Some(advice) => {
                            format!("the server has no model, so not {model:?}; {advice}")
                        }
                        None => format!("the server serves no model, so not {model:?}"),
                    },
                };
            } else {
                let choose = format!(
                    "set --vlm-model (vlm_model / vlm_{}_model) to one of them",
                    report.backend
                );
                report.state = HealthState::Unhealthy {
                    reason: format!(
                        "model {model:?} is not served; the server serves {}; {}",
                        shown_models(served),
                        advice.map_or(choose.clone(), |a| format!("{a}, or {choose}"))
                    ),
                };
            }
        }
        None => match served.as_slice() {
            [only] => {
                report.model = Some(slot.adopt(only).to_owned());
                report.state = HealthState::Ready;
            }
            [] => {
                report.state = HealthState::Unhealthy {
                    reason: "the server serves no model".to_owned(),
                };
            }
            several => {
                return Err(VlmError::config(format!(
                    "no model is configured and the {} server at {} serves several: {}; choose \
                     one with --vlm-model (or vlm_model / vlm_{}_model)",
                    report.backend,
                    report.base_url,
                    shown_models(several),
                    report.backend
                )));
            }
        },
    }
    Ok(())
}

fn shown_models(names: &[String]) -> String {
    names
        .iter()
        .map(|n| shown_model(n))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_slot_adopts_only_when_unconfigured() {
        let slot = ModelSlot::new(None);
        assert_eq!(slot.get(), None);
        assert_eq!(slot.adopt("a"), "a");
        assert_eq!(slot.adopt("b"), "a");
        let slot = ModelSlot::new(Some("x".into()));
        assert_eq!(slot.adopt("a"), "x");
    }
}
