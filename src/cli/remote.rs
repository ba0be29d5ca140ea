//! PostgreSQL access for CLI commands (`--database-url`, `follow`): a small runtime per command and
//! read-only sessions, so a remote device can look but never change anything.

use std::future::Future;

use anyhow::Result;
use tokio_postgres::Client;

pub fn block_on<T>(f: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

pub async fn connect_read_only(url: &str, schema: &str) -> Result<Client> {
    let client = crate::mirror::postgres::connect_existing(url, schema).await?;
    client
        .batch_execute("SET default_transaction_read_only = on")
        .await?;
    Ok(client)
}
