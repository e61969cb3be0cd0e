//! The `herald` command: parse flags and environment, then serve or mint a token.

use clap::Parser;
use herald::config::{Cli, Command, JwtKey};

fn main() {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.server.log).unwrap_or_else(|_| {
        eprintln!("herald: error: HERALD_LOG `{}` is not a valid log filter", cli.server.log);
        std::process::exit(2)
    });
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let config = cli.server.into_config().unwrap_or_else(|e| fail(&e));
    match cli.command {
        Some(Command::Token(args)) => {
            let JwtKey::Secret(secret) = &config.jwt_key else {
                fail("`herald token` signs HS256 tokens: set HERALD_JWT_SECRET (a public key cannot sign)")
            };
            if config.dev_mode {
                fail("`herald token` needs HERALD_JWT_SECRET: without it every run has a new random secret");
            }
            let token = herald::auth::mint(secret, &args.sub, args.ttl, &args.topics, args.scope.as_deref());
            println!("{token}");
        }
        None => {
            if let Err(e) = herald::server::run(config) {
                fail(&e)
            }
        }
    }
}

fn fail(message: &str) -> ! {
    eprintln!("herald: error: {message}");
    std::process::exit(2)
}
