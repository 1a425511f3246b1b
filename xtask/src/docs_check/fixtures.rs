//! The scratch folder a page's commands run in: the files the docs take for granted.

use std::path::Path;

/// A JSON schema like the docs' `cast.json`.
const CAST_SCHEMA: &str = r#"{"type":"object","properties":{"caption":{"type":"string"},"cast":{"type":"string","enum":["none","warm","cool","green","magenta"]},"monochrome":{"type":"boolean"}},"required":["caption","cast","monochrome"]}
"#;

/// Two requests in the OpenAI Batch format, images relative to the file.
const REQUESTS: &str = r#"{"custom_id":"sepia","method":"POST","url":"/v1/chat/completions","body":{"max_tokens":200,"messages":[{"role":"system","content":"Answer in one sentence."},{"role":"user","content":[{"type":"text","text":"Is there a colour cast?"},{"type":"image_url","image_url":{"url":"images/sepia_portrait.jpg"}}]}]}}
{"custom_id":"pair","method":"POST","url":"/v1/chat/completions","body":{"max_tokens":200,"messages":[{"role":"user","content":[{"type":"text","text":"Which of the two is warmer?"},{"type":"image_url","image_url":{"url":"images/colour_market.png"}},{"type":"image_url","image_url":{"url":"images/green_cast_field.jpg"}}]}]}}
"#;

/// A settings file for `--config`.
const VLM_TOML: &str = "[tool.imageworks.personal_tagger]\nvlm_max_tokens = 120\n";

/// Writes the scratch folder: `photos/`, `assets/samples/`, `images/` and `batch/images/` hold
/// the sample images; `cast.json`, `requests.jsonl`, `batch/requests.jsonl`, `prompt.txt` and
/// `vlm.toml` are there for the commands that name them.
pub fn write(root: &Path, scratch: &Path) -> Result<(), String> {
    let samples = root.join("assets/samples");
    for dir in ["photos", "assets/samples", "images", "batch/images"] {
        copy_dir(&samples, &scratch.join(dir))?;
    }
    let files = [
        ("cast.json", CAST_SCHEMA),
        ("requests.jsonl", REQUESTS),
        ("batch/requests.jsonl", REQUESTS),
        ("prompt.txt", "List the subjects of this photograph.\n"),
        ("vlm.toml", VLM_TOML),
    ];
    for (name, text) in files {
        std::fs::write(scratch.join(name), text)
            .map_err(|e| format!("cannot write {name} in {}: {e}", scratch.display()))?;
    }
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::create_dir_all(to).map_err(|e| format!("cannot create {}: {e}", to.display()))?;
    let entries =
        std::fs::read_dir(from).map_err(|e| format!("cannot read {}: {e}", from.display()))?;
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if path.is_file() {
            std::fs::copy(&path, to.join(entry.file_name()))
                .map_err(|e| format!("cannot copy {}: {e}", path.display()))?;
        }
    }
    Ok(())
}
