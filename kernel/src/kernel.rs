//! The kernel: binds the channels, starts Python, and answers requests.
//!
//! Shell requests are served one at a time in arrival order (as ipykernel
//! does); control requests are served concurrently with them, so
//! kernel_info, interrupt and shutdown work while a cell runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pyo3::types::PyAnyMethods;
use serde::{de::DeserializeOwned, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use crate::channels::iopub::Iopub;
use crate::channels::stdin::Stdin;
use crate::channels::{control, heartbeat, iopub, router, shell, Backends, Session};
use crate::connection::{Channel, ConnectionInfo};
use crate::python::{Bridge, Executor, PythonError, PythonRuntime};
use crate::replica::lock;
use crate::replica::{self, CellResult, Front};
use crate::wire::{
    self, comm, complete, execute, history, inspect, is_complete, kernel_info, shutdown, subshell,
};
use crate::wire::{status::ExecutionState, Message, Outgoing, Signer};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    #[error(transparent)]
    Channel(#[from] crate::channels::ChannelError),
    #[error(transparent)]
    Python(#[from] PythonError),
    #[error("cannot create the directory for the kernel's inner sockets: {0}")]
    Backends(#[source] std::io::Error),
}

/// Where a request runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Main-shell cells: through the replica group, when there is one.
    Group,
    /// Subshell and control-channel requests run on the executor given,
    /// outside the log, as ipykernel runs them beside the main shell.
    Subshell,
    Control,
}

impl Route {
    pub fn for_shell(request: &Message) -> Self {
        match request.header.subshell_id {
            None => Route::Group,
            Some(_) => Route::Subshell,
        }
    }
}

/// What a handled request asks of the channel loop afterwards.
#[derive(Debug, Default)]
pub struct Outcome {
    pub reply: Option<Outgoing>,
    /// An execute failed with stop_on_error: abort queued executes.
    pub abort_queue: bool,
    pub shutdown: bool,
}

impl Outcome {
    /// A request answered with a reply and nothing more.
    pub fn reply(reply: Outgoing) -> Self {
        Self {
            reply: Some(reply),
            ..Default::default()
        }
    }
}

pub struct Kernel {
    pub session: Arc<Session>,
    pub iopub: Iopub,
    pub shell_sink: shell::Sink,
    python: Arc<PythonRuntime>,
    /// The replica group, once formed; `None` inside with a single replica.
    group: std::sync::OnceLock<Option<Arc<Front>>>,
    group_known: watch::Sender<bool>,
    connection: ConnectionInfo,
    shutdown: watch::Sender<bool>,
    subshells: Mutex<HashMap<String, mpsc::Sender<Message>>>,
    /// The main-shell execute request being served (its msg_id).
    shell_cell: Mutex<Option<String>>,
    /// The Python thread of code sent on the control channel, once some is.
    control_exec: std::sync::OnceLock<Executor>,
    /// The newest request served on control: cells see it as their
    /// `get_parent("control")`, on whichever replica they run.
    last_control: Mutex<Option<Message>>,
    /// Why replicas were asked for and this kernel runs alone: told under
    /// the first cell, since a log line is not where a user looks.
    alone_because: Mutex<Option<String>>,
}

/// How the kernel was started: the connection file and the options meant
/// for IPython.
pub struct StartOptions {
    pub connection_file: std::path::PathBuf,
    pub argv: Vec<String>,
    /// Replicas in the group (`NOTEBOOKOS_REPLICAS`); 1 is the single-process kernel.
    pub replicas: usize,
}

pub async fn run(info: ConnectionInfo, start: StartOptions) -> Result<i32, KernelError> {
    let signer = Signer::new(&info.signature_scheme, info.key.as_bytes())?;
    let session = Session::new(signer);

    let backends = Backends::create().map_err(KernelError::Backends)?;
    let (iopub, publisher) =
        iopub::bind(&info.endpoint(Channel::Iopub), &backends, session.clone()).await?;
    tokio::spawn(publisher.run());
    let hb = heartbeat::bind(&info.endpoint(Channel::Heartbeat), &backends).await?;
    tokio::spawn(heartbeat::serve(hb));
    let stdin = Stdin::bind(&info.endpoint(Channel::Stdin), &backends, session.clone()).await?;
    let (shell_sink, shell_recv) =
        router::bind("shell", &info.endpoint(Channel::Shell), &backends).await?;
    let (control_sink, control_recv) =
        router::bind("control", &info.endpoint(Channel::Control), &backends).await?;

    let mut alone_because = None;
    let plan = match start.replicas {
        0 | 1 => None,
        n => match replica::front::Plan::new(&start.connection_file, n) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::error!("cannot prepare replicas, running as a single replica: {e}");
                alone_because = Some(alone_notice(&e.to_string(), false));
                None
            }
        },
    };
    let bridge = Bridge::install(iopub.clone(), stdin.clone());
    // With replicas, a SIGINT (signal-mode interrupt) must also reach a cell
    // running on another replica: Python reports every signal on this pipe.
    let wakeup = match plan {
        Some(_) => crate::signals::wakeup_pipe()
            .map_err(|e| tracing::warn!("no SIGINT forwarding to replicas: {e}"))
            .ok(),
        None => None,
    };
    let options = json!({
        "argv": start.argv,
        "connection_file": start.connection_file.display().to_string(),
        "sigint_wakeup_fd": wakeup.as_ref().map(|(_, w)| std::os::fd::AsRawFd::as_raw_fd(w)),
    });
    let hash_seed = plan.as_ref().map(|p| p.hash_seed);
    let python = Arc::new(tokio::task::block_in_place(|| {
        PythonRuntime::start(bridge.clone(), options, hash_seed)
    })?);
    tracing::info!(python = %python.versions().python, "kernel started");

    let (shutdown_tx, mut shutdown_rx) = watch::channel(false);
    let kernel = Arc::new(Kernel {
        session: session.clone(),
        iopub: iopub.clone(),
        shell_sink: Arc::new(tokio::sync::Mutex::new(shell_sink)),
        python,
        group: std::sync::OnceLock::new(),
        group_known: watch::channel(false).0,
        connection: info,
        shutdown: shutdown_tx,
        subshells: Mutex::new(HashMap::new()),
        shell_cell: Mutex::new(None),
        control_exec: std::sync::OnceLock::new(),
        last_control: Mutex::new(None),
        alone_because: Mutex::new(alone_because),
    });
    iopub.status(None, ExecutionState::Starting).await;
    if let Some((read, write)) = wakeup {
        // Python holds the write end for the life of the process.
        std::mem::forget(write);
        let kernel = kernel.clone();
        crate::signals::watch_sigint(read, move || {
            if let Some(Some(front)) = kernel.group.get() {
                front.core().forward_interrupt();
            }
        });
    }
    match plan {
        None => {
            kernel.set_group(None);
        }
        Some(plan) => {
            // Forms in the background: kernel_info is answered meanwhile, and
            // requests that need the group wait for it.
            let kernel = kernel.clone();
            let (session, argv) = (session.clone(), start.argv.clone());
            tokio::spawn(async move {
                let interrupter = kernel.python.clone();
                let opts = replica::front::FrontOptions {
                    exec: kernel.python.main().clone(),
                    iopub: kernel.iopub.clone(),
                    stdin,
                    session,
                    interrupt: Box::new(move |cell| interrupter.interrupt(cell)),
                    argv,
                    listen_ip: replica::front::default_listen_ip(),
                };
                let rejoining = plan.rejoins();
                let front = match replica::Front::start(plan, opts).await {
                    Ok(front) => {
                        bridge.set_group(front.clone());
                        Some(front)
                    }
                    Err(e) => {
                        tracing::error!(
                            "replicas could not start; running as a single replica: {e}"
                        );
                        *lock(&kernel.alone_because) =
                            Some(alone_notice(&e.to_string(), rejoining));
                        None
                    }
                };
                kernel.set_group(front);
            });
        }
    }

    let (shell_tx, shell_rx) = mpsc::channel(1024);
    tokio::spawn(router::pump("shell", shell_recv, session.clone(), shell_tx));
    let (main_tx, main_rx) = mpsc::channel(1024);
    let (comms_tx, comms_rx) = mpsc::channel(1024);
    tokio::spawn(shell::route(
        kernel.clone(),
        shell_rx,
        shell::Lanes {
            main: main_tx,
            comms: comms_tx,
        },
    ));
    for lane in [main_rx, comms_rx] {
        tokio::spawn(shell::serve(
            kernel.clone(),
            kernel.python.main().clone(),
            lane,
        ));
    }
    let (control_tx, control_rx) = mpsc::channel(64);
    tokio::spawn(router::pump(
        "control",
        control_recv,
        session.clone(),
        control_tx,
    ));
    tokio::spawn(control::serve(kernel.clone(), control_sink, control_rx));

    tokio::spawn(exit_with_parent(kernel.clone()));

    while !*shutdown_rx.borrow() {
        if shutdown_rx.changed().await.is_err() {
            break;
        }
    }
    if let Some(Some(front)) = kernel.group.get() {
        front.stop().await;
    }
    iopub.flush().await;
    Ok(0)
}

