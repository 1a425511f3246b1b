//! The built-in emulator (`narrate --emulate`, `vlm emulate`), compiled in with the `emulate`
//! feature (on by default). Without it, `vlm` has no HTTP server and no image decoders in its
//! dependency tree, and both entry points say how to get them back.

use vlm_core::VlmBackend;

use crate::{Exit, Failure};

/// What `vlm emulate` was asked for (read only when the emulator is compiled in).
#[derive(Debug)]
#[cfg_attr(not(feature = "emulate"), allow(dead_code))]
pub struct Serve {
    /// The server to emulate, as given to `--backend`.
    pub backend: String,
    /// The port on 127.0.0.1 (0: any free port).
    pub port: u16,
    /// The model served.
    pub model: Option<String>,
    /// The API key required.
    pub api_key: Option<String>,
    /// Fixed answers for benchmarks.
    pub fast: bool,
    /// Which OpenAI-compatible server `--backend openai` is.
    pub flavor: Option<String>,
    /// Which model `--backend triton` serves.
    pub triton_model: Option<String>,
    /// `--capacity K --token-rate R`.
    pub capacity: Option<(usize, f64)>,
    /// `--fault`, each as given.
    pub faults: Vec<String>,
    /// `--start-after`.
    pub start_after: Option<String>,
    /// `--delay`.
    pub delay: Option<String>,
}

#[cfg(feature = "emulate")]
mod imp {
    use super::{Exit, Failure, Serve, VlmBackend};

    /// A running emulator; it stops when dropped.
    pub type Emulator = vlm_testkit::Emulator;

    /// Starts an emulator of `backend` serving `model` (or the backend's default model).
    pub async fn start(backend: VlmBackend, model: Option<String>) -> Result<Emulator, Failure> {
        let model = model.unwrap_or_else(|| vlm_testkit::default_model(backend).to_owned());
        let config = vlm_testkit::EmulatorConfig::new(backend).with_model(model);
        vlm_testkit::Emulator::start(config)
            .await
            .map_err(|e| Failure::usage(format!("cannot start the emulator: {e}")))
    }

    /// The value to give `--vlm-base-url`.
    pub fn base_url(emulator: &Emulator) -> String {
        emulator.base_url()
    }

    /// `vlm emulate`: serves until killed.
    pub async fn serve(args: Serve) -> Result<Exit, Failure> {
        let backend = args
            .backend
            .parse::<VlmBackend>()
            .map_err(|e| Failure::usage(e.to_string().replace("vlm_backend", "--backend")))?;
        let mut emulator_args = vlm_testkit::EmulatorArgs::new(backend);
        emulator_args.port = args.port;
        emulator_args.model = args.model;
        emulator_args.api_key = args.api_key;
        emulator_args.fast = args.fast;
        if let Some(flavor) = &args.flavor {
            emulator_args.flavor = flavor.parse().map_err(Failure::usage)?;
        }
        if let Some(kind) = &args.triton_model {
            emulator_args.triton_model = kind.parse().map_err(Failure::usage)?;
        }
        if let Some((slots, rate)) = args.capacity {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(Failure::usage(format!(
                    "invalid --token-rate {rate}: expected tokens/s > 0"
                )));
            }
            emulator_args.capacity = Some(vlm_testkit::Capacity::new(slots, rate));
        }
        for fault in &args.faults {
            emulator_args
                .faults
                .push(vlm_testkit::parse_fault(fault).map_err(Failure::usage)?);
        }
        let duration = |flag: &str, value: &Option<String>| {
            value
                .as_deref()
                .map(|v| {
                    vlm_testkit::parse_duration(v)
                        .map_err(|e| Failure::usage(format!("{flag}: {e}")))
                })
                .transpose()
                .map(Option::unwrap_or_default)
        };
        emulator_args.start_after = duration("--start-after", &args.start_after)?;
        emulator_args.delay = duration("--delay", &args.delay)?;
        vlm_testkit::run_emulator(emulator_args)
            .await
            .map_err(|message| Failure {
                exit: Exit::Usage,
                message,
            })?;
        Ok(Exit::Ok)
    }
}

#[cfg(not(feature = "emulate"))]
mod imp {
    use super::{Exit, Failure, Serve, VlmBackend};

    /// No emulator in this build: a type with no values.
    #[derive(Debug)]
    pub enum Emulator {}

    fn not_built() -> Failure {
        Failure::usage(
            "this vlm was built without the built-in emulator; rebuild it with `--features \
             emulate` (on by default), or start a server and point --vlm-base-url at it",
        )
    }

    /// Refuses: the emulator is not compiled in.
    pub async fn start(_: VlmBackend, _: Option<String>) -> Result<Emulator, Failure> {
        Err(not_built())
    }

    /// Unreachable: no emulator can exist in this build.
    pub fn base_url(emulator: &Emulator) -> String {
        match *emulator {}
    }

    /// Refuses: the emulator is not compiled in.
    pub async fn serve(_: Serve) -> Result<Exit, Failure> {
        Err(not_built())
    }
}

pub use imp::{Emulator, base_url, serve, start};
