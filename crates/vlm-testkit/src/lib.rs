//! # vlm-testkit
//!
//! Local emulators of the servers ImageWorks VLM talks to — vLLM, LMDeploy, Triton, Ollama, and
//! SGLang, llama.cpp's `llama-server`, `trtllm-serve` and LM Studio for the generic `openai` backend — for
//! tests, demos and benchmarks on machines with no GPU, no model and no network.
//!
//! Each [`Emulator`] listens on 127.0.0.1 (port 0 by default), answers each route with the
//! status codes and bodies of the real server (errors in that server's shape, API-key scope,
//! SSE streaming framed as the server frames it), validates what the real server would reject
//! (image parts must be `data:` URLs whose bytes really are that image type), and computes a
//! deterministic answer from each image: its size, mean colour, whether it is monochrome and the
//! hue and strength of any cast, and the first 16 hex digits of its SHA-256. Answers start with
//! `[emulator]` so nobody mistakes them for a model's.
//!
//! Faults can be injected into the next chat calls ([`Fault`]): a status with a body (503, 429
//! with `Retry-After`, a proxy's HTML 502), a delay, a hang, a connection dropped mid-body,
//! LMDeploy <= 0.15's HTTP 200 with `finish_reason: "error"`, a stream that never ends, a
//! connection closed before any answer, an error echoing the `Authorization` header;
//! [`Emulator::start_after`] keeps the port closed for a while, as a server still loading its
//! model does, and [`Emulator::delay_other_routes`] slows health probes. A capacity model
//! ([`EmulatorConfig::with_capacity`]) makes it behave like a loaded GPU: K requests decode
//! together, the rest queue (published on vLLM's `GET /metrics`), and a full queue is a 503. An emulator can serve
//! under a gateway's path prefix ([`EmulatorConfig::with_prefix`]), and [`Blackhole`] is a host
//! whose TCP handshake never completes. Every request is recorded.
//!
//! ```
//! use vlm_core::VlmBackend;
//! use vlm_testkit::{Emulator, EmulatorConfig, Fault};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let lmdeploy = Emulator::start(EmulatorConfig::new(VlmBackend::LmDeploy).with_model("InternVL2-2B"))
//!     .await
//!     .unwrap();
//! lmdeploy.fail_next(2, Fault::unavailable());
//! println!("--vlm-base-url {}", lmdeploy.base_url());
//! assert_eq!(lmdeploy.model(), "InternVL2-2B");
//! # }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod analysis;
mod blackhole;
mod capacity;
mod cli;
mod routes;
mod server;
mod servers;
mod stall;
mod triton;

pub use blackhole::Blackhole;
pub use capacity::{Capacity, CapacityStats};
pub use cli::{EmulatorArgs, parse_duration, parse_emulator_args, parse_fault, run_emulator};
pub use server::{
    Emulator, EmulatorConfig, EmulatorError, Fault, OpenAiFlavor, RecordedRequest, default_model,
};
pub use stall::StallMeter;
pub use triton::TritonModel;

/// The README's example, compiled as a doctest so that it cannot drift.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
