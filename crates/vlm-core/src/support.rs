//! For backend crates only: the HTTP transport, the retry policy, the model slot, streaming and
//! health helpers that `vlm-vllm`, `vlm-lmdeploy` and `vlm-triton` are built from.
//!
//! Not a stable API: it changes with the workspace, whatever the version number says. Build
//! applications on the crate root, [`crate::openai`] and [`crate::text`] instead.

pub use crate::backend::edit_distance;
pub use crate::buffers::BufferPool;
pub use crate::encode::encode_base64;
pub use crate::error_body::{DecodedError, decode_error_body, json_string_field};
pub use crate::health::{err_note, state_for_error};
pub use crate::models::{ExactNames, ModelNames, ModelSlot, resolve_model};
pub use crate::resize::fit as fit_image;
pub use crate::retry::{RetryPolicy, parse_retry_after, retryable_status};
pub use crate::stream::{ChunkParser, StreamContext, openai_chunk, parse_sse_data, sse_events};
pub use crate::transport::{Auth, Budget, MAX_RESPONSE_BYTES, RawResponse, Transport};
