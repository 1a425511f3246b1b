//! `vlm-emulator --backend vllm|lmdeploy|triton [--port P] [--model M] [--api-key K]`

use std::process::ExitCode;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("vlm_testkit=debug,warn")),
        )
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match vlm_testkit::parse_emulator_args(&args) {
        Ok(parsed) => parsed,
        Err(message) if args.iter().any(|a| a == "-h" || a == "--help") => {
            println!("{message}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("vlm-emulator: {message}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vlm-emulator: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(vlm_testkit::run_emulator(parsed)) {
        Ok(()) => ExitCode::SUCCESS,
        // A busy port or a bad address: a configuration error, as `vlm emulate` reports it.
        Err(message) => {
            eprintln!("vlm-emulator: {message}");
            ExitCode::from(2)
        }
    }
}
