//! `notebookos-kernel -f {connection_file}`: the kernel Jupyter launches, and
//! the subcommands of a cluster (agent, cluster, simulate). The program's
//! entry, whether it runs as its own binary or inside the Python that
//! launched it (the wheel's extension module, [`crate::extension`]).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::{connection::ConnectionInfo, kernel, replica, signals};

#[derive(Parser)]
#[command(
    name = "notebookos-kernel",
    version,
    about = "A replicated Jupyter kernel for Python that binds GPUs only while a cell runs",
    after_help = "Jupyter starts the kernel as `notebookos-kernel -f {connection_file}` (see the \
                  kernelspec); options it does not know, such as --Class.trait=value or \
                  --profile=NAME, configure IPython as they do under ipykernel.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    launch: Launch,
}

/// What Jupyter passes when it starts the kernel.
#[derive(Args)]
struct Launch {
    /// The connection file Jupyter wrote.
    #[arg(
        short = 'f',
        long = "connection-file",
        visible_alias = "f",
        value_name = "FILE"
    )]
    connection_file: Option<PathBuf>,
    /// IPython configuration, handed to every replica as ipykernel hands it to IPython.
    #[arg(value_name = "IPYTHON_OPTION", allow_hyphen_values = true)]
    ipython: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// The per-host agent: accounts this server's GPUs and grants them to cells.
    Agent(AgentArgs),
    /// Cluster administration.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Replays a workload through the placement policy and its baselines.
    Simulate(Box<SimulateArgs>),
    /// A peer replica (started by replica 1 or an agent, never by hand).
    #[command(hide = true)]
    Replica {
        #[arg(long, value_name = "FILE")]
        bootstrap: PathBuf,
    },
}

