//! Configuration layers and the per-backend resolution rule, as tables of cases.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use vlm_core::VlmBackend;
use vlm_factory::{Source, VlmSettings};

/// A fresh directory for one case (no tempfile crate needed).
fn fresh_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vlm-factory-settings-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// An ImageWorks-shaped pyproject: other tables and non-vlm keys around ours.
const PYPROJECT: &str = r#"
[project]
name = "imageworks"
version = "0.4.0"
dependencies = ["pillow>=10", "requests"]

[tool.ruff]
line-length = 100

[tool.imageworks]
default_library = "~/Pictures"

[tool.imageworks.vlm]
vlm_backend = "vllm"
vlm_timeout = 90
vlm_base_url = "http://vlm-table:8000/v1"

[tool.imageworks.color_narrator]
vlm_backend = "vllm"
vlm_timeout = 60
vlm_base_url = "http://localhost:8000/v1"
vlm_model = "Qwen2-VL-2B-Instruct"
vlm_lmdeploy_base_url = "http://localhost:24001/v1"
vlm_lmdeploy_model = "Qwen2.5-VL-7B-AWQ"
vlm_lmdeploy_api_key = "EMPTY"
vlm_triton_base_url = "http://localhost:9000/v1"
min_contamination = 0.1
overlay_alpha = 0.6
prompt_template_id = 3

[tool.imageworks.personal_tagger]
vlm_backend = "lmdeploy"
vlm_timeout = 45
"#;

struct Case {
    name: &'static str,
    pyproject: Option<&'static str>,
    config: Option<&'static str>,
    env: &'static [(&'static str, &'static str)],
    overrides: &'static [(&'static str, &'static str, &'static str)],
    tool: &'static str,
    /// (key, expected value as `entries()` shows it, expected source)
    expect: &'static [(&'static str, &'static str, &'static str)],
}

fn load(case: &Case) -> Result<VlmSettings, vlm_core::VlmError> {
    let dir = fresh_dir();
    if let Some(p) = case.pyproject {
        std::fs::write(dir.join("pyproject.toml"), p).unwrap();
    }
    let mut loader = VlmSettings::loader()
        .cwd(&dir)
        .tool(case.tool)
        .env(case.env.iter().copied());
    if let Some(c) = case.config {
        let path = dir.join("vlm.toml");
        std::fs::write(&path, c).unwrap();
        loader = loader.config_file(path);
    }
    for (key, value, flag) in case.overrides {
        loader = loader.set_override(key, *value, *flag);
    }
    loader.load()
}

fn check(cases: &[Case]) {
    for case in cases {
        let settings = load(case).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let entries = settings.entries();
        for (key, value, source) in case.expect {
            let (_, got_value, got_source) = entries
                .iter()
                .find(|(k, _, _)| k == key)
                .unwrap_or_else(|| panic!("{}: no entry {key}", case.name));
            assert_eq!(got_value, value, "{}: value of {key}", case.name);
            let got_source = got_source.replace(&format!("{}", std::env::temp_dir().display()), "");
            assert!(
                got_source.ends_with(source),
                "{}: source of {key} is {got_source:?}, want …{source:?}",
                case.name
            );
        }
    }
}

const LM: &[(&str, &str, &str)] = &[("vlm_backend", "lmdeploy", "--vlm-backend")];

