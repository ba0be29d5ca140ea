//! PostgreSQL mirror figures (`cargo bench --bench pg_mirror`; needs the server on 127.0.0.1:5432 or
//! ORCHESTRATE_TEST_DATABASE_URL). Prints:
//! 1. transitions mirrored per second by the writer's batch `apply`, at several batch sizes;
//! 2. drop → NOTIFY latency: a task file renamed into `pending/` of a running supervisor, until a
//!    LISTENing connection receives the notification of its first transition (p50/p99/max).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use orchestrate::mirror::{Op, Payload, TaskRow, postgres};

fn url() -> String {
    std::env::var("ORCHESTRATE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn throughput(schema: &str) {
    let mut c = postgres::connect(&url(), schema).await.expect("connect");
    postgres::migrate(&mut c).await.expect("migrate");
    for batch in [1usize, 10, 100, 500] {
        let n = if batch == 1 { 2_000 } else { 20_000 };
        let ops: Vec<Op> = (0..n)
            .map(|i| Op::Upsert {
                row: TaskRow {
                    id: format!("b{batch}_{}", i / 3),
                    version: (i % 3) as u64 + 1,
                    state: ["pending", "running", "completed"][i % 3].into(),
                    agent: Some("bench".into()),
                    payload: Payload {
                        description: "benchmark task".into(),
                        file: format!("pending/b{i}.yaml"),
                        ..Default::default()
                    },
                    updated_at: "2026-01-01T00:00:00.000Z".into(),
                    note: None,
                },
                attempts: vec![],
            })
            .collect();
        let t = Instant::now();
        for chunk in ops.chunks(batch) {
            postgres::apply(&mut c, "bench", &postgres::channel(schema), chunk)
                .await
                .expect("apply");
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "apply, batch {batch:>3}: {n} transitions in {secs:.2} s = {:.0} transitions/s",
            n as f64 / secs
        );
    }
}

async fn notify_lag(schema: &str, drops: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let bin = env!("CARGO_BIN_EXE_orchestrate");
    assert!(
        std::process::Command::new(bin)
            .arg("-C")
            .arg(root)
            .arg("init")
            .output()
            .expect("init")
            .status
            .success()
    );
    std::fs::write(
        root.join("config.yaml"),
        format!(
            "orchestrator: {{max_concurrent: 8, log_level: warn}}\ndatabase: {{url: \"{}\", schema: {schema}}}\n\
             agents: {{noop: {{kind: command, command: \"true\", max_instances: 8}}}}\nrouting: {{fallback: [noop]}}\n",
            url()
        ),
    )
    .expect("config");
    let mut sup = std::process::Command::new(bin)
        .arg("-C")
        .arg(root)
        .arg("start")
        .spawn()
        .expect("start");
    let (client, mut conn) = postgres::pg_config(&url())
        .expect("url")
        .connect(postgres::tls().expect("tls"))
        .await
        .expect("connect");
    let (tx, mut notes) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut s = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = s.next().await {
            if let tokio_postgres::AsyncMessage::Notification(_) = m {
                let _ = tx.send(Instant::now());
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {}", postgres::channel(schema)))
        .await
        .expect("listen");
    // Let the writer connect and settle before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    while notes.try_recv().is_ok() {}
    let mut lags = Vec::new();
    for i in 0..drops {
        let tmp = root.join(format!("tasks/pending/.l{i}.tmp"));
        std::fs::write(&tmp, "description: no-op\n").expect("write");
        let t0 = Instant::now();
        std::fs::rename(&tmp, root.join(format!("tasks/pending/l{i:04}.yaml"))).expect("rename");
        let got = tokio::time::timeout(Duration::from_secs(10), notes.recv())
            .await
            .expect("a NOTIFY within 10 s");
        lags.push(got.expect("channel").duration_since(t0).as_secs_f64() * 1000.0);
        // Let the task finish and its notifications drain before the next drop.
        tokio::time::sleep(Duration::from_millis(30)).await;
        while notes.try_recv().is_ok() {}
    }
    unsafe { libc::kill(sup.id() as i32, libc::SIGTERM) };
    let _ = sup.wait();
    lags.sort_by(f64::total_cmp);
    println!(
        "drop → NOTIFY over {drops} drops: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pct(&lags, 0.5),
        pct(&lags, 0.99),
        lags.last().copied().unwrap_or(0.0)
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let schema = format!("bench_{}", std::process::id());
    rt.block_on(async {
        throughput(&schema).await;
        notify_lag(&format!("{schema}_lag"), 300).await;
        let (c, conn) = tokio_postgres::connect(&url(), tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        c.batch_execute(&format!(
            "DROP SCHEMA {schema} CASCADE; DROP SCHEMA {schema}_lag CASCADE"
        ))
        .await
        .expect("cleanup");
    });
}