#[derive(Args)]
struct AgentArgs {
    /// The Unix socket kernels on this host ask for GPUs on.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Pretend this host has N GPUs (tests, and hosts without a CUDA driver).
    #[arg(long, value_name = "N")]
    fake_gpus: Option<u32>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Serve the cluster control protocol, as the server --name of this cluster file.
    #[arg(long, value_name = "FILE", requires = "name")]
    cluster: Option<PathBuf>,
    /// This server's name in the cluster file.
    #[arg(long, value_name = "SERVER", requires = "cluster")]
    name: Option<String>,
    /// How long replicas started here outlive their kernel's replica 1 [default: 60].
    #[arg(long, value_name = "SECONDS", value_parser = seconds)]
    rejoin_grace: Option<Duration>,
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Writes a new cluster CA (certificate and key) to FILE.
    NewCa {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Prints every agent's inventory as JSON.
    Status {
        #[arg(value_name = "CONFIG")]
        config: PathBuf,
        /// The address to call the agents from.
        #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
        from: IpAddr,
    },
    /// Adds and removes servers as the policy asks, by running shell commands.
    Autoscale(AutoscaleArgs),
}

#[derive(Args)]
struct AutoscaleArgs {
    #[arg(value_name = "CONFIG")]
    config: PathBuf,
    /// Shell command that adds a server.
    #[arg(long, value_name = "CMD")]
    add: String,
    /// Shell command that removes a server (its name in $NOTEBOOKOS_SERVER).
    #[arg(long, value_name = "CMD")]
    remove: String,
    /// How often to look.
    #[arg(long, value_name = "SECONDS", value_parser = seconds, default_value = "30")]
    every: Duration,
    /// No new scale-out this soon after one.
    #[arg(long, value_name = "SECONDS", value_parser = seconds, default_value = "300")]
    cooldown: Duration,
    /// Idle GPUs to keep (over the config's policy).
    #[arg(long, value_name = "GPUS")]
    headroom: Option<u32>,
    /// Remove a server idle this long (over the config's policy).
    #[arg(long, value_name = "SECONDS", value_parser = seconds)]
    scale_in_after: Option<Duration>,
    /// Remove nothing this soon after a scale-out (over the config's policy).
    #[arg(long, value_name = "SECONDS", value_parser = seconds)]
    scale_in_cooldown: Option<Duration>,
    /// The address to call the agents from.
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    from: IpAddr,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("workload").required(true).args(["trace", "csv", "synthetic"])))]
struct SimulateArgs {
    /// A session trace (JSON, as in ../shared/traces).
    #[arg(long, value_name = "SESSIONS.json")]
    trace: Option<PathBuf>,
    /// An event trace (CSV).
    #[arg(long, value_name = "EVENTS.csv")]
    csv: Option<PathBuf>,
    /// N synthetic sessions.
    #[arg(long, value_name = "N")]
    synthetic: Option<usize>,
    #[arg(long, value_name = "N", default_value_t = 1)]
    seed: u64,
    /// Comma-separated: oracle, reservation, batch, notebookos-N (N replicas).
    #[arg(long, value_name = "MODES", value_delimiter = ',', value_parser = mode,
          default_value = "oracle,reservation,batch,notebookos-1,notebookos-3")]
    modes: Vec<crate::sim::Mode>,
    /// Also write the results (CSV, JSON) to this directory.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// The costs measured by the live benchmarks (bench/calibrate.py writes it);
    /// the options below override single numbers.
    #[arg(long, value_name = "FILE.json")]
    calibration: Option<PathBuf>,
    /// Only the busiest window of this many hours (most cells submitted).
    #[arg(long, value_name = "HOURS")]
    window_hours: Option<f64>,
    /// One Raft commit, in microseconds.
    #[arg(long, value_name = "N")]
    commit_us: Option<u64>,
    /// From asking for a server to its agent taking work.
    #[arg(long, value_name = "SECONDS")]
    scale_out_delay: Option<u64>,
    #[arg(long, value_name = "R")]
    subscription_ratio: Option<f64>,
    /// Idle GPUs the policy keeps.
    #[arg(long, value_name = "GPUS")]
    headroom: Option<u32>,
    /// Subscription room, in servers, left after a removal.
    #[arg(long, value_name = "SERVERS")]
    scale_in_room: Option<f64>,
    /// Servers kept with every GPU idle (for kernels that take a whole server).
    #[arg(long, value_name = "SERVERS")]
    idle_servers: Option<usize>,
    /// Add a server for --idle-servers only once too few were wholly idle this long.
    #[arg(long, value_name = "SECONDS", value_parser = seconds)]
    idle_server_grace: Option<Duration>,
    /// Scale out when demand passes this share of capacity.
    #[arg(long, value_name = "SHARE")]
    scale_out_at: Option<f64>,
    /// Scale in while demand stays under this share of what is left.
    #[arg(long, value_name = "SHARE")]
    scale_in_below: Option<f64>,
    /// A server must have run nothing this long before it is removed.
    #[arg(long, value_name = "SECONDS", value_parser = seconds)]
    scale_in_after: Option<Duration>,
    /// Remove nothing this soon after a scale-out.
    #[arg(long, value_name = "SECONDS", value_parser = seconds)]
    scale_in_cooldown: Option<Duration>,
    /// Remove nothing this soon after a scale-out for kernels that found no
    /// server with room.
    #[arg(long, value_name = "SECONDS", value_parser = seconds)]
    placement_cooldown: Option<Duration>,
    /// Replica moves per autoscaler round ahead of cells (0: none).
    #[arg(long, value_name = "N")]
    rebalance_moves: Option<usize>,
    /// Migrate a replica whose cell waited this long (more than 0: a cell
    /// that no server can take is looked at again this often).
    #[arg(long, value_name = "SECONDS", value_parser = positive_seconds)]
    migrate_after: Option<Duration>,
    /// State size of each CSV session.
    #[arg(long, value_name = "GB", default_value_t = 4.0)]
    csv_state_gb: f64,
}

fn seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

fn positive_seconds(s: &str) -> Result<Duration, String> {
    match seconds(s)? {
        d if d.is_zero() => Err("must be more than 0 seconds".into()),
        d => Ok(d),
    }
}