/// What the user is told when the replicas they asked for are not there.
fn alone_notice(error: &str, rejoining: bool) -> String {
    match rejoining {
        true => format!(
            "notebookos: this kernel restarted but could not rejoin its surviving replicas \
             ({error}). It runs as a single replica with a new, empty namespace: the \
             variables they held are not here. Re-run the cells you need.\n"
        ),
        false => format!(
            "notebookos: the kernel's replicas could not start ({error}). It runs as a \
             single replica: cells run as usual, but nothing is replicated.\n"
        ),
    }
}

/// A kernel whose launcher died (Jupyter killed -9) would run forever with
/// nobody able to reach it; like ipykernel's parent poller, it exits when
/// it is re-parented.
async fn exit_with_parent(kernel: Arc<Kernel>) {
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        // SAFETY: as above.
        if unsafe { libc::getppid() } != parent {
            tracing::warn!("the process that launched the kernel is gone; exiting");
            kernel.finish_shutdown();
            return;
        }
    }
}

impl Kernel {
    pub fn reply<T: Serialize>(&self, request: &Message, content: &T) -> Outgoing {
        let reply_type = reply_type(&request.header.msg_type);
        Outgoing::typed(
            &reply_type,
            &self.session.id,
            Some(&request.header),
            content,
        )
        .to(&request.identities)
    }

