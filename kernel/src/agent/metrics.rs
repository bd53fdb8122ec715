//! `/metrics` in the Prometheus text format (a minimal HTTP/1.1 responder:
//! every request gets the metrics; the agent serves nothing else).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::protocol::{Status, UsageView};

pub async fn serve(listener: TcpListener, status: impl Fn() -> Status + Send + Sync + 'static) {
    let status = std::sync::Arc::new(status);
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let status = status.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            // The request itself does not matter; read what came so the client
            // is not reset before it reads the answer.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), stream.read(&mut buf))
                .await;
            let body = render(&status());
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
        });
    }
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render(s: &Status) -> String {
    let mut out = String::new();
    out.push_str("# HELP notebookos_gpus GPUs on this host.\n# TYPE notebookos_gpus gauge\n");
    out.push_str(&format!(
        "notebookos_gpus{{fake=\"{}\"}} {}\n",
        s.fake,
        s.gpus.len()
    ));
    let granted: usize = s.grants.iter().map(|g| g.gpus.len()).sum();
    out.push_str("# HELP notebookos_gpus_granted GPUs granted now: to a running or starting cell, or cached with a kernel's state.\n# TYPE notebookos_gpus_granted gauge\n");
    out.push_str(&format!("notebookos_gpus_granted {granted}\n"));
    type Counter = fn(&UsageView) -> f64;
    let per_kernel: [(&str, &str, Counter); 8] = [
        (
            "notebookos_gpu_seconds_held_total",
            "GPU-seconds granted to a kernel's replicas.",
            |u| u.held_gpu_seconds,
        ),
        (
            "notebookos_gpu_seconds_used_total",
            "GPU-seconds a kernel's cells ran on their grants.",
            |u| u.used_gpu_seconds,
        ),
        (
            "notebookos_gpu_seconds_cached_total",
            "GPU-seconds a kernel's state sat on its GPUs between cells.",
            |u| u.cached_gpu_seconds,
        ),
        (
            "notebookos_gpu_seconds_moving_total",
            "GPU-seconds spent moving a kernel's state off its GPUs.",
            |u| u.moving_gpu_seconds,
        ),
        ("notebookos_grants_total", "Grants made.", |u| {
            u.grants as f64
        }),
        (
            "notebookos_grants_reused_total",
            "Cells served by the kernel's cached grant, state in place.",
            |u| u.reused as f64,
        ),
        (
            "notebookos_grants_revoked_total",
            "Cached grants revoked for another kernel.",
            |u| u.revoked as f64,
        ),
        (
            "notebookos_grants_expired_total",
            "Grants whose holder stopped renewing (a replica died).",
            |u| u.expired as f64,
        ),
    ];
    for (name, help, value) in per_kernel {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
        for (k, u) in &s.usage {
            out.push_str(&format!("{name}{{kernel=\"{}\"}} {}\n", label(k), value(u)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::protocol::{GrantView, UsageView};

    #[test]
    fn renders_counters_per_kernel() {
        let s = Status {
            gpus: crate::agent::inventory::fake(2),
            fake: true,
            grants: vec![GrantView {
                id: 1,
                kernel: "k\"1".into(),
                replica: 2,
                gpus: vec![0],
            }],
            usage: [(
                "k\"1".to_string(),
                UsageView {
                    held_gpu_seconds: 3.5,
                    used_gpu_seconds: 2.0,
                    cached_gpu_seconds: 1.0,
                    moving_gpu_seconds: 0.5,
                    grants: 4,
                    reused: 2,
                    revoked: 1,
                    expired: 1,
                },
            )]
            .into(),
        };
        let text = render(&s);
        assert!(
            text.contains("notebookos_gpus{fake=\"true\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("notebookos_gpus_granted 1\n"));
        assert!(
            text.contains("notebookos_gpu_seconds_held_total{kernel=\"k\\\"1\"} 3.5\n"),
            "{text}"
        );
        assert!(text.contains("notebookos_grants_expired_total{kernel=\"k\\\"1\"} 1\n"));
    }
}
