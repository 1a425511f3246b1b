//! # vlm-core
//!
//! The core of ImageWorks VLM: one interface to a vision-language model whichever server hosts
//! it (vLLM, LMDeploy, Triton). This crate holds what every backend shares:
//!
//! - [`VlmClient`], the async trait (`health`, `health_check`, `wait_ready`, `infer_single`);
//! - [`VlmRequest`] (with its builder), [`VlmResponse`], [`ImageInput`];
//! - [`VlmBackend`], always knowing every backend whichever features are compiled;
//! - [`VlmError`], whose messages say what to do next;
//! - [`HealthReport`] / [`HealthState`]: why a server is or is not ready;
//! - [`openai`], the one chat-completions payload builder and the decoder of every error-body
//!   shape, and [`transport`], the pooled HTTP client the backends are built from.
//!
//! ```
//! use vlm_core::{ImageInput, VlmBackend, VlmRequest};
//!
//! let backend: VlmBackend = "lmdeploy".parse().unwrap();
//! assert_eq!(backend.default_base_url(), "http://localhost:23333/v1");
//!
//! let request = VlmRequest::builder("Is there a colour cast in this photograph?")
//!     .image(ImageInput::path("photo.jpg"))
//!     .max_tokens(300)
//!     .temperature(0.1)
//!     .build()
//!     .unwrap();
//! assert_eq!(request.prompt, "Is there a colour cast in this photograph?");
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod backend;
pub mod batch;
mod client;
mod error;
mod health;
mod image;
pub mod openai;
mod request;
mod response;
pub mod retry;
pub mod stream;
pub mod text;
pub mod transport;

pub use backend::{VlmBackend, edit_distance};
pub use client::{ApiKey, ClientConfig, ModelSlot, VlmClient, normalize_base_url, server_root};
pub use error::VlmError;
pub use health::{HealthProbe, HealthReport, HealthState};
pub use image::{ImageInput, ImageMime, LoadedImage, describe_non_image, encode_data_url};
pub use request::{RESERVED_FIELDS, ResponseFormat, VlmRequest, VlmRequestBuilder};
pub use response::{Usage, VlmResponse};
pub use stream::{StreamEvent, VlmStream};

/// Re-exported so backends and users share one version.
pub use async_trait::async_trait;
pub use url::Url;
