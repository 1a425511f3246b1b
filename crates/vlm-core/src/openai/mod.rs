//! The OpenAI chat-completions protocol: the one payload builder ([`build_chat_body`]), the
//! parsing of answers and model lists, and [`OpenAiCompatible`], the one client every
//! OpenAI-compatible backend is built from.

mod client;
mod parse;
mod payload;

pub use client::{OpenAiCompatible, OpenAiServer};
pub use parse::{ServedModel, parse_chat_response, parse_model_list};
pub use payload::{PayloadOptions, build_chat_body, write_json_str};