#[test]
fn base_url_model_and_key_follow_the_six_step_rule() {
    let files = Some(PYPROJECT);
    check(&[
        Case {
            name: "1. the CLI flag beats everything",
            pyproject: files,
            config: None,
            env: &[
                ("VLM_LMDEPLOY_BASE_URL", "http://env-specific:1/v1"),
                ("VLM_BASE_URL", "http://env:1/v1"),
            ],
            overrides: &[
                ("vlm_backend", "lmdeploy", "--vlm-backend"),
                ("vlm_base_url", "http://flag:2/v1", "--vlm-base-url"),
                ("vlm_model", "flag-model", "--vlm-model"),
            ],
            tool: "color_narrator",
            expect: &[
                ("vlm_base_url", "http://flag:2/v1/", "--vlm-base-url"),
                ("vlm_model", "flag-model", "--vlm-model"),
            ],
        },
        Case {
            name: "2. VLM_<B>_X beats VLM_X and the files",
            pyproject: files,
            config: None,
            env: &[
                ("VLM_LMDEPLOY_BASE_URL", "http://env-specific:1/v1"),
                ("VLM_BASE_URL", "http://env:1/v1"),
                ("VLM_LMDEPLOY_MODEL", "env-lm-model"),
                ("VLM_LMDEPLOY_API_KEY", "k-specific"),
                ("VLM_API_KEY", "k-generic"),
            ],
            overrides: LM,
            tool: "color_narrator",
            expect: &[
                (
                    "vlm_base_url",
                    "http://env-specific:1/v1/",
                    "VLM_LMDEPLOY_BASE_URL",
                ),
                ("vlm_model", "env-lm-model", "VLM_LMDEPLOY_MODEL"),
                ("vlm_api_key", "***", "VLM_LMDEPLOY_API_KEY"),
            ],
        },
        Case {
            name: "3. VLM_X beats the files' backend-specific key",
            pyproject: files,
            config: None,
            env: &[
                ("VLM_BASE_URL", "http://env:1/v1"),
                ("VLM_MODEL", "env-model"),
            ],
            overrides: LM,
            tool: "color_narrator",
            expect: &[
                ("vlm_base_url", "http://env:1/v1/", "VLM_BASE_URL"),
                ("vlm_model", "env-model", "VLM_MODEL"),
            ],
        },
        Case {
            name: "4. the files' vlm_<B>_x beats their generic vlm_x, even from --config",
            pyproject: files,
            config: Some("vlm_base_url = \"http://config-generic:3/v1\"\n"),
            env: &[],
            overrides: LM,
            tool: "color_narrator",
            expect: &[
                (
                    "vlm_base_url",
                    "http://localhost:24001/v1/",
                    "pyproject.toml [tool.imageworks.color_narrator] vlm_lmdeploy_base_url",
                ),
                (
                    "vlm_model",
                    "Qwen2.5-VL-7B-AWQ",
                    "pyproject.toml [tool.imageworks.color_narrator] vlm_lmdeploy_model",
                ),
                (
                    "vlm_api_key",
                    "***",
                    "pyproject.toml [tool.imageworks.color_narrator] vlm_lmdeploy_api_key",
                ),
            ],
        },
        Case {
            name: "5. the files' generic key when there is no specific one",
            pyproject: files,
            config: None,
            env: &[],
            overrides: &[],
            tool: "color_narrator",
            expect: &[
                (
                    "vlm_backend",
                    "vllm",
                    "pyproject.toml [tool.imageworks.color_narrator] vlm_backend",
                ),
                (
                    "vlm_base_url",
                    "http://localhost:8000/v1/",
                    "pyproject.toml [tool.imageworks.color_narrator] vlm_base_url",
                ),
                (
                    "vlm_model",
                    "Qwen2-VL-2B-Instruct",
                    "pyproject.toml [tool.imageworks.color_narrator] vlm_model",
                ),
                ("vlm_api_key", "(none)", "default"),
            ],
        },
        Case {
            name: "6. the backend's default URL, discovery for the model",
            pyproject: None,
            config: None,
            env: &[],
            overrides: LM,
            tool: "color_narrator",
            expect: &[
                ("vlm_base_url", "http://localhost:23333/v1/", "default"),
                ("vlm_model", "(discover)", "discovered from the server"),
                ("vlm_api_key", "(none)", "default"),
            ],
        },
        Case {
            name: "triton: the OpenAI-form URL in the tool table is stripped to the root",
            pyproject: files,
            config: None,
            env: &[],
            overrides: &[("vlm_backend", "triton", "--vlm-backend")],
            tool: "color_narrator",
            expect: &[
                (
                    "vlm_base_url",
                    "http://localhost:9000/",
                    "vlm_triton_base_url",
                ),
                ("vlm_model", "Qwen2-VL-2B-Instruct", "vlm_model"),
            ],
        },
    ]);
}