    fn error_reply(&self, request: &Message, ename: &str, evalue: String) -> Outgoing {
        tracing::warn!(msg_type = %request.header.msg_type, "{ename}: {evalue}");
        self.reply(
            request,
            &json!({"status": "error", "ename": ename, "evalue": evalue, "traceback": []}),
        )
    }

    /// Answered once the shell can run code, as ipykernel is ready only
    /// then: a client that sends a cell (or an interrupt) when it sees the
    /// reply meets a kernel that runs it.
    pub async fn kernel_info(&self, request: &Message) -> Outgoing {
        self.python.started().await;
        let v = self.python.versions();
        self.reply(
            request,
            &kernel_info::KernelInfoReply::new(&v.python, &v.ipython),
        )
    }

    pub fn interrupt(self: &Arc<Self>) {
        if let Some(None) = self.group.get() {
            self.python.interrupt(self.shell_cell());
            return;
        }
        // With replicas the cell's submission may trail its request: the
        // group may still be forming, or the request not yet proposed. The
        // interrupt waits for it, as it would otherwise reach no cell.
        let kernel = self.clone();
        tokio::spawn(async move {
            let Some(front) = kernel.group().await else {
                kernel.python.interrupt(kernel.shell_cell());
                return;
            };
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
            while kernel.shell_cell().is_some()
                && !front.core().has_submissions()
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            front.core().interrupt_cell();
        });
    }