fn mode(s: &str) -> Result<crate::sim::Mode, String> {
    use crate::sim::Mode;
    match s.trim() {
        "oracle" => Ok(Mode::Oracle),
        "reservation" => Ok(Mode::Reservation),
        "batch" => Ok(Mode::Batch),
        other => other
            .strip_prefix("notebookos-")
            .and_then(|n| n.parse().ok())
            .filter(|&n| n >= 1)
            .map(|replicas| Mode::NotebookOs { replicas })
            .ok_or_else(|| {
                format!("unknown mode {other:?} (oracle, reservation, batch or notebookos-N)")
            }),
    }
}

/// Runs the program with `args` (the program's name first); returns its
/// exit status.
pub fn main(args: Vec<std::ffi::OsString>) -> i32 {
    let cli = Cli::parse_from(connection_file_first(args));
    match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("notebookos-kernel: {}", one_line(&e));
            1
        }
    }
}

/// The connection file, when `args` start a kernel with more than one replica.
pub fn replicated_kernel(args: Vec<std::ffi::OsString>) -> Option<PathBuf> {
    let cli = Cli::try_parse_from(connection_file_first(args)).ok()?;
    (cli.command.is_none() && replicas().ok()? > 1).then_some(cli.launch.connection_file?)
}

/// How many replicas a kernel runs: NOTEBOOKOS_REPLICAS, 3 by default.
fn replicas() -> anyhow::Result<usize> {
    match std::env::var("NOTEBOOKOS_REPLICAS") {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("NOTEBOOKOS_REPLICAS={v:?} is not a number")),
        Err(_) => Ok(3),
    }
}

/// The arguments with the connection file's option moved to the front: clap
/// takes every argument after the first IPython option as another one, and
/// Jupyter allows `-f {connection_file}` anywhere in a kernelspec's argv.
fn connection_file_first(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    // How many arguments the option takes up: `-f FILE` two, `-f=FILE` one.
    let taken = |a: &std::ffi::OsString| {
        let a = a.to_string_lossy();
        ["-f", "--f", "--connection-file"].iter().find_map(|f| {
            let rest = a.strip_prefix(f)?;
            match rest {
                "" => Some(2),
                _ if rest.starts_with('=') => Some(1),
                _ => None,
            }
        })
    };
    let subcommand = args.get(1).and_then(|a| a.to_str()).is_some_and(|a| {
        use clap::CommandFactory;
        a == "help" || Cli::command().find_subcommand(a).is_some()
    });
    if subcommand {
        return args;
    }
    let Some((at, n)) = args
        .iter()
        .enumerate()
        .skip(1)
        .find_map(|(at, a)| Some((at, taken(a)?)))
    else {
        return args;
    };
    let n = n.min(args.len() - at);
    let moved: Vec<_> = args.drain(at..at + n).collect();
    args.splice(1..1, moved);
    args
}

/// The error and its causes on one line, each cause once (many errors already
/// print their source in their own message).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

