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

    let mut argv = std::env::args().skip(1).peekable();
    if argv.peek().map(String::as_str) == Some("simulate") {
        argv.next();
        return simulate(argv);
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("notebookos-io")
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    if argv.peek().map(String::as_str) == Some("agent") {
        argv.next();
        let opts = agent_options(argv)?;
        runtime.block_on(notebookos_kernel::agent::run(opts))?;
        return Ok(());
    }
    if argv.peek().map(String::as_str) == Some("cluster") {
        argv.next();
        return runtime.block_on(cluster_command(argv));
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

/// `agent [--socket PATH] [--fake-gpus N] [--metrics ADDR] [--cluster FILE --name SERVER
/// [--rejoin-grace SECONDS]]`.
fn agent_options(
    args: impl Iterator<Item = String>,
) -> anyhow::Result<notebookos_kernel::agent::AgentOptions> {
    let mut opts = notebookos_kernel::agent::AgentOptions {
        socket: notebookos_kernel::agent::default_socket(),
        fake_gpus: None,
        metrics: None,
        cluster: None,
        rejoin_grace: notebookos_kernel::agent::reaper::REJOIN_GRACE,
    };
    let (mut cluster, mut name) = (None, None);
    let mut args = args;
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--socket" => opts.socket = PathBuf::from(value()?),
            "--fake-gpus" => opts.fake_gpus = Some(value()?.parse().context("--fake-gpus N")?),
            "--metrics" => opts.metrics = Some(value()?),
            "--cluster" => cluster = Some(PathBuf::from(value()?)),
            "--name" => name = Some(value()?),
            "--rejoin-grace" => {
                let secs: f64 = value()?.parse().context("--rejoin-grace SECONDS")?;
                opts.rejoin_grace = std::time::Duration::try_from_secs_f64(secs)
                    .context("--rejoin-grace SECONDS")?;
            }
            other => bail!("usage: notebookos-kernel agent [--socket PATH] [--fake-gpus N] [--metrics ADDR] [--cluster FILE --name SERVER [--rejoin-grace SECONDS]] (unknown {other})"),
        }
    }
    opts.cluster = match (cluster, name) {
        (Some(config), Some(name)) => {
            Some(notebookos_kernel::agent::ClusterMembership { config, name })
        }
        (None, None) => None,
        _ => bail!("--cluster FILE and --name SERVER go together"),
    };
    Ok(opts)
}

const CLUSTER_USAGE: &str =
    "usage: notebookos-kernel cluster (new-ca FILE | status CONFIG [--from IP] \
| autoscale CONFIG --add CMD --remove CMD [--every SECONDS] [--cooldown SECONDS] \
[--headroom GPUS] [--scale-in-after SECONDS] [--from IP])";

/// `cluster new-ca FILE`: a cluster CA; `cluster status CONFIG`: every
/// agent's inventory, as JSON.
async fn cluster_command(mut args: impl Iterator<Item = String>) -> anyhow::Result<()> {
    use notebookos_kernel::cluster::{client, config};
    match (args.next().as_deref(), args.next()) {
        (Some("new-ca"), Some(file)) => {
            config::write_new_ca(std::path::Path::new(&file))?;
            Ok(())
        }
        (Some("status"), Some(file)) => {
            let from: std::net::IpAddr = match (args.next().as_deref(), args.next()) {
                (Some("--from"), Some(ip)) => ip.parse().context("--from IP")?,
                (None, _) => "127.0.0.1".parse()?,
                _ => bail!("{CLUSTER_USAGE}"),
            };
            let cfg = config::ClusterConfig::load(std::path::Path::new(&file))?;
            let cluster = client::ClusterClient::new(cfg, std::net::SocketAddr::new(from, 0))?;
            let inventories = cluster.inventories().await;
            println!("{}", serde_json::to_string_pretty(&inventories)?);
            Ok(())
        }
        (Some("autoscale"), Some(file)) => {
            use notebookos_kernel::cluster::{autoscale, provider::ShellProvider};
            use std::time::Duration;
            let secs = |v: String, flag: &str| -> anyhow::Result<Duration> {
                Ok(Duration::from_secs_f64(
                    v.parse().with_context(|| format!("{flag} SECONDS"))?,
                ))
            };
            let mut opts = autoscale::AutoscaleOptions {
                config: PathBuf::from(file),
                from: "127.0.0.1:0".parse()?,
                every: Duration::from_secs(30),
                cooldown: Duration::from_secs(300),
                headroom_gpus: None,
                scale_in_after: None,
            };
            let (mut add, mut remove) = (None, None);
            while let Some(flag) = args.next() {
                let value = args
                    .next()
                    .with_context(|| format!("{flag} needs a value\n{CLUSTER_USAGE}"))?;
                match flag.as_str() {
                    "--add" => add = Some(value),
                    "--remove" => remove = Some(value),
                    "--every" => opts.every = secs(value, "--every")?,
                    "--cooldown" => opts.cooldown = secs(value, "--cooldown")?,
                    "--scale-in-after" => {
                        opts.scale_in_after = Some(secs(value, "--scale-in-after")?)
                    }
                    "--headroom" => {
                        opts.headroom_gpus = Some(value.parse().context("--headroom GPUS")?)
                    }
                    "--from" => {
                        opts.from =
                            std::net::SocketAddr::new(value.parse().context("--from IP")?, 0)
                    }
                    _ => bail!("unknown option {flag}\n{CLUSTER_USAGE}"),
                }
            }
            let (Some(add), Some(remove)) = (add, remove) else {
                bail!("autoscale needs --add CMD and --remove CMD\n{CLUSTER_USAGE}");
            };
            autoscale::run(opts, Box::new(ShellProvider { add, remove })).await?;
            Ok(())
        }
        _ => bail!("{CLUSTER_USAGE}"),
    }
}

