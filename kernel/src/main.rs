//! `notebookos-kernel -f {connection_file}`: the kernel Jupyter launches.

use std::path::PathBuf;

use anyhow::{bail, Context};

use notebookos_kernel::{connection::ConnectionInfo, kernel, replica, signals};

fn main() -> anyhow::Result<()> {
    // Before any thread exists, so every later thread inherits the mask.
    signals::block_sigint_in_this_thread().context("blocking SIGINT")?;
    signals::ignore_sigint();

    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NOTEBOOKOS_LOG")
                // openraft logs every transient RPC timeout at ERROR; replica health is
                // reported by our own warnings instead.
                .unwrap_or_else(|_| "warn,openraft=off".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("notebookos-io")
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let mut argv = std::env::args().skip(1).peekable();
    if argv.peek().map(String::as_str) == Some("agent") {
        argv.next();
        let opts = agent_options(argv)?;
        runtime.block_on(notebookos_kernel::agent::run(opts))?;
        return Ok(());
    }
    if argv.peek().map(String::as_str) == Some("replica") {
        argv.next();
        let bootstrap = match (argv.next().as_deref(), argv.next()) {
            (Some("--bootstrap"), Some(path)) => PathBuf::from(path),
            _ => bail!("usage: notebookos-kernel replica --bootstrap FILE"),
        };
        let code = runtime.block_on(replica::peer::run(&bootstrap))?;
        std::process::exit(code)
    }
    let args = Args::parse(argv)?;
    let info = ConnectionInfo::from_file(&args.connection_file)?;
    let replicas = match std::env::var("NOTEBOOKOS_REPLICAS") {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("NOTEBOOKOS_REPLICAS={v:?} is not a number"))?,
        Err(_) => 3,
    };
    let start = kernel::StartOptions {
        connection_file: args.connection_file,
        argv: args.passthrough,
        replicas,
    };
    let code = runtime.block_on(kernel::run(info, start))?;
    // Python is never finalised from another thread: exit directly, after
    // the shell ran its own shutdown (history, atexit) on its thread.
    std::process::exit(code)
}

/// `agent [--socket PATH] [--fake-gpus N] [--metrics ADDR]`.
fn agent_options(
    args: impl Iterator<Item = String>,
) -> anyhow::Result<notebookos_kernel::agent::AgentOptions> {
    let mut opts = notebookos_kernel::agent::AgentOptions {
        socket: notebookos_kernel::agent::default_socket(),
        fake_gpus: None,
        metrics: None,
    };
    let mut args = args;
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--socket" => opts.socket = PathBuf::from(value()?),
            "--fake-gpus" => opts.fake_gpus = Some(value()?.parse().context("--fake-gpus N")?),
            "--metrics" => opts.metrics = Some(value()?),
            other => bail!("usage: notebookos-kernel agent [--socket PATH] [--fake-gpus N] [--metrics ADDR] (unknown {other})"),
        }
    }
    Ok(opts)
}

struct Args {
    connection_file: PathBuf,
    /// Unknown options (`--HistoryManager.hist_file=:memory:` and the like)
    /// are accepted and handed to IPython as traitlets configuration, as
    /// ipykernel does.
    passthrough: Vec<String>,
}

impl Args {
    fn parse(args: impl Iterator<Item = String>) -> anyhow::Result<Self> {
        let mut connection_file = None;
        let mut passthrough = Vec::new();
        let mut args = args.peekable();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "-f" | "--f" | "--connection-file" => {
                    connection_file = args.next().map(PathBuf::from);
                }
                "-h" | "--help" => {
                    println!(
                        "usage: notebookos-kernel -f CONNECTION_FILE [--Class.trait=value ...]"
                    );
                    std::process::exit(0);
                }
                "--version" => {
                    println!("notebookos-kernel {}", env!("CARGO_PKG_VERSION"));
                    std::process::exit(0);
                }
                other => {
                    if let Some(v) = other.strip_prefix("--f=").or(other.strip_prefix("-f=")) {
                        connection_file = Some(PathBuf::from(v));
                    } else {
                        passthrough.push(other.to_owned());
                    }
                }
            }
        }
        let Some(connection_file) = connection_file else {
            bail!("missing -f CONNECTION_FILE (usage: notebookos-kernel -f CONNECTION_FILE)");
        };
        Ok(Self {
            connection_file,
            passthrough,
        })
    }
}