fn run(cli: Cli) -> anyhow::Result<()> {
    crate::libpython::hide_from_cells();
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

    if let Some(Command::Simulate(args)) = cli.command {
        return simulate(*args);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("notebookos-io")
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    match cli.command {
        Some(Command::Agent(args)) => {
            runtime.block_on(crate::agent::run(agent_options(args)))?;
        }
        Some(Command::Cluster(command)) => runtime.block_on(cluster(command))?,
        Some(Command::Replica { bootstrap }) => {
            let code = runtime.block_on(replica::peer::run(&bootstrap))?;
            std::process::exit(code)
        }
        Some(Command::Simulate(_)) => unreachable!("handled before the runtime starts"),
        None => {
            let Some(connection_file) = cli.launch.connection_file else {
                anyhow::bail!("missing -f CONNECTION_FILE (Jupyter passes it; see --help)");
            };
            let info = ConnectionInfo::from_file(&connection_file)?;
            let start = kernel::StartOptions {
                connection_file,
                argv: cli.launch.ipython,
                replicas: replicas()?,
            };
            let code = runtime.block_on(kernel::run(info, start))?;
            // Python is never finalised from another thread: exit directly, after
            // the shell ran its own shutdown (history, atexit) on its thread.
            std::process::exit(code)
        }
    }
    Ok(())
}

fn agent_options(args: AgentArgs) -> crate::agent::AgentOptions {
    use crate::agent::{default_socket, AgentOptions, ClusterMembership};
    AgentOptions {
        socket: args.socket.unwrap_or_else(default_socket),
        fake_gpus: args.fake_gpus,
        metrics: args.metrics,
        // clap makes --cluster and --name come together.
        cluster: args
            .cluster
            .zip(args.name)
            .map(|(config, name)| ClusterMembership { config, name }),
        rejoin_grace: args
            .rejoin_grace
            .unwrap_or(crate::agent::reaper::REJOIN_GRACE),
    }
}

async fn cluster(command: ClusterCommand) -> anyhow::Result<()> {
    use crate::cluster::{autoscale, client, config, provider::ShellProvider};
    match command {
        ClusterCommand::NewCa { file } => config::write_new_ca(&file)?,
        ClusterCommand::Status { config: file, from } => {
            let cfg = config::ClusterConfig::load(&file)?;
            let cluster = client::ClusterClient::new(cfg, SocketAddr::new(from, 0))?;
            let inventories = cluster.inventories().await;
            println!("{}", serde_json::to_string_pretty(&inventories)?);
        }
        ClusterCommand::Autoscale(a) => {
            let opts = autoscale::AutoscaleOptions {
                config: a.config,
                from: SocketAddr::new(a.from, 0),
                every: a.every,
                cooldown: a.cooldown,
                headroom_gpus: a.headroom,
                scale_in_after: a.scale_in_after,
                scale_in_cooldown: a.scale_in_cooldown,
            };
            let provider = ShellProvider {
                add: a.add,
                remove: a.remove,
            };
            autoscale::run(opts, Box::new(provider)).await?;
        }
    }
    Ok(())
}

fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    use crate::cluster::policy::Policy;
    use crate::sim::{self, calibration::Calibration, workload::Workload, Costs};

    let mut policy = Policy::default();
    let mut costs = match &args.calibration {
        Some(path) => Calibration::load(path)?.costs(),
        None => Costs::default(),
    };
    if let Some(us) = args.commit_us {
        costs.commit_us = us;
    }
    if let Some(secs) = args.scale_out_delay {
        costs.scale_out_delay = secs * 1000;
    }
    if let Some(r) = args.subscription_ratio {
        policy.subscription_ratio = r;
    }
    if let Some(gpus) = args.headroom {
        policy.headroom_gpus = gpus;
    }
    if let Some(room) = args.scale_in_room {
        policy.scale_in_room = room;
    }
    if let Some(n) = args.idle_servers {
        policy.idle_servers = n;
    }
    if let Some(grace) = args.idle_server_grace {
        policy.idle_server_grace = grace;
    }
    if let Some(share) = args.scale_out_at {
        policy.scale_out_at = share;
    }
    if let Some(share) = args.scale_in_below {
        policy.scale_in_below = share;
    }
    if let Some(after) = args.scale_in_after {
        policy.scale_in_after = after;
    }
    if let Some(cooldown) = args.scale_in_cooldown {
        policy.scale_in_cooldown = cooldown;
    }
    if let Some(cooldown) = args.placement_cooldown {
        policy.placement_cooldown = cooldown;
    }
    if let Some(n) = args.rebalance_moves {
        policy.rebalance_moves = n;
    }
    if let Some(after) = args.migrate_after {
        policy.migrate_after = after;
    }
    let workload = if let Some(path) = &args.trace {
        Workload::from_session_trace(path)?
    } else if let Some(path) = &args.csv {
        Workload::from_event_csv(path, (args.csv_state_gb * 1e9) as u64)?
    } else {
        let sessions = args.synthetic.context("no workload given")?;
        let spec = sim::workload::Synthetic {
            sessions,
            ..Default::default()
        };
        Workload::synthetic(&spec, args.seed)
    };
    let workload = match args.window_hours {
        Some(hours) if hours.is_finite() && hours > 0.0 => {
            let len = (hours * 3_600_000.0) as u64;
            let start = workload.busiest_window(len, 60_000);
            workload.window(start, len)
        }
        Some(hours) => anyhow::bail!("--window-hours must be positive, not {hours}"),
        None => workload,
    };
    let outcomes = sim::run(&workload, &args.modes, &policy, &costs, args.seed);
    let rows = sim::report::summarize(&outcomes);
    print!("{}", sim::report::table(&workload, &rows));
    if let Some(dir) = args.out {
        sim::report::write(&dir, &workload, &outcomes, &rows)
            .with_context(|| format!("writing results to {}", dir.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// A command line: the program's name, then `args`.
    fn argv(args: &[&str]) -> Vec<std::ffi::OsString> {
        std::iter::once("notebookos-kernel")
            .chain(args.iter().copied())
            .map(Into::into)
            .collect()
    }

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn only_a_kernel_launch_asks_for_a_hash_seed() {
        // Replicated unless NOTEBOOKOS_REPLICAS says otherwise (the default is 3).
        let replicated = replicas().is_ok_and(|n| n > 1);
        assert_eq!(
            replicated_kernel(argv(&["--profile=p", "-f", "/run/k.json"])),
            replicated.then(|| PathBuf::from("/run/k.json"))
        );
        assert_eq!(
            replicated_kernel(argv(&["agent", "--fake-gpus", "2"])),
            None
        );
        assert_eq!(replicated_kernel(argv(&["--help"])), None);
        assert_eq!(replicated_kernel(argv(&["--profile=p"])), None);
    }

    #[test]
    fn ipython_options_pass_through_around_the_connection_file() {
        let launched = |args: &[&str]| connection_file_first(argv(args));
        let cli = Cli::try_parse_from(launched(&[
            "--HistoryManager.hist_file=:memory:",
            "--f=/run/k.json",
            "--some-unknown-flag",
            "--profile=p",
        ]))
        .unwrap();
        assert!(cli.command.is_none());
        assert_eq!(
            cli.launch.connection_file,
            Some(PathBuf::from("/run/k.json"))
        );
        assert_eq!(
            cli.launch.ipython,
            [
                "--HistoryManager.hist_file=:memory:",
                "--some-unknown-flag",
                "--profile=p"
            ]
        );
        let cli = Cli::try_parse_from(launched(&["--matplotlib=inline", "-f", "k.json"])).unwrap();
        assert_eq!(cli.launch.connection_file, Some(PathBuf::from("k.json")));
        assert_eq!(cli.launch.ipython, ["--matplotlib=inline"]);
        // A subcommand's arguments stay where they are.
        let parsed = Cli::try_parse_from(launched(&["simulate", "--synthetic", "1", "-f", "x"]));
        assert!(parsed.is_err());
    }

    #[test]
    fn subcommands_check_their_options() {
        for bad in [
            &["agent", "--cluster", "c.json"][..],
            &["agent", "--no-such-flag"],
            &["simulate"],
            &[
                "simulate",
                "--synthetic",
                "2",
                "--modes",
                "batch,notebookos-0",
            ],
            &["simulate", "--synthetic", "2", "--migrate-after", "0"],
            &["cluster", "autoscale", "c.json", "--add", "x"],
        ] {
            assert!(Cli::try_parse_from(argv(bad)).is_err(), "{bad:?} parsed");
        }
        let cli = Cli::try_parse_from([
            "notebookos-kernel",
            "simulate",
            "--synthetic",
            "2",
            "--modes",
            "batch,notebookos-3",
            "--migrate-after",
            "1.5",
        ])
        .unwrap();
        let Some(Command::Simulate(args)) = cli.command else {
            panic!("not simulate")
        };
        assert_eq!(
            args.modes,
            [
                crate::sim::Mode::Batch,
                crate::sim::Mode::NotebookOs { replicas: 3 }
            ]
        );
        assert_eq!(args.migrate_after, Some(Duration::from_millis(1500)));
    }

    #[test]
    fn an_error_and_its_causes_print_on_one_line_each_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let e = anyhow::Error::new(io)
            .context("reading x: gone")
            .context("starting");
        assert_eq!(one_line(&e), "starting: reading x: gone");
    }
}