#[test]
fn plain_settings_layer_defaults_files_config_env_flags() {
    let files = Some(PYPROJECT);
    check(&[
        Case {
            name: "default",
            pyproject: None,
            config: None,
            env: &[],
            overrides: &[],
            tool: "color_narrator",
            expect: &[
                ("vlm_timeout", "120", "default"),
                ("vlm_backend", "vllm", "default"),
                ("vlm_max_tokens", "300", "default"),
                ("vlm_temperature", "0.1", "default"),
            ],
        },
        Case {
            name: "[tool.imageworks.vlm] when the tool has no table",
            pyproject: files,
            config: None,
            env: &[],
            overrides: &[],
            tool: "some_new_tool",
            expect: &[
                (
                    "vlm_timeout",
                    "90",
                    "pyproject.toml [tool.imageworks.vlm] vlm_timeout",
                ),
                (
                    "vlm_base_url",
                    "http://vlm-table:8000/v1/",
                    "[tool.imageworks.vlm] vlm_base_url",
                ),
            ],
        },
        Case {
            name: "the tool's table beats [tool.imageworks.vlm]",
            pyproject: files,
            config: None,
            env: &[],
            overrides: &[],
            tool: "color_narrator",
            expect: &[(
                "vlm_timeout",
                "60",
                "pyproject.toml [tool.imageworks.color_narrator] vlm_timeout",
            )],
        },
        Case {
            name: "another tool reads its own table",
            pyproject: files,
            config: None,
            env: &[],
            overrides: &[],
            tool: "personal_tagger",
            expect: &[
                (
                    "vlm_timeout",
                    "45",
                    "[tool.imageworks.personal_tagger] vlm_timeout",
                ),
                (
                    "vlm_backend",
                    "lmdeploy",
                    "[tool.imageworks.personal_tagger] vlm_backend",
                ),
            ],
        },
        Case {
            name: "--config beats pyproject",
            pyproject: files,
            config: Some("vlm_timeout = 30.5\nvlm_max_tokens = 512\n"),
            env: &[],
            overrides: &[],
            tool: "color_narrator",
            expect: &[
                ("vlm_timeout", "30.5", "vlm.toml vlm_timeout"),
                ("vlm_max_tokens", "512", "vlm.toml vlm_max_tokens"),
            ],
        },
        Case {
            name: "VLM_X beats --config",
            pyproject: files,
            config: Some("vlm_timeout = 30\n"),
            env: &[("VLM_TIMEOUT", "15"), ("VLM_BACKEND", "LMDeploy")],
            overrides: &[],
            tool: "color_narrator",
            expect: &[
                ("vlm_timeout", "15", "VLM_TIMEOUT"),
                ("vlm_backend", "lmdeploy", "VLM_BACKEND"),
            ],
        },
        Case {
            name: "the flag beats VLM_X",
            pyproject: files,
            config: Some("vlm_timeout = 30\n"),
            env: &[("VLM_TIMEOUT", "15"), ("VLM_BACKEND", "lmdeploy")],
            overrides: &[
                ("vlm_timeout", "5", "--vlm-timeout"),
                ("vlm_backend", "triton", "--vlm-backend"),
            ],
            tool: "color_narrator",
            expect: &[
                ("vlm_timeout", "5", "--vlm-timeout"),
                ("vlm_backend", "triton", "--vlm-backend"),
            ],
        },
        Case {
            name: "an empty VLM_X counts as unset",
            pyproject: files,
            config: None,
            env: &[("VLM_MODEL", ""), ("VLM_TIMEOUT", " ")],
            overrides: &[],
            tool: "color_narrator",
            expect: &[
                ("vlm_model", "Qwen2-VL-2B-Instruct", "vlm_model"),
                ("vlm_timeout", "60", "vlm_timeout"),
            ],
        },
    ]);
}

