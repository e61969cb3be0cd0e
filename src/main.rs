//! The `herald` command: parse flags and environment, then serve or mint a token.

use herald::config::{Cli, Command, JwtKey};
use tracing::{debug, warn};

fn main() {
    let cli = Cli::parse_with_sources(std::env::args_os()).unwrap_or_else(|e| {
        use clap::error::ErrorKind;
        if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
            let _ = e.print();
            std::process::exit(0);
        }
        // One line for the operator (clap's own rendering adds a usage hint).
        let rendered = e.to_string();
        let first = rendered.lines().next().unwrap_or("invalid arguments");
        let first = first.strip_prefix("error: ").unwrap_or(first);
        // Name the variable too: most settings arrive through the environment.
        let variable = first
            .split("'--")
            .nth(1)
            .and_then(|rest| rest.split([' ', '\'']).next())
            .and_then(env_of_flag)
            .map(|name| format!(" ({name})"));
        fail(&format!("{first}{}", variable.unwrap_or_default()))
    });
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
    for warning in &config.warnings {
        warn!("{warning}");
    }
    // Debug of Config redacts every secret it holds.
    debug!(?config, "configuration");
    match cli.command {
        Some(Command::Token(args)) => {
            let JwtKey::Secret(secret) = &config.jwt_key else {
                fail("`herald token` signs HS256 tokens: set HERALD_JWT_SECRET (a public key cannot sign)")
            };
            if config.dev_mode {
                fail("`herald token` needs HERALD_JWT_SECRET: without it every run has a new random secret");
            }
            let spec = herald::auth::TokenSpec {
                sub: &args.sub,
                ttl: args.ttl,
                topics: &args.topics,
                scope: args.scope.as_deref(),
                audience: config.jwt_audience.as_deref(),
                issuer: config.jwt_issuer.as_deref(),
            };
            println!("{}", herald::auth::mint_token(secret, &spec));
        }
        None => {
            if let Err(e) = herald::server::run(config) {
                fail(&e)
            }
        }
    }
}

/// The environment variable behind `--flag`, if it has one (`herald token`'s own flags do not).
fn env_of_flag(flag: &str) -> Option<String> {
    use clap::CommandFactory;
    let command = Cli::command();
    let found = command
        .get_arguments()
        .chain(command.get_subcommands().flat_map(|sub| sub.get_arguments()))
        .find(|arg| arg.get_long() == Some(flag))?;
    found.get_env().map(|name| name.to_string_lossy().into_owned())
}

fn fail(message: &str) -> ! {
    eprintln!("herald: error: {message}");
    std::process::exit(2)
}
