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
//! - [`openai`]: the one chat-completions payload builder and [`openai::OpenAiCompatible`], the
//!   one client every OpenAI-compatible backend is built from;
//! - [`Replicas`]: several endpoints of one model as one client (least-in-flight routing,
//!   failover, outages waited out, adaptive concurrency);
//! - [`text`]: how text a server chose is cleaned before it is shown (key redacted, control
//!   characters escaped, length capped).
//!
//! The modules import each other in one direction, each only from those before it: `backend`,
//! `key`, `retry`; `error` (backend); `text` (key); `config`, `image`, `request`, `response`,
//! `health`, `error_body`, `models`; `transport` (HTTP only, nothing OpenAI); `stream`;
//! `client` (the trait); `limit` (adaptive concurrency), `metrics` (Prometheus text);
//! `replicas` (several clients as one); `openai` (payload, parsing, the OpenAI-compatible
//! client).
//!
//! ```
//! use vlm_core::{ImageInput, VlmBackend, VlmRequest};
//!
//! let backend: VlmBackend = "lmdeploy".parse().unwrap();
//! assert_eq!(backend.default_base_url(), Some("http://localhost:23333/v1"));
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
// Unsafe code only where it is allowed by name: `encode` (SIMD intrinsics).
#![deny(unsafe_code)]

mod backend;
pub mod batch;
mod buffers;
mod client;
mod config;
mod detect;
#[allow(unsafe_code)]
mod encode;
mod error;
mod error_body;
mod health;
mod image;
pub mod json;
mod key;
mod limit;
mod metrics;
mod models;
pub mod openai;
mod replicas;
mod request;
mod resize;
mod response;
mod retry;
mod stream;
#[doc(hidden)]
pub mod support;
pub mod text;
mod transport;

pub use backend::{ParseBackendError, VlmBackend};
pub use client::VlmClient;
pub use config::{ClientConfig, no_default_url, normalize_base_url, server_root};
pub use detect::{Detection, detect_backend};
pub use error::{BoxError, VlmError};
pub use health::{HealthProbe, HealthReport, HealthState};
pub use image::{ImageInput, ImageMime, LoadedImage, describe_non_image, encode_data_url};
pub use key::ApiKey;
pub use replicas::{Admission, EndpointStats, ReplicaOptions, Replicas};
pub use request::{RESERVED_FIELDS, ResponseFormat, VlmRequest, VlmRequestBuilder};
pub use resize::{RESIZE_MISSING, convert_tiff, shrink_image};
pub use response::{Usage, VlmResponse};
pub use stream::{StreamEvent, VlmStream};

/// Re-exported so backends and users share one version.
pub use async_trait::async_trait;
pub use url::Url;

/// The README's example, compiled as a doctest so that it cannot drift.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