const SIMULATE_USAGE: &str = "usage: notebookos-kernel simulate \
(--trace SESSIONS.json | --csv EVENTS.csv | --synthetic N) [--seed N] \
[--modes reservation,batch,notebookos-1,notebookos-3] [--out DIR] [--commit-us N] \
[--scale-out-delay SECONDS] [--subscription-ratio R] [--headroom GPUS] \
[--migrate-after SECONDS] [--csv-state-gb GB]";

/// `simulate ...`: replays a workload through the policy and the baselines.
fn simulate(args: impl Iterator<Item = String>) -> anyhow::Result<()> {
    use notebookos_kernel::cluster::policy::Policy;
    use notebookos_kernel::sim::{self, workload::Workload, Costs, Mode};
    use std::time::Duration;

    enum Source {
        Trace(PathBuf),
        Csv(PathBuf),
        Synthetic(usize),
    }
    let mut source = None;
    let mut seed = 1u64;
    let mut modes = vec![
        Mode::Reservation,
        Mode::Batch,
        Mode::NotebookOs { replicas: 1 },
        Mode::NotebookOs { replicas: 3 },
    ];
    let mut out = None;
    let mut policy = Policy::default();
    let mut costs = Costs::default();
    let mut csv_state_gb = 4.0f64;
    let mut args = args;
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{arg} needs a value\n{SIMULATE_USAGE}"))
        };
        match arg.as_str() {
            "--trace" => source = Some(Source::Trace(value()?.into())),
            "--csv" => source = Some(Source::Csv(value()?.into())),
            "--synthetic" => {
                source = Some(Source::Synthetic(
                    value()?.parse().context("--synthetic N")?,
                ))
            }
            "--seed" => seed = value()?.parse().context("--seed N")?,
            "--out" => out = Some(PathBuf::from(value()?)),
            "--commit-us" => costs.commit_us = value()?.parse().context("--commit-us N")?,
            "--scale-out-delay" => {
                costs.scale_out_delay = value()?
                    .parse::<u64>()
                    .context("--scale-out-delay SECONDS")?
                    * 1000
            }
            "--subscription-ratio" => {
                policy.subscription_ratio = value()?.parse().context("--subscription-ratio R")?
            }
            "--headroom" => policy.headroom_gpus = value()?.parse().context("--headroom GPUS")?,
            "--migrate-after" => {
                policy.migrate_after =
                    Duration::from_secs_f64(value()?.parse().context("--migrate-after SECONDS")?)
            }
            "--csv-state-gb" => csv_state_gb = value()?.parse().context("--csv-state-gb GB")?,
            "--modes" => {
                modes = value()?
                    .split(',')
                    .map(|m| match m.trim() {
                        "reservation" => Ok(Mode::Reservation),
                        "batch" => Ok(Mode::Batch),
                        other => other
                            .strip_prefix("notebookos-")
                            .and_then(|n| n.parse().ok())
                            .filter(|&n| n >= 1)
                            .map(|replicas| Mode::NotebookOs { replicas })
                            .with_context(|| format!("unknown mode {other:?}\n{SIMULATE_USAGE}")),
                    })
                    .collect::<anyhow::Result<_>>()?
            }
            other => bail!("unknown option {other}\n{SIMULATE_USAGE}"),
        }
    }
    let workload = match source {
        Some(Source::Trace(path)) => Workload::from_session_trace(&path)?,
        Some(Source::Csv(path)) => Workload::from_event_csv(&path, (csv_state_gb * 1e9) as u64)?,
        Some(Source::Synthetic(n)) => Workload::synthetic(
            &sim::workload::Synthetic {
                sessions: n,
                ..Default::default()
            },
            seed,
        ),
        None => bail!("no workload given\n{SIMULATE_USAGE}"),
    };
    let outcomes = sim::run(&workload, &modes, &policy, &costs, seed);
    let rows = sim::report::summarize(&outcomes);
    print!("{}", sim::report::table(&workload, &rows));
    if let Some(dir) = out {
        sim::report::write(&dir, &workload, &outcomes, &rows)
            .with_context(|| format!("writing results to {}", dir.display()))?;
    }
    Ok(())
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
