//! A PostgreSQL database of a test's own: created on the server the tests use, and dropped
//! when the test is done, so that runs never see each other's data. Shared by the store's
//! contract tests (in the library) and the integration tests.
//!
//! The server is the one in `KAIWA_TEST_POSTGRES` (an URL of a database to connect to for
//! creating others), by default `postgres://postgres@127.0.0.1:5432/postgres`. A test that
//! cannot reach it fails and says so: it is never skipped.

#![allow(dead_code, unreachable_pub)]

use sqlx::{Connection, PgConnection};

const DEFAULT_SERVER: &str = "postgres://postgres@127.0.0.1:5432/postgres";

pub struct TestDatabase {
    /// The URL of the test's database.
    pub url: String,
    name: String,
    server: String,
}

fn server() -> String {
    std::env::var("KAIWA_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_SERVER.to_owned())
}

async fn connect(server: &str) -> PgConnection {
    match PgConnection::connect(server).await {
        Ok(conn) => conn,
        Err(err) => panic!(
            "the PostgreSQL the tests use cannot be reached ({err}). Start it \
             (`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`, as \
             scripts/test.sh does) or point KAIWA_TEST_POSTGRES at another server"
        ),
    }
}

impl TestDatabase {
    pub async fn create() -> TestDatabase {
        let server = server();
        let mut conn = connect(&server).await;
        let name = format!("kaiwa_test_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("the test database is created");
        conn.close().await.ok();
        // The same server and credentials, another database.
        let (base, query) = match server.split_once('?') {
            Some((base, query)) => (base, format!("?{query}")),
            None => (server.as_str(), String::new()),
        };
        let (prefix, _) = base
            .rsplit_once('/')
            .expect("KAIWA_TEST_POSTGRES is a postgres:// URL with a database");
        let url = format!("{prefix}/{name}{query}");
        TestDatabase { url, name, server }
    }

    /// A connection of the test's own to its database, to look or to hold locks.
    pub async fn connect(&self) -> PgConnection {
        connect(&self.url).await
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let server = self.server.clone();
        let name = self.name.clone();
        // Drop cannot await: a thread of its own runs the statement to its end.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async {
                let mut conn = connect(&server).await;
                let drop_database = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                sqlx::query(sqlx::AssertSqlSafe(drop_database))
                    .execute(&mut conn)
                    .await
                    .map(drop)
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop the test database {}", self.name);
        }
    }
}