#[test]
fn numeric_api_keys_stay_strings_and_never_print() {
    let settings = VlmSettings::loader()
        .env([("VLM_API_KEY", "12345"), ("VLM_LMDEPLOY_API_KEY", "00777")])
        .load()
        .unwrap();
    assert_eq!(settings.api_key.as_ref().unwrap().expose(), "12345");
    let lm = VlmSettings::loader()
        .env([("VLM_LMDEPLOY_API_KEY", "00777")])
        .set_override("vlm_backend", "lmdeploy", "--vlm-backend")
        .load()
        .unwrap();
    assert_eq!(lm.api_key.as_ref().unwrap().expose(), "00777");
    let dir = fresh_dir();
    let config = dir.join("k.toml");
    std::fs::write(&config, "vlm_api_key = 12345\n").unwrap();
    let from_toml = VlmSettings::loader().config_file(&config).load().unwrap();
    assert_eq!(from_toml.api_key.as_ref().unwrap().expose(), "12345");
    for shown in [format!("{settings:?}"), format!("{:?}", settings.entries())] {
        assert!(!shown.contains("12345"), "{shown}");
    }
}

#[test]
fn bad_values_name_the_key_and_where_it_came_from() {
    let dir = fresh_dir();
    std::fs::write(
        dir.join("pyproject.toml"),
        "[tool.imageworks.color_narrator]\nvlm_timeout = -3\n",
    )
    .unwrap();
    let cases: Vec<(VlmSettings_, &str)> = vec![
        (
            Box::new(|| {
                VlmSettings::loader()
                    .env([("VLM_BACKEND", "lmdepoy")])
                    .load()
            }),
            "unknown vlm_backend \"lmdepoy\" (from VLM_BACKEND); did you mean \"lmdeploy\"? valid: vllm, lmdeploy, triton, ollama, openai (or \"auto\" to detect it)",
        ),
        (
            Box::new(|| {
                VlmSettings::loader()
                    .set_override("vlm_backend", "sglang", "--vlm-backend")
                    .load()
            }),
            "unknown vlm_backend \"sglang\" (from --vlm-backend); valid: vllm, lmdeploy, triton, ollama, openai",
        ),
        (
            Box::new(|| VlmSettings::loader().env([("VLM_TIMEOUT", "soon")]).load()),
            "invalid vlm_timeout \"soon\" (from VLM_TIMEOUT): expected seconds as a number > 0",
        ),
        (
            Box::new(move || VlmSettings::loader().cwd(&dir).load()),
            "invalid vlm_timeout -3 (from pyproject.toml [tool.imageworks.color_narrator] vlm_timeout)",
        ),
        (
            Box::new(|| {
                VlmSettings::loader()
                    .set_override("vlm_base_url", "ftp://x/v1", "--vlm-base-url")
                    .load()
            }),
            "invalid vlm_base_url (from --vlm-base-url): invalid base URL \"ftp://x/v1\"",
        ),
        (
            Box::new(|| VlmSettings::loader().env([("VLM_MAX_TOKENS", "0")]).load()),
            "invalid vlm_max_tokens \"0\" (from VLM_MAX_TOKENS): expected a whole number from 1",
        ),
        (
            Box::new(|| {
                VlmSettings::loader()
                    .config_file("/nonexistent/vlm.toml")
                    .load()
            }),
            "config file /nonexistent/vlm.toml (--config) does not exist",
        ),
    ];
    for (load, want) in cases {
        let err = load().unwrap_err();
        assert!(err.is_config(), "{err}");
        assert!(err.to_string().contains(want), "{err}\n  lacks: {want}");
    }
}

