//! A stand-in for the operator's collector, for benchmarks of an agent in
//! its DaemonSet mode (reporting, with a spool) without an API server: it
//! takes every report batch and answers that all of it is committed, so the
//! agent forgets what it sent, as it does against a healthy operator; and
//! it holds the agent's live-records poll as the operator does while
//! nobody watches.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{Json, Router, extract::State, routing::post};
use flowlens_api::{
    live::{LIVE_POLL_HOLD_SECONDS, LivePush, LiveReply},
    report::{ReportAck, ReportBatch},
};
use tokio::sync::watch;

use crate::topology::enter_netns;

pub struct ReportSink {
    /// `http://127.0.0.1:<port>` inside the network namespace it serves.
    pub url: String,
    batches: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What is committed once `batch` is: every window it carries.
fn acknowledge(batch: &ReportBatch) -> ReportAck {
    let mut committed = BTreeMap::new();
    for w in &batch.windows {
        let end = committed.entry(w.uid.clone()).or_insert(i64::MIN);
        *end = (*end).max(w.end());
    }
    ReportAck {
        collector: "flowlens-e2e-report-sink".into(),
        committed,
        policy_committed: batch
            .policy_windows
            .iter()
            .map(|w| w.end())
            .max()
            .unwrap_or(0),
    }
}

impl ReportSink {
    /// Serves on a loopback port of network namespace `netns` (where the
    /// agent runs).
    pub fn start(netns: &str) -> anyhow::Result<ReportSink> {
        let netns = netns.to_owned();
        let batches = Arc::new(AtomicU64::new(0));
        let counted = batches.clone();
        let (stop, stopped) = watch::channel(false);
        let (bound, port) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let listener = enter_netns(&netns).and_then(|()| {
                let l = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
                l.set_nonblocking(true)?;
                Ok(l)
            });
            let listener = match listener {
                Ok(l) => l,
                Err(e) => {
                    let _ = bound.send(Err(e));
                    return;
                }
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let _ = bound.send(Ok(listener.local_addr().expect("bound").port()));
                let closing = stopped.clone();
                let app =
                    Router::new()
                        .route(
                            "/v1/reports",
                            post(
                                |State(n): State<Arc<AtomicU64>>,
                                 Json(batch): Json<ReportBatch>| async move {
                                    n.fetch_add(1, Ordering::Relaxed);
                                    Json(acknowledge(&batch))
                                },
                            ),
                        )
                        .route(
                            "/v1/live",
                            post(move |Json(_): Json<LivePush>| {
                                let mut closing = closing.clone();
                                async move {
                                    let hold = Duration::from_secs(LIVE_POLL_HOLD_SECONDS);
                                    tokio::select! {
                                        _ = tokio::time::sleep(hold) => {}
                                        _ = closing.wait_for(|&c| c) => {}
                                    }
                                    Json(LiveReply { watching: false })
                                }
                            }),
                        )
                        .with_state(counted);
                let mut stopped = stopped;
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.wait_for(|&c| c).await;
                    })
                    .await;
            });
        });
        let port = port
            .recv()
            .map_err(|_| anyhow::anyhow!("the report sink's thread ended"))??;
        Ok(ReportSink {
            url: format!("http://127.0.0.1:{port}"),
            batches,
            stop,
            thread: Some(thread),
        })
    }

    /// Report batches taken so far.
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }
}

impl Drop for ReportSink {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowlens_api::report::{ObservationWindow, PolicyWindow};

    #[test]
    fn every_window_of_a_batch_is_acknowledged_up_to_its_latest_end() {
        let window = |uid: &str, start: i64| ObservationWindow {
            uid: uid.into(),
            start,
            window_seconds: 5,
            ..Default::default()
        };
        let batch = ReportBatch {
            node: "n".into(),
            agent: "a".into(),
            windows: vec![window("u", 100), window("u", 105), window("v", 100)],
            policy_windows: vec![PolicyWindow {
                start: 100,
                window_seconds: 10,
                ..Default::default()
            }],
        };
        let ack = acknowledge(&batch);
        assert_eq!(ack.committed["u"], 110);
        assert_eq!(ack.committed["v"], 105);
        assert_eq!(ack.policy_committed, 110);
    }
}
