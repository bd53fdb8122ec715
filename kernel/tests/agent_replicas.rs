//! An agent starts a real replica process for a kernel and stops it, over
//! the cluster control protocol. Needs the kernel's Python environment
//! (`NOTEBOOKOS_PYTHON`, or `PYO3_PYTHON` as `tests/run.sh` sets it);
//! without one it says so and passes.

use std::path::PathBuf;
use std::sync::Arc;

use notebookos_kernel::agent::control::{ControlRequest, ControlResponse, GpuReport, Host};
use notebookos_kernel::cluster::client::ClusterClient;
use notebookos_kernel::cluster::config::{write_new_ca, ClusterConfig};
use notebookos_kernel::replica::group::{pid_alive, Bootstrap};
use raft_transport::control::ControlServer;
use raft_transport::KernelCa;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_starts_and_stops_a_replica() {
    let python = std::env::var("NOTEBOOKOS_PYTHON").or_else(|_| std::env::var("PYO3_PYTHON"));
    let Ok(python) = python else {
        eprintln!("SKIPPED: set NOTEBOOKOS_PYTHON (the kernel's Python environment)");
        return;
    };
    std::env::set_var("NOTEBOOKOS_PYTHON", python);
    let dir = std::env::temp_dir().join(format!("nbos-agent-replicas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_new_ca(&dir.join("ca.pem")).unwrap();
    let probe = ClusterConfig::of_ca(dir.join("ca.pem"));
    let server =
        ControlServer::bind(&probe.identity(1).unwrap(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = server.local_addr().unwrap();
    std::fs::write(
        dir.join("cluster.json"),
        format!(r#"{{"ca": "ca.pem", "servers": [{{"name": "a", "agent": "{addr}"}}]}}"#),
    )
    .unwrap();
    let host = Arc::new(Host::new(
        "a".into(),
        addr.ip(),
        dir.join("agent.sock"),
        dir.join("replicas"),
        notebookos_kernel::program::Program::binary(PathBuf::from(env!(
            "CARGO_BIN_EXE_notebookos-kernel"
        ))),
        Box::new(|| GpuReport {
            total: 2,
            idle: 2,
            ..GpuReport::default()
        }),
    ));
    tokio::spawn(server.serve(move |r| host.clone().answer(r)));
    let client = ClusterClient::new(
        ClusterConfig::load(&dir.join("cluster.json")).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();

    let kernel_id = uuid::Uuid::new_v4().to_string();
    let kernel_ca = KernelCa::generate(&kernel_id).unwrap();
    let bootstrap = Bootstrap {
        id: 2,
        kernel_id: kernel_id.clone(),
        identity_pem: kernel_ca.issue_identity(2).unwrap().to_pem(),
        front: 1,
        joining: false,
        addr_file: PathBuf::from("/ignored: the agent picks it"),
        argv: vec![],
        listen: "0.0.0.0:0".into(),
        cwd: None,
        env: None,
    };
    let started = client
        .call(
            "a",
            &ControlRequest::StartReplica {
                bootstrap,
                hash_seed: 7,
                gpus: 1,
            },
        )
        .await
        .unwrap();
    let ControlResponse::Started {
        pid,
        addr: replica_addr,
    } = started
    else {
        panic!("{started:?}");
    };
    assert!(pid_alive(pid));
    // It listens where the agent said (this server's address), not where
    // the bootstrap asked.
    assert!(replica_addr.starts_with("127.0.0.1:"), "{replica_addr}");
    let inv = client.inventories().await;
    assert_eq!(inv[0].replicas.len(), 1);
    assert_eq!((inv[0].replicas[0].pid, inv[0].replicas[0].gpus), (pid, 1));

    client
        .call(
            "a",
            &ControlRequest::StopReplica {
                kernel_id,
                replica: 2,
            },
        )
        .await
        .unwrap();
    for _ in 0..100 {
        if !pid_alive(pid) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(!pid_alive(pid), "replica {pid} still runs");
    assert!(client.inventories().await[0].replicas.is_empty());
    std::fs::remove_dir_all(dir).unwrap();
}