#[test]
fn nan_inf_and_huge_timeouts_are_shown_as_written_with_the_bound() {
    for (written, shown) in [
        ("nan", "nan"),
        ("inf", "inf"),
        ("-inf", "-inf"),
        ("1e9", "1000000000"),
    ] {
        let dir = fresh_dir();
        std::fs::write(
            dir.join("pyproject.toml"),
            format!("[tool.imageworks.color_narrator]\nvlm_timeout = {written}\n"),
        )
        .unwrap();
        let err = VlmSettings::loader()
            .cwd(&dir)
            .load()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("invalid vlm_timeout {shown} (from pyproject.toml"))
                && err.contains("at most 604800 (7 days)"),
            "{written}: {err}"
        );
    }
    let err = VlmSettings::loader()
        .env([("VLM_HEALTH_TIMEOUT", "999999999")])
        .load()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("invalid vlm_health_timeout") && err.contains("at most 604800"),
        "{err}"
    );
}

#[test]
fn an_override_of_a_backends_own_key_is_used_not_dropped() {
    let settings = VlmSettings::loader()
        .set_override("vlm_backend", "lmdeploy", "--vlm-backend")
        .set_override("vlm_lmdeploy_model", "InternVL2-2B", "test")
        .set_override("vlm_lmdeploy_base_url", "http://gpu:24001", "test")
        .set_override("vlm_vllm_model", "not-this-one", "test")
        .env([("VLM_LMDEPLOY_MODEL", "from-env")])
        .load()
        .unwrap();
    assert_eq!(settings.model.as_deref(), Some("InternVL2-2B"));
    assert_eq!(settings.base_url.as_str(), "http://gpu:24001/v1/");
    assert_eq!(settings.source("vlm_model").unwrap().to_string(), "test");
    let settings = VlmSettings::loader()
        .set_override("vlm_health_timeout", "2.5", "--vlm-health-timeout")
        .load()
        .unwrap();
    assert_eq!(settings.health_timeout.as_secs_f64(), 2.5);
    assert_eq!(
        settings
            .client_config()
            .unwrap()
            .health_timeout
            .as_secs_f64(),
        2.5
    );
}

type VlmSettings_ = Box<dyn Fn() -> Result<VlmSettings, vlm_core::VlmError>>;

#[test]
fn unknown_vlm_keys_warn_in_pyproject_and_env_but_fail_in_a_config_file() {
    let dir = fresh_dir();
    std::fs::write(
        dir.join("pyproject.toml"),
        "[tool.imageworks.color_narrator]\nvlm_timout = 3\nother = 1\n",
    )
    .unwrap();
    let settings = VlmSettings::loader()
        .cwd(&dir)
        .env([("VLM_BASEURL", "x")])
        .load()
        .unwrap();
    let warnings = settings.warnings().join("\n");
    assert!(
        warnings.contains("vlm_timout") && warnings.contains("did you mean vlm_timeout?"),
        "{warnings}"
    );
    assert!(
        warnings.contains("VLM_BASEURL") && warnings.contains("did you mean VLM_BASE_URL?"),
        "{warnings}"
    );
    assert!(!warnings.contains("other"), "{warnings}");

    let config = dir.join("bad.toml");
    std::fs::write(&config, "vlm_modle = \"x\"\n").unwrap();
    let err = VlmSettings::loader()
        .config_file(&config)
        .load()
        .unwrap_err();
    assert!(
        err.to_string().contains("unknown setting vlm_modle")
            && err.to_string().contains("did you mean vlm_model?"),
        "{err}"
    );

    std::fs::write(&config, "vlm_model = [broken\n").unwrap();
    let err = VlmSettings::loader()
        .config_file(&config)
        .load()
        .unwrap_err();
    assert!(err.to_string().contains("cannot read config file"), "{err}");
}

#[test]
fn base_urls_are_normalised_for_every_spelling() {
    for (input, backend, want) in [
        ("localhost:8000", "vllm", "http://localhost:8000/v1/"),
        ("localhost:8000/", "vllm", "http://localhost:8000/v1/"),
        ("localhost:8000/v1", "lmdeploy", "http://localhost:8000/v1/"),
        (
            "localhost:8000/v1/",
            "lmdeploy",
            "http://localhost:8000/v1/",
        ),
        ("localhost:8000/v1/", "triton", "http://localhost:8000/"),
    ] {
        let s = VlmSettings::loader()
            .set_override("vlm_backend", backend, "--vlm-backend")
            .set_override("vlm_base_url", input, "--vlm-base-url")
            .load()
            .unwrap();
        assert_eq!(s.base_url.as_str(), want, "{backend} {input}");
    }
    let s = VlmSettings::loader().load().unwrap();
    assert_eq!(s.backend, VlmBackend::Vllm);
    assert_eq!(s.source("vlm_backend"), None);
    assert_eq!(s.source("vlm_model"), Some(&Source::Discovery));
}

