//! What a Triton model takes, read once from its metadata (`GET /v2/models/{m}`: inputs,
//! datatypes, shapes, platform) and configuration (`GET /v2/models/{m}/config`: which inputs are
//! optional, whether it is decoupled).

use std::collections::BTreeMap;

use serde_json::Value;

/// One input of the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Input {
    /// `BYTES`, `INT32`, `FP32`, `BOOL`, `UINT64`, ...
    pub(crate) datatype: String,
    /// The shape as the metadata gives it (a leading -1 on batching models).
    pub(crate) shape: Vec<i64>,
}

/// How the model takes images from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ImageWay {
    /// `image_url_input` (TensorRT-LLM multimodal ensembles: mllama, qwen2_vl,
    /// llava_onevision, pixtral): `data:image/jpeg;base64,...` (the only prefix its
    /// preprocessing decodes; the bytes' real format is detected) or an http(s) URL it fetches.
    Url { several: bool },
    /// `image` (Triton's vLLM backend): raw base64, no `data:` prefix.
    Raw { several: bool },
    /// No image input this client can fill: why, and what to run instead.
    Unsupported(String),
}

impl ImageWay {
    /// For `vlm health`: `image_url_input (data:image/jpeg;base64, one per request)`.
    pub(crate) fn describe(&self) -> String {
        let count = |several: bool| {
            if several {
                "several per request"
            } else {
                "one per request"
            }
        };
        match self {
            ImageWay::Url { several } => format!(
                "image_url_input (data:image/jpeg;base64 URLs, {})",
                count(*several)
            ),
            ImageWay::Raw { several } => format!("image (raw base64, {})", count(*several)),
            ImageWay::Unsupported(why) => format!("none this client can fill: {why}"),
        }
    }
}

/// What the model is and takes.
#[derive(Debug, Clone)]
pub(crate) struct ModelInfo {
    /// The model's name.
    pub(crate) name: String,
    /// Every input by name.
    pub(crate) inputs: BTreeMap<String, Input>,
    /// Whether the model is decoupled (answers through `generate_stream`).
    pub(crate) decoupled: bool,
    /// How it takes images.
    pub(crate) image: ImageWay,
}

impl ModelInfo {
    /// Whether the model has this input with this datatype.
    pub(crate) fn has(&self, name: &str, datatype: &str) -> bool {
        self.inputs
            .get(name)
            .is_some_and(|i| i.datatype == datatype)
    }

    /// Reads the metadata and configuration bodies; `None` when the metadata is not KServe's.
    pub(crate) fn parse(metadata: &Value, config: Option<&Value>) -> Option<ModelInfo> {
        let name = metadata.get("name")?.as_str()?.to_owned();
        let mut inputs = BTreeMap::new();
        for input in metadata.get("inputs")?.as_array()? {
            let shape = input
                .get("shape")
                .and_then(Value::as_array)
                .map(|s| s.iter().filter_map(Value::as_i64).collect())
                .unwrap_or_default();
            inputs.insert(
                input.get("name")?.as_str()?.to_owned(),
                Input {
                    datatype: input.get("datatype")?.as_str()?.to_owned(),
                    shape,
                },
            );
        }
        let decoupled = config
            .and_then(|c| c.get("model_transaction_policy"))
            .and_then(|p| p.get("decoupled"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let image = image_way(&name, &inputs);
        Some(ModelInfo {
            name,
            inputs,
            decoupled,
            image,
        })
    }
}

/// Whether an input takes several values per request: its last dimension is variable.
fn several(input: &Input) -> bool {
    input.shape.last() == Some(&-1)
}

/// How the model takes images, from its inputs.
fn image_way(name: &str, inputs: &BTreeMap<String, Input>) -> ImageWay {
    if let Some(input) = inputs
        .get("image_url_input")
        .filter(|i| i.datatype == "BYTES")
    {
        return ImageWay::Url {
            several: several(input),
        };
    }
    if let Some(input) = inputs.get("image").filter(|i| i.datatype == "BYTES") {
        return ImageWay::Raw {
            several: several(input),
        };
    }
    let pixels: Vec<&str> = ["image_input", "image_bytes_input"]
        .into_iter()
        .filter(|n| inputs.contains_key(*n))
        .collect();
    if !pixels.is_empty() {
        return ImageWay::Unsupported(format!(
            "model {name:?} takes images only as preprocessed pixels ({}), which need the \
             model's own client-side preprocessing (llava, blip2 and vila ensembles); this client \
             sends encoded images: build the ensemble for a model whose preprocessing takes \
             image_url_input (mllama, qwen2_vl, llava_onevision), serve the model on Triton's \
             vLLM backend, or run `trtllm-serve <model>` and use --vlm-backend openai",
            pixels.join(", ")
        ));
    }
    let names: Vec<&str> = inputs.keys().map(String::as_str).collect();
    ImageWay::Unsupported(format!(
        "model {name:?} has no image input (its inputs: {}): it is a text-only model; serve a \
         vision-language model (a TensorRT-LLM multimodal ensemble with image_url_input, or a \
         model on Triton's vLLM backend)",
        names.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn info(inputs: Value, config: Value) -> ModelInfo {
        ModelInfo::parse(
            &json!({"name": "m", "platform": "ensemble", "inputs": inputs}),
            Some(&config),
        )
        .unwrap()
    }

    #[test]
    fn the_image_input_is_chosen_from_the_metadata() {
        let ensemble = info(
            json!([{"name": "text_input", "datatype": "BYTES", "shape": [-1, 1]},
                   {"name": "image_url_input", "datatype": "BYTES", "shape": [-1, 1]}]),
            json!({}),
        );
        assert_eq!(ensemble.image, ImageWay::Url { several: false });
        assert!(!ensemble.decoupled);
        let pixtral = info(
            json!([{"name": "image_url_input", "datatype": "BYTES", "shape": [-1, -1]}]),
            json!({}),
        );
        assert_eq!(pixtral.image, ImageWay::Url { several: true });
        let vllm = info(
            json!([{"name": "text_input", "datatype": "BYTES", "shape": [1]},
                   {"name": "image", "datatype": "BYTES", "shape": [-1]}]),
            json!({"model_transaction_policy": {"decoupled": true}}),
        );
        assert_eq!(vllm.image, ImageWay::Raw { several: true });
        assert!(vllm.decoupled);
        let llava = info(
            json!([{"name": "text_input", "datatype": "BYTES", "shape": [-1, 1]},
                   {"name": "image_input", "datatype": "FP16", "shape": [-1, -1, -1, -1, -1]}]),
            json!({}),
        );
        assert!(
            matches!(&llava.image, ImageWay::Unsupported(why) if why.contains("preprocessed pixels")),
            "{:?}",
            llava.image
        );
        let text = info(
            json!([{"name": "text_input", "datatype": "BYTES", "shape": [-1, 1]},
                   {"name": "max_tokens", "datatype": "INT32", "shape": [-1, 1]}]),
            json!({}),
        );
        assert!(
            matches!(&text.image, ImageWay::Unsupported(why) if why.contains("text-only")),
            "{:?}",
            text.image
        );
    }
}
