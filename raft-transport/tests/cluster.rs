//! Three (and four) replicas on loopback: election, ordered commits, failover,
//! partitions, membership changes, certificates and blobs.

mod common;

/// Awaits all futures concurrently (a tiny stand-in for `futures::future::join_all`).
async fn futures_join_all<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut out = Vec::with_capacity(futs.len());
    let mut pinned: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut results: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, r) in pinned.iter_mut().zip(results.iter_mut()) {
            if r.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *r = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.extend(results.into_iter().flatten());
    out
}

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use raft_transport::{Error, KernelCa, NodeIdentity};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_is_elected() {
    init_tracing();
    let ca = KernelCa::generate("t-elect").unwrap();
    let nodes = cluster(&ca, 3).await;
    let l = leader(nodes.values()).await.id();
    for n in nodes.values() {
        assert_eq!(n.wait_for_leader(WAIT).await.unwrap(), l);
        assert_eq!(n.metrics().voters, BTreeSet::from([1, 2, 3]));
    }
    shutdown_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_entries_commit_in_order_on_all_nodes() {
    init_tracing();
    let ca = KernelCa::generate("t-10k").unwrap();
    let nodes = cluster(&ca, 3).await;
    let l = leader(nodes.values()).await;
    const N: u64 = 10_000;
    // Queued from one task, so the log order is the submission order.
    let mut pending = Vec::with_capacity(N as usize);
    for i in 0..N {
        pending.push(l.propose_pipelined(&payload(i)).await.unwrap());
    }
    let mut last = 0;
    for p in pending {
        let r = p.committed().await.unwrap();
        assert!(r.index > last, "commit indexes must increase");
        last = r.index;
    }
    for n in nodes.values() {
        n.wait_applied(last, WAIT).await.unwrap();
        let mut sub = journal(n).subscribe(0);
        for i in 0..N {
            let e = tokio::time::timeout(WAIT, sub.next()).await.unwrap();
            assert_eq!(
                e.data.as_ref(),
                payload(i).as_slice(),
                "node {} entry {i}",
                n.id()
            );
        }
        assert!(sub.try_next().is_none());
    }
    shutdown_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_leader_is_replaced_and_next_entry_commits() {
    init_tracing();
    let ca = KernelCa::generate("t-failover").unwrap();
    let mut nodes = cluster(&ca, 3).await;
    propose(nodes.values(), payload(1)).await;
    let old = leader(nodes.values()).await.id();
    let dead = nodes.remove(&old).unwrap();
    dead.shutdown().await.unwrap();

    let new = leader(nodes.values()).await;
    assert_ne!(new.id(), old);
    let idx = new.propose(&payload(2)).await.unwrap().index;
    for n in nodes.values() {
        n.wait_applied(idx, WAIT).await.unwrap();
        assert_eq!(applied_payloads(n).await, vec![payload(1), payload(2)]);
    }
    shutdown_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_follower_catches_up_by_log() {
    init_tracing();
    let ca = KernelCa::generate("t-part-log").unwrap();
    let nodes = cluster(&ca, 3).await;
    propose(nodes.values(), payload(0)).await;
    let l = leader(nodes.values()).await.id();
    let cut = *nodes.keys().find(|id| **id != l).unwrap();
    nodes[&cut].set_isolated(true);

    let rest: Vec<_> = nodes.values().filter(|n| n.id() != cut).collect();
    let mut last = 0;
    for i in 1..=200 {
        last = propose(rest.iter().copied(), payload(i)).await;
    }
    assert!(
        nodes[&cut].last_applied() < last,
        "isolated replica must not see new entries"
    );

    nodes[&cut].set_isolated(false);
    nodes[&cut].wait_applied(last, WAIT).await.unwrap();
    assert_eq!(
        applied_payloads(&nodes[&cut]).await,
        applied_payloads(&nodes[&l]).await
    );
    assert_eq!(
        nodes[&cut].metrics().snapshot_index,
        None,
        "caught up by log, not snapshot"
    );
    shutdown_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_follower_catches_up_by_snapshot() {
    init_tracing();
    let ca = KernelCa::generate("t-part-snap").unwrap();
    // Snapshot often and keep no log behind it, so the leader cannot serve the gap by log.
    let nodes = cluster_with(&ca, 3, |c| {
        c.snapshot_after_entries = 50;
        c.keep_entries_after_snapshot = 0;
    })
    .await;
    propose(nodes.values(), payload(0)).await;
    let l = leader(nodes.values()).await.id();
    let cut = *nodes.keys().find(|id| **id != l).unwrap();
    nodes[&cut].set_isolated(true);

    let rest: Vec<_> = nodes.values().filter(|n| n.id() != cut).collect();
    let mut last = 0;
    for i in 1..=300 {
        last = propose(rest.iter().copied(), payload(i)).await;
    }
    // Wait until the leader has purged past what the isolated replica has.
    let leader_node = leader(rest.iter().copied()).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while leader_node
        .raft_metrics()
        .borrow()
        .purged
        .map_or(0, |p| p.index)
        <= nodes[&cut].last_applied()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "leader never purged its log"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    nodes[&cut].set_isolated(false);
    nodes[&cut].wait_applied(last, WAIT).await.unwrap();
    assert!(
        nodes[&cut].metrics().snapshot_index.is_some(),
        "caught up by snapshot"
    );
    assert_eq!(
        applied_payloads(&nodes[&cut]).await,
        applied_payloads(leader_node).await
    );
    assert_eq!(applied_payloads(&nodes[&cut]).await.len(), 301);
    shutdown_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learner_joins_is_promoted_and_old_member_removed() {
    init_tracing();
    let ca = KernelCa::generate("t-members").unwrap();
    let mut nodes = cluster(&ca, 3).await;
    for i in 0..50 {
        propose(nodes.values(), payload(i)).await;
    }
    let fourth = start(config(&ca, 4)).await;
    let l = leader(nodes.values()).await;
    l.add_learner(4, fourth.addr()).await.unwrap();
    assert!(l.metrics().learners.contains(&4));
    l.promote(4).await.unwrap();

    // Replace a follower (not the leader) the way a dead replica would be replaced.
    let old = *nodes.keys().find(|id| **id != l.id()).unwrap();
    let l_id = l.id();
    nodes.remove(&old).unwrap().shutdown().await.unwrap();
    nodes[&l_id].remove(old).await.unwrap();
    nodes.insert(4, fourth);

    let expected: BTreeSet<u64> = nodes.keys().copied().collect();
    let idx = propose(nodes.values(), payload(50)).await;
    for n in nodes.values() {
        n.wait_applied(idx, WAIT).await.unwrap();
        let m = n.metrics();
        assert_eq!(m.voters, expected, "node {}", n.id());
        assert!(m.learners.is_empty());
        assert_eq!(applied_payloads(n).await.len(), 51);
    }
    shutdown_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_with_certificate_from_another_ca_is_refused() {
    init_tracing();
    let ca = KernelCa::generate("t-ca").unwrap();
    let nodes = cluster(&ca, 3).await;
    let idx = propose(nodes.values(), payload(0)).await;

    // An impostor from another kernel tries to join as node 9.
    let other = KernelCa::generate("intruder").unwrap();
    let impostor = start(config(&other, 9)).await;
    let l = leader(nodes.values()).await;
    // Non-blocking: the leader will keep failing to reach it.
    l.raft()
        .add_learner(
            9,
            openraft::BasicNode::new(impostor.addr().to_string()),
            false,
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        impostor.last_applied(),
        0,
        "impostor must not receive the log"
    );
    assert!(l.last_applied() >= idx);

    // And it cannot push data to a genuine replica: the handshake fails.
    impostor
        .initialize(
            [(9, impostor.addr()), (1, nodes[&1].addr())]
                .into_iter()
                .collect(),
        )
        .await
        .unwrap();
    wait_member(&impostor, 1).await;
    let err = impostor.send_blob(1, vec![1u8; 1024]).await.unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err}");
    impostor.shutdown().await.unwrap();
    shutdown_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_claiming_another_id_is_refused() {
    init_tracing();
    let ca = KernelCa::generate("t-claim").unwrap();
    let nodes = cluster(&ca, 3).await;
    // A genuine kernel certificate for node 5, used by a process claiming to be node 2.
    let pem = ca.issue_identity(5).unwrap().to_pem();
    let liar = start(raft_transport::ReplicaConfig::new(
        NodeIdentity::from_pem(2, &pem).unwrap(),
        loopback(),
    ))
    .await;
    liar.initialize(
        [(2, liar.addr()), (1, nodes[&1].addr())]
            .into_iter()
            .collect(),
    )
    .await
    .unwrap();
    wait_member(&liar, 1).await;
    let err = liar.send_blob(1, vec![7u8; 10]).await.unwrap_err();
    assert!(
        matches!(err, Error::Unreachable { .. } | Error::Protocol { .. }),
        "{err}"
    );
    liar.shutdown().await.unwrap();
    shutdown_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_restarts_from_its_own_log() {
    init_tracing();
    let ca = KernelCa::generate("t-restart").unwrap();
    let dirs: Vec<_> = (0..3).map(|_| temp_dir()).collect();
    let mut identities = std::collections::BTreeMap::new();
    let mut i = 0;
    let mut nodes = cluster_with(&ca, 3, |c| {
        c.data_dir = Some(dirs[i].1.clone());
        identities.insert(c.identity.id, c.identity.clone());
        i += 1;
    })
    .await;
    let mut last = 0;
    for i in 0..100 {
        last = propose(nodes.values(), payload(i)).await;
    }
    let l = leader(nodes.values()).await.id();
    let victim = *nodes.keys().find(|id| **id != l).unwrap();
    nodes[&victim].wait_applied(last, WAIT).await.unwrap();
    let addr = nodes[&victim].addr();
    nodes.remove(&victim).unwrap().shutdown().await.unwrap();
    for i in 100..150 {
        last = propose(nodes.values(), payload(i)).await;
    }

    let dir = dirs[(victim - 1) as usize].1.clone();
    {
        // What the replica will start from: its own log and vote, straight from disk.
        use openraft::storage::RaftLogStorage;
        let mut log = raft_transport::log_store::LogStore::open(&dir, false).unwrap();
        let state = log.get_log_state().await.unwrap();
        assert!(state.last_log_id.unwrap().index >= last - 50);
        assert!(log.read_vote().await.unwrap().is_some());
    }
    let mut cfg = raft_transport::ReplicaConfig::new(identities[&victim].clone(), addr);
    cfg.data_dir = Some(dir);
    let back = start(cfg).await;
    back.wait_applied(last, WAIT).await.unwrap();
    nodes.insert(victim, back);
    assert_eq!(
        applied_payloads(&nodes[&victim]).await,
        (0..150).map(payload).collect::<Vec<_>>()
    );
    assert_eq!(
        nodes[&victim].metrics().snapshot_index,
        None,
        "caught up by log"
    );
    shutdown_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_stream_alongside_raft_traffic() {
    init_tracing();
    let ca = KernelCa::generate("t-blob").unwrap();
    let nodes = cluster(&ca, 3).await;
    let l = leader(nodes.values()).await;
    let peer = *nodes.keys().find(|id| **id != l.id()).unwrap();
    let blob: Vec<u8> = (0..(48u32 << 20)).map(|i| (i % 251) as u8).collect();
    let expected = raft_transport::BlobHash::of(&blob);

    // Raft keeps committing while the blob is in flight.
    let (sent, commits) = tokio::join!(l.send_blob(peer, blob.clone()), async {
        let mut n = 0;
        for i in 0..100 {
            l.propose(&payload(i)).await.unwrap();
            n += 1;
        }
        n
    });
    assert_eq!(sent.unwrap(), expected);
    assert_eq!(commits, 100);
    assert_eq!(
        nodes[&peer].blob(&expected).unwrap().as_ref(),
        blob.as_slice()
    );

    // Fetch by hash from the peer that holds it.
    let third = *nodes
        .keys()
        .find(|id| **id != l.id() && **id != peer)
        .unwrap();
    let fetched = nodes[&third].fetch_blob(peer, expected).await.unwrap();
    assert_eq!(fetched.len(), blob.len());
    let missing = raft_transport::BlobHash::of(b"nope");
    assert!(matches!(
        nodes[&third].fetch_blob(peer, missing).await,
        Err(Error::BlobNotFound(_))
    ));
    shutdown_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_memory_blob_reaches_a_peer_on_this_host_without_a_copy() {
    init_tracing();
    let ca = KernelCa::generate("t-shm").unwrap();
    let nodes = cluster(&ca, 3).await;
    let l = leader(nodes.values()).await;
    let peer = *nodes.keys().find(|id| **id != l.id()).unwrap();
    let blob = raft_transport::shm::sealed(8 << 20, |b| {
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i % 251) as u8;
        }
    })
    .unwrap();
    let expected = raft_transport::BlobHash::of(&blob);

    assert_eq!(l.send_blob(peer, blob.clone()).await.unwrap(), expected);
    let got = nodes[&peer].blob(&expected).unwrap();
    assert_eq!(got, blob);
    // The peer maps the maker's pages (copy-on-write), not bytes that crossed QUIC.
    assert!(raft_transport::shm::is_private(&got));
    assert_ne!(got.as_ptr(), blob.as_ptr());
    // It outlives the maker's copy, and serves it to a third replica over QUIC.
    l.remove_blob(&expected);
    drop(blob);
    let third = *nodes
        .keys()
        .find(|id| **id != l.id() && **id != peer)
        .unwrap();
    let fetched = nodes[&third].fetch_blob(peer, expected).await.unwrap();
    assert_eq!(fetched, got);
    assert!(!raft_transport::shm::is_private(&fetched));

    // A heap blob still travels as bytes.
    let heap = vec![3u8; 2 << 20];
    let hash = l.send_blob(peer, heap.clone()).await.unwrap();
    assert!(!raft_transport::shm::is_private(
        &nodes[&peer].blob(&hash).unwrap()
    ));
    shutdown_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_proposal_is_forwarded_to_leader() {
    init_tracing();
    let ca = KernelCa::generate("t-forward").unwrap();
    let nodes = cluster(&ca, 3).await;
    let l = leader(nodes.values()).await.id();
    let follower = nodes.values().find(|n| n.id() != l).unwrap();
    let p = follower.propose(&payload(1)).await.unwrap();
    // Applied on the follower by the time propose returns.
    assert!(follower.last_applied() >= p.index);
    assert_eq!(applied_payloads(follower).await, vec![payload(1)]);
    nodes[&l].wait_applied(p.index, WAIT).await.unwrap();
    assert_eq!(applied_payloads(&nodes[&l]).await, vec![payload(1)]);
    shutdown_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_per_peer_pair() {
    init_tracing();
    let ca = KernelCa::generate("t-conns").unwrap();
    let nodes = cluster(&ca, 3).await;
    // Every replica sends to every other at once, so pairs that had no connection yet
    // (follower-follower) dial each other simultaneously and must settle on one.
    let mut sends = Vec::new();
    for a in nodes.values() {
        for b in nodes.keys().filter(|b| **b != a.id()) {
            sends.push(a.send_blob(*b, payload(a.id() * 10 + b)));
        }
    }
    for r in futures_join_all(sends).await {
        r.unwrap();
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let counts: Vec<usize> = nodes
            .values()
            .map(|n| n.metrics().open_connections)
            .collect();
        if counts.iter().all(|c| *c == 2) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections per node: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_ca_signs_for_the_same_kernel_and_remote_keys_work() {
    init_tracing();
    let ca = KernelCa::generate("t-restore").unwrap();
    let restored = KernelCa::from_pem("t-restore", &ca.to_pem()).unwrap();
    // Node 2 made its key itself and only shipped the public half to the (restored) CA.
    let key2 = raft_transport::NodeKey::generate().unwrap();
    let public =
        raft_transport::NodePublicKey::from_bytes(key2.public_key().as_bytes().to_vec()).unwrap();
    let cert2 = restored.sign_node_key(2, &public).unwrap();
    let id2 = key2.into_identity(2, cert2, restored.cert_der());
    let n1 = start(config(&ca, 1)).await;
    let n2 = start(raft_transport::ReplicaConfig::new(id2, loopback())).await;
    n1.initialize([(1, n1.addr()), (2, n2.addr())].into_iter().collect())
        .await
        .unwrap();
    let idx = propose([&n1, &n2], payload(1)).await;
    n2.wait_applied(idx, WAIT).await.unwrap();
    n1.shutdown().await.unwrap();
    n2.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailbox_messages_arrive_in_order_with_their_sender() {
    init_tracing();
    let ca = KernelCa::generate("t-mailbox").unwrap();
    let nodes = Arc::new(cluster(&ca, 3).await);
    let mut inbox = nodes[&1].take_messages().unwrap();
    assert!(
        nodes[&1].take_messages().is_none(),
        "the mailbox is taken once"
    );
    let senders = {
        let nodes = nodes.clone();
        tokio::spawn(async move {
            for i in 0..200u64 {
                nodes[&2].send_message(1, payload(i)).await.unwrap();
            }
            // Larger than a QUIC stream window, so it crosses in many packets.
            nodes[&3]
                .send_message(1, vec![7u8; 40 << 20])
                .await
                .unwrap();
        })
    };
    let mut from_2 = Vec::new();
    let mut from_3 = Vec::new();
    while from_2.len() < 200 || from_3.is_empty() {
        let message = tokio::time::timeout(WAIT, inbox.recv())
            .await
            .unwrap()
            .unwrap();
        match message.from {
            2 => from_2.push(message.data.to_vec()),
            3 => from_3.push(message.data),
            other => panic!("message from unexpected peer {other}"),
        }
    }
    tokio::time::timeout(WAIT, senders).await.unwrap().unwrap();
    let expected: Vec<Vec<u8>> = (0..200).map(payload).collect();
    assert_eq!(from_2, expected);
    assert_eq!(from_3[0].len(), 40 << 20);
    assert!(from_3[0].iter().all(|b| *b == 7));
    shutdown_all(Arc::into_inner(nodes).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_delivered_once_its_receiver_drops_the_receipt() {
    init_tracing();
    let ca = KernelCa::generate("t-receipt").unwrap();
    let nodes = Arc::new(cluster(&ca, 2).await);
    let mut inbox = nodes[&1].take_messages().unwrap();
    let (delivered_tx, mut delivered) = tokio::sync::oneshot::channel();
    let sender = {
        let nodes = nodes.clone();
        tokio::spawn(async move {
            nodes[&2].send_message(1, payload(1)).await.unwrap();
            let _ = delivered_tx.send(());
        })
    };
    let message = tokio::time::timeout(WAIT, inbox.recv())
        .await
        .unwrap()
        .unwrap();
    // Held: the sender is still waiting however long the handling takes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        delivered.try_recv().is_err(),
        "send_message returned before the receipt was dropped"
    );
    drop(message.receipt);
    tokio::time::timeout(WAIT, delivered)
        .await
        .unwrap()
        .unwrap();
    sender.await.unwrap();
    shutdown_all(Arc::into_inner(nodes).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_outside_the_group_proposes_through_the_leader() {
    init_tracing();
    let ca = KernelCa::generate("t-via").unwrap();
    let nodes = cluster(&ca, 3).await;
    let l = leader(nodes.values()).await;
    let outsider = start(config(&ca, 9)).await;
    let proposed = outsider
        .propose_via(l.id(), &l.addr().to_string(), &b"join me".to_vec())
        .await
        .unwrap();
    for n in nodes.values() {
        n.wait_applied(proposed.index, WAIT).await.unwrap();
        assert_eq!(applied_payloads(n).await.last().unwrap(), b"join me");
    }
    // Asking a follower reports who leads instead of committing.
    let follower = nodes.values().find(|n| n.id() != l.id()).unwrap();
    match outsider
        .propose_via(follower.id(), &follower.addr().to_string(), &b"no".to_vec())
        .await
    {
        Err(Error::NotLeader { leader, .. }) => assert_eq!(leader, Some(l.id())),
        other => panic!("expected NotLeader, got {other:?}"),
    }
    outsider.shutdown().await.unwrap();
    shutdown_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_without_a_certificate_cannot_connect_or_read() {
    init_tracing();
    let ca = KernelCa::generate("t-nocert").unwrap();
    let nodes = cluster(&ca, 3).await;
    let idx = propose(nodes.values(), payload(0)).await;

    // Trusts the kernel CA (so the server's certificate verifies) but has no
    // certificate of its own.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der()).unwrap();
    let mut tls =
        rustls::ClientConfig::builder_with_provider(raft_transport::tls::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    tls.alpn_protocols = vec![raft_transport::tls::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client(loopback()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(crypto)));

    let target = nodes[&1].addr();
    let name = raft_transport::tls::node_server_name(1);
    let refusal = match endpoint.connect(target, &name).unwrap().await {
        Err(e) => e,
        Ok(conn) => {
            // TLS 1.3 lets the client finish before the server has judged its
            // (missing) certificate; the server's verdict closes the connection.
            if let Ok((mut send, mut recv)) = conn.open_bi().await {
                let _ = send.write_all(b"any request at all").await;
                let _ = send.finish();
                let got = recv.read_to_end(1 << 20).await;
                assert!(got.is_err(), "read {got:?} without a certificate");
            }
            tokio::time::timeout(WAIT, conn.closed())
                .await
                .expect("the connection stayed open")
        }
    };
    // Refused by TLS, not by a later check a certified peer would also fail.
    match &refusal {
        quinn::ConnectionError::ConnectionClosed(close) => {
            // 0x74: TLS alert certificate_required.
            assert_eq!(
                close.error_code,
                quinn::TransportErrorCode::crypto(0x74),
                "{refusal}"
            );
        }
        other => panic!("refused for another reason: {other}"),
    }
    endpoint.close(0u32.into(), b"");
    // The group is unharmed.
    assert!(propose(nodes.values(), payload(1)).await > idx);
    shutdown_all(nodes).await;
}

/// After `shutdown` returns, nothing of the replica holds its UDP port: a replica restarting
/// in place binds it at once, even with peers that were talking to it a moment before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_the_port() {
    init_tracing();
    let ca = KernelCa::generate("t-release").unwrap();
    for round in 0..5 {
        let mut nodes = cluster(&ca, 3).await;
        for i in 0..20 {
            propose(nodes.values(), payload(i)).await;
        }
        let victim = 1 + round % 3;
        let addr = nodes[&victim].addr();
        nodes.remove(&victim).unwrap().shutdown().await.unwrap();
        std::net::UdpSocket::bind(addr)
            .unwrap_or_else(|e| panic!("round {round}: port of replica {victim} still held: {e}"));
        shutdown_all(nodes).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_or_blob_over_the_receivers_limit_is_refused_and_the_connection_still_serves() {
    init_tracing();
    let ca = KernelCa::generate("t-oversized").unwrap();
    let nodes = cluster_with(&ca, 2, |c| c.max_blob_size = 1 << 20).await;
    // Far over the limit, so the receiver refuses while the sender still
    // writes: the refusal must come back as such, not as a broken stream.
    let big = vec![1u8; 64 << 20];
    assert!(matches!(
        nodes[&2].send_message(1, big.clone()).await,
        Err(Error::BlobTooLarge { .. })
    ));
    assert!(matches!(
        nodes[&2].send_blob(1, big).await,
        Err(Error::BlobTooLarge { .. })
    ));
    // The connection is still good for what fits.
    let mut inbox = nodes[&1].take_messages().unwrap();
    let (sent, received) = tokio::join!(nodes[&2].send_message(1, payload(3)), async {
        // Only the data: the receipt drops here, which lets the send return.
        let message = tokio::time::timeout(WAIT, inbox.recv()).await.unwrap();
        message.unwrap().data
    });
    sent.unwrap();
    assert_eq!(received.to_vec(), payload(3));
    shutdown_all(nodes).await;
}