#[test]
fn secrets_never_show_in_parse_errors_or_debug_output() {
    let dir = fresh_dir();
    std::fs::write(
        dir.join("pyproject.toml"),
        "[tool.imageworks.color_narrator]\nvlm_api_key = sk-live-SECRET1\n",
    )
    .unwrap();
    let err = VlmSettings::loader()
        .cwd(&dir)
        .load()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("line 2, column 15") && !err.contains("SECRET1"),
        "{err}"
    );
    let config = dir.join("vlm.toml");
    std::fs::write(&config, "vlm_api_key = sk-live-SECRET2\n").unwrap();
    let err = VlmSettings::loader()
        .config_file(&config)
        .load()
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 1") && !err.contains("SECRET2"), "{err}");

    let loader = VlmSettings::loader()
        .env([("VLM_API_KEY", "sk-live-SECRET3"), ("VLM_TIMEOUT", "9")])
        .set_override("vlm_api_key", "sk-live-SECRET4", "test");
    let shown = format!("{loader:?}");
    assert!(
        !shown.contains("SECRET3") && !shown.contains("SECRET4") && shown.contains("\"9\""),
        "{shown}"
    );
    let settings = loader.load().unwrap();
    assert!(!format!("{settings:?}").contains("SECRET"));

    let err = VlmSettings::loader()
        .set_override(
            "vlm_base_url",
            "http://me:SECRET5@gpu:8000/v1",
            "--vlm-base-url",
        )
        .load()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("must not carry credentials") && !err.contains("SECRET5"),
        "{err}"
    );
}

#[test]
fn a_base_url_list_comes_from_a_toml_array_a_flag_or_a_variable() {
    let dir = fresh_dir();
    std::fs::write(
        dir.join("pyproject.toml"),
        "[tool.imageworks.color_narrator]\nvlm_lmdeploy_base_url = [\"http://gpu1:23333\", \"http://gpu2:23333/v1\"]\n",
    )
    .unwrap();
    let settings = VlmSettings::loader()
        .cwd(&dir)
        .set_override("vlm_backend", "lmdeploy", "--vlm-backend")
        .load()
        .unwrap();
    let urls: Vec<&str> = settings.base_urls.iter().map(|u| u.as_str()).collect();
    assert_eq!(urls, ["http://gpu1:23333/v1/", "http://gpu2:23333/v1/"]);
    assert_eq!(settings.base_url, settings.base_urls[0]);
    let shown = settings
        .entries()
        .into_iter()
        .find(|(k, _, _)| *k == "vlm_base_url")
        .unwrap();
    assert_eq!(shown.1, "http://gpu1:23333/v1/, http://gpu2:23333/v1/");
    assert_eq!(settings.client_configs().unwrap().len(), 2);

    let from_env = VlmSettings::loader()
        .cwd(&dir)
        .env([("VLM_BASE_URL", " http://a:8000/v1 , http://b:8000/v1")])
        .load()
        .unwrap();
    assert_eq!(from_env.base_urls.len(), 2);
    assert_eq!(from_env.base_urls[1].as_str(), "http://b:8000/v1/");

    for (value, expected) in [
        ("http://a:8000/v1,,http://b:8000/v1", "an empty entry"),
        ("http://a:8000/v1,http://a:8000/v1/", "twice"),
    ] {
        let err = VlmSettings::loader()
            .cwd(&dir)
            .set_override("vlm_base_url", value, "--vlm-base-url")
            .load()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(expected) && err.contains("--vlm-base-url"),
            "{err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