    /// Remembers a control request for the cells that follow (its buffers,
    /// if any, are not kept).
    pub fn note_control(&self, request: &Message) {
        let mut kept = request.clone();
        kept.buffers.clear();
        *lock(&self.last_control) = Some(kept);
    }

    /// Whether a main-shell cell is being served.
    pub fn cell_running(&self) -> bool {
        self.shell_cell().is_some()
    }

    /// The main-shell cell being served, if any.
    fn shell_cell(&self) -> Option<String> {
        lock(&self.shell_cell).clone()
    }

    /// Marks `request` as the main-shell cell being served until the guard
    /// drops (interrupts look for it).
    pub fn serving(&self, request: &Message) -> Option<Serving<'_>> {
        if request.header.msg_type != "execute_request" || request.header.subshell_id.is_some() {
            return None;
        }
        *lock(&self.shell_cell) = Some(request.header.msg_id.clone());
        Some(Serving(&self.shell_cell))
    }

    fn set_group(&self, group: Option<Arc<Front>>) {
        let _ = self.group.set(group);
        self.group_known.send_replace(true);
    }

    /// The replica group, once it is known whether there is one.
    async fn group(&self) -> Option<&Arc<Front>> {
        let mut known = self.group_known.subscribe();
        let _ = known.wait_for(|k| *k).await;
        self.group.get().and_then(Option::as_ref)
    }

    /// Serves one shell request on the given Python thread.
    pub async fn handle(&self, exec: &Executor, request: &Message, route: Route) -> Outcome {
        let msg_type = request.header.msg_type.as_str();
        match msg_type {
            "kernel_info_request" => Outcome::reply(self.kernel_info(request).await),
            "execute_request" => self.execute(exec, request, route).await,
            "complete_request" => {
                self.forward::<complete::CompleteRequest, complete::CompleteReply>(exec, request)
                    .await
            }
            "inspect_request" => {
                self.forward::<inspect::InspectRequest, inspect::InspectReply>(exec, request)
                    .await
            }
            "is_complete_request" => {
                self.forward::<is_complete::IsCompleteRequest, is_complete::IsCompleteReply>(
                    exec, request,
                )
                .await
            }
            "history_request" => {
                self.forward::<history::HistoryRequest, history::HistoryReply>(exec, request)
                    .await
            }
            "comm_info_request" => {
                self.forward::<comm::CommInfoRequest, comm::CommInfoReply>(exec, request)
                    .await
            }
            "comm_open" => self.notify::<comm::CommOpen>(exec, request).await,
            "comm_msg" => self.comm::<comm::CommMsg>(exec, request).await,
            "comm_close" => self.comm::<comm::CommClose>(exec, request).await,
            "shutdown_request" => self.shutdown(request).await,
            "connect_request" => Outcome::reply(self.reply(request, &self.connect_reply())),
            other => {
                tracing::warn!("unknown message type {other:?}, ignored");
                Outcome::default()
            }
        }
    }

    async fn execute(&self, exec: &Executor, request: &Message, route: Route) -> Outcome {
        let started = wire::now_iso8601();
        let parsed = match request.content_as::<execute::ExecuteRequest>() {
            Ok(r) => r,
            Err(e) => {
                return Outcome::reply(self.error_reply(request, "BadRequest", e.to_string()))
            }
        };
        tracing::debug!("execute: waiting for the group");
        let group = match route {
            Route::Group => self.group().await,
            Route::Subshell | Route::Control => None,
        };
        let (channel, control) = match route {
            Route::Control => (Channel::Control, None),
            _ => (Channel::Shell, lock(&self.last_control).clone()),
        };
        // Not under a silent cell (a front-end's own, whose output nobody sees).
        if matches!(route, Route::Group) && !parsed.silent {
            let notice = lock(&self.alone_because).take();
            if let Some(text) = notice {
                let parent = Some(request.header.clone());
                self.iopub.stream(parent, "stderr", &text).await;
            }
        }
        let json = match group {
            Some(front) => match front.execute(request, control.as_ref()).await {
                Ok(CellResult::Reply(json)) => Ok(Some(json)),
                Ok(CellResult::Lost { replica }) => {
                    return Outcome::reply(self.replica_lost(exec, request, replica).await)
                }
                Err(e) => Err(PythonError::Exception(format!("replica group: {e}"))),
            },
            None => exec.call_on(request, channel, control.as_ref()).await,
        };
        let reply = match json {
            Ok(Some(json)) => serde_json::from_str::<execute::ExecuteReply>(&json)
                .map_err(|e| PythonError::Exception(format!("malformed execute reply: {e}"))),
            Ok(None) => Err(PythonError::Exception("execute returned no reply".into())),
            Err(e) => Err(e),
        };
        match reply {
            Ok(reply) => Outcome {
                abort_queue: reply.is_error() && parsed.stop_on_error && !parsed.silent,
                reply: Some(
                    self.reply(request, &reply)
                        .with_metadata(self.execute_metadata(started, &reply.status)),
                ),
                shutdown: false,
            },
            Err(e) => Outcome::reply(self.error_reply(request, "KernelError", e.to_string())),
        }
    }

    /// An execute_reply's metadata, ipykernel's way.
    pub fn execute_metadata(&self, started: String, status: &str) -> Value {
        let metadata = execute::ReplyMetadata {
            started,
            dependencies_met: true,
            engine: self.session.id.clone(),
            status: status.to_owned(),
        };
        serde_json::to_value(metadata).unwrap_or_default()
    }

    /// A request sent on the control channel that ipykernel also serves
    /// there (code, completion, inspection): run on a Python thread of its
    /// own, beside the main shell, outside the replicas' log, as subshells are.
    pub async fn handle_on_control(&self, request: &Message) -> Outcome {
        let exec = match self.control_executor() {
            Ok(exec) => exec,
            Err(e) => {
                return Outcome::reply(self.error_reply(request, "KernelError", e.to_string()))
            }
        };
        self.handle(&exec, request, Route::Control).await
    }

    fn control_executor(&self) -> Result<Executor, PythonError> {
        if let Some(exec) = self.control_exec.get() {
            return Ok(exec.clone());
        }
        let exec = self.python.spawn_executor("control")?;
        Ok(self.control_exec.get_or_init(|| exec).clone())
    }

    /// The winner died mid-cell: an error the user sees, with the namespace
    /// as before the cell (its changes never left the dead replica).
    async fn replica_lost(&self, exec: &Executor, request: &Message, replica: u64) -> Outgoing {
        let evalue = format!(
            "replica {replica} was lost while executing; the namespace is as before this cell"
        );
        let count = exec
            .run(|_py, k| {
                k.getattr("shell")?
                    .getattr("execution_count")?
                    .extract::<i64>()
            })
            .await
            .unwrap_or(0);
        let content = crate::wire::error::ErrorContent {
            ename: "ReplicaLost".into(),
            evalue: evalue.clone(),
            traceback: vec![format!("ReplicaLost: {evalue}")],
        };
        self.iopub
            .publish(Outgoing::typed(
                "error",
                &self.session.id,
                Some(&request.header),
                &content,
            ))
            .await;
        self.reply(
            request,
            &json!({"status": "error", "ename": "ReplicaLost", "evalue": evalue,
                    "traceback": content.traceback, "execution_count": count,
                    "user_expressions": {}, "payload": []}),
        )
    }

    /// A front-end's message on an open comm: to the replica holding the
    /// comm when there is a group (see `Front::comm`), else served here.
    async fn comm<Req: DeserializeOwned>(&self, exec: &Executor, request: &Message) -> Outcome {
        if let Err(e) = request.content_as::<Req>() {
            tracing::warn!("malformed {}: {e}", request.header.msg_type);
            return Outcome::default();
        }
        if let Some(Some(front)) = self.group.get() {
            if front.comm(request, self.cell_running()).await {
                return Outcome::default();
            }
        }
        self.notify::<Req>(exec, request).await
    }

    /// A request answered by the shim: typed on the way in and out.
    async fn forward<Req, Rep>(&self, exec: &Executor, request: &Message) -> Outcome
    where
        Req: DeserializeOwned,
        Rep: DeserializeOwned + Serialize,
    {
        if let Err(e) = request.content_as::<Req>() {
            return Outcome::reply(self.error_reply(request, "BadRequest", e.to_string()));
        }
        let reply = match exec.call(request).await {
            Ok(Some(json)) => match serde_json::from_str::<Rep>(&json) {
                Ok(rep) => self.reply(request, &rep),
                Err(e) => self.error_reply(request, "KernelError", format!("malformed reply: {e}")),
            },
            Ok(None) => self.error_reply(request, "KernelError", "no reply".into()),
            Err(e) => self.error_reply(request, "KernelError", e.to_string()),
        };
        Outcome::reply(reply)
    }

    /// A message without a reply (comms).
    async fn notify<Req: DeserializeOwned>(&self, exec: &Executor, request: &Message) -> Outcome {
        if let Err(e) = request.content_as::<Req>() {
            tracing::warn!("malformed {}: {e}", request.header.msg_type);
            return Outcome::default();
        }
        if let Err(e) = exec.call(request).await {
            tracing::warn!("{} failed: {e}", request.header.msg_type);
        }
        Outcome::default()
    }

    /// Replies at once, then lets the shim close history and run atexit
    /// hooks, unless a cell is still running on the Python thread: a
    /// shutdown must not wait for a cell (jupyter_client kills after 5 s).
    pub async fn shutdown(&self, request: &Message) -> Outcome {
        let restart = request
            .content_as::<shutdown::ShutdownRequest>()
            .map(|r| r.restart)
            .unwrap_or(false);
        let content = shutdown::ShutdownReply {
            status: "ok".into(),
            restart,
        };
        // ipykernel also announces the shutdown on iopub.
        self.iopub
            .publish(Outgoing::typed(
                "shutdown_reply",
                &self.session.id,
                Some(&request.header),
                &content,
            ))
            .await;
        let cleanup = self.python.main().call(request);
        if tokio::time::timeout(std::time::Duration::from_secs(2), cleanup)
            .await
            .is_err()
        {
            tracing::warn!("shell cleanup did not finish in time; exiting anyway");
        }
        // A restart must come back with a clean namespace everywhere, so the
        // other replicas go too (the next replica 1 starts a fresh group).
        if let Some(Some(front)) = self.group.get() {
            front.stop().await;
        }
        Outcome {
            reply: Some(self.reply(request, &content)),
            abort_queue: false,
            shutdown: true,
        }
    }

    /// The queue of a subshell's requests, if it exists.
    pub fn subshell(&self, id: &str) -> Option<mpsc::Sender<Message>> {
        self.subshells.lock().ok()?.get(id).cloned()
    }

    pub fn create_subshell(self: &Arc<Self>, request: &Message) -> Outgoing {
        let id = uuid::Uuid::new_v4().to_string();
        let exec = match self.python.spawn_executor(&id[..8]) {
            Ok(e) => e,
            Err(e) => return self.error_reply(request, "SubshellError", e.to_string()),
        };
        let (tx, rx) = mpsc::channel(1024);
        if let Ok(mut subshells) = self.subshells.lock() {
            subshells.insert(id.clone(), tx);
        }
        tokio::spawn(shell::serve(self.clone(), exec, rx));
        let content = subshell::CreateSubshellReply {
            status: "ok".into(),
            subshell_id: id,
        };
        self.reply(request, &content)
    }

    /// Dropping the queue ends the subshell's task and then its thread.
    pub fn delete_subshell(&self, request: &Message) -> Outgoing {
        let id = match request.content_as::<subshell::DeleteSubshellRequest>() {
            Ok(r) => r.subshell_id,
            Err(e) => return self.error_reply(request, "BadRequest", e.to_string()),
        };
        let removed = self.subshells.lock().ok().and_then(|mut s| s.remove(&id));
        match removed {
            Some(_) => self.reply(request, &json!({"status": "ok"})),
            None => self.error_reply(request, "SubshellNotFound", format!("no subshell {id}")),
        }
    }

    /// Which replicas yield every cell from now on (tests, drills).
    pub async fn steer(&self, request: &Message) -> Outgoing {
        let steer = match request.content_as::<crate::wire::steer::SteerRequest>() {
            Ok(s) => s,
            Err(e) => return self.error_reply(request, "BadRequest", e.to_string()),
        };
        let Some(front) = self.group().await else {
            return self.error_reply(request, "NoReplicas", "this kernel runs one replica".into());
        };
        let entry = replica::entry::Entry::Steer {
            yielding: steer.yielding.into_iter().collect(),
        };
        match front.core().propose(&entry).await {
            Ok(()) => self.reply(request, &json!({"status": "ok"})),
            Err(e) => self.error_reply(request, "ReplicaGroup", e.to_string()),
        }
    }

    pub async fn sync(&self, request: &Message) -> Outgoing {
        let sync = match request.content_as::<crate::wire::sync::SyncRequest>() {
            Ok(s) => s,
            Err(e) => return self.error_reply(request, "BadRequest", e.to_string()),
        };
        let patience = match sync.timeout {
            None => std::time::Duration::from_secs(600),
            Some(t) => match std::time::Duration::try_from_secs_f64(t) {
                Ok(d) => d,
                Err(_) => {
                    let why = format!("timeout must be a number of seconds >= 0, not {t}");
                    return self.error_reply(request, "BadRequest", why);
                }
            },
        };
        let Some(front) = self.group().await else {
            // One replica: nothing to wait for.
            return self.reply(request, &json!({"status": "ok"}));
        };
        if front.core().wait_synced(patience).await {
            self.reply(request, &json!({"status": "ok"}))
        } else {
            let why = "replicas are still receiving earlier cells' changes".to_string();
            self.error_reply(request, "Timeout", why)
        }
    }

    pub fn list_subshells(&self, request: &Message) -> Outgoing {
        let mut ids: Vec<String> = self
            .subshells
            .lock()
            .map(|s| s.keys().cloned().collect())
            .unwrap_or_default();
        ids.sort();
        let content = subshell::ListSubshellReply {
            status: "ok".into(),
            subshell_id: ids,
        };
        self.reply(request, &content)
    }

    pub fn finish_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Deprecated but still part of the spec (and ipykernel's tests).
    fn connect_reply(&self) -> Value {
        let c = &self.connection;
        json!({
            "status": "ok",
            "shell_port": c.shell_port,
            "iopub_port": c.iopub_port,
            "stdin_port": c.stdin_port,
            "hb_port": c.hb_port,
            "control_port": c.control_port,
        })
    }
}

/// `foo_request` -> `foo_reply`.
pub fn reply_type(request_type: &str) -> String {
    match request_type.strip_suffix("_request") {
        Some(stem) => format!("{stem}_reply"),
        None => format!("{request_type}_reply"),
    }
}

/// Clears the main-shell cell being served when dropped.
pub struct Serving<'a>(&'a Mutex<Option<String>>);

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        *lock(self.0) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::reply_type;

    #[test]
    fn reply_names() {
        assert_eq!(reply_type("execute_request"), "execute_reply");
        assert_eq!(reply_type("kernel_info_request"), "kernel_info_reply");
    }
}
