//! TLS served by kaiwa itself, with certificates made by the test: `https://` and `wss://`
//! work, plain connections to the TLS port do not, and a renewed certificate is picked up from
//! the next connection on, with no restart.

mod support;

use futures::{SinkExt, StreamExt};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use support::{TestApp, eventually};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;

/// A self-signed certificate for `localhost` and 127.0.0.1, written as `cert.pem` and `key.pem`
/// in `dir`; returns the certificate's DER.
fn certificate(dir: &Path) -> CertificateDer<'static> {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("a certificate");
    std::fs::write(dir.join("cert.pem"), made.cert.pem()).expect("written");
    std::fs::write(dir.join("key.pem"), made.signing_key.serialize_pem()).expect("written");
    made.cert.der().clone()
}

async fn tls_app(dir: &Path) -> TestApp {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    TestApp::spawn(&[
        "--tls-cert",
        cert.to_str().expect("a path"),
        "--tls-key",
        key.to_str().expect("a path"),
    ])
    .await
}

/// A TLS connection to `app` that trusts `trusted` only; `None` when the handshake fails.
async fn connect_tls(
    app: &TestApp,
    trusted: &CertificateDer<'static>,
) -> Option<TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.clone()).expect("a root");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(app.addr).await.expect("connects");
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").expect("a name"), tcp)
        .await
        .ok()
}

#[tokio::test]
async fn https_and_wss_work_with_the_configured_certificate() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let der = certificate(dir.path());
    let app = tls_app(dir.path()).await;
    let pem = std::fs::read(dir.path().join("cert.pem")).expect("read");
    let https = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).expect("a certificate")])
        .build()
        .expect("a client");
    let health: Value = https
        .get(format!("https://localhost:{}/health", app.addr.port()))
        .send()
        .await
        .expect("HTTPS works")
        .json()
        .await
        .expect("JSON");
    assert_eq!(health["status"], "ok", "{health}");

    let tls = connect_tls(&app, &der).await.expect("the TLS handshake");
    let url = format!("wss://localhost:{}/ws", app.addr.port());
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls)
        .await
        .expect("the WebSocket upgrade over TLS");
    let hello = json!({"type": "hello", "client_id": "secure", "timezone": "UTC"});
    ws.send(Message::text(hello.to_string()))
        .await
        .expect("sent");
    let welcome = loop {
        match ws.next().await.expect("a frame").expect("readable") {
            Message::Text(text) => break serde_json::from_str::<Value>(&text).expect("JSON"),
            _ => continue,
        }
    };
    assert_eq!(welcome["type"], "welcome", "{welcome}");
}

#[tokio::test]
async fn plain_http_to_the_tls_port_gets_nothing() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    certificate(dir.path());
    let app = tls_app(dir.path()).await;
    let plain = reqwest::get(format!("http://127.0.0.1:{}/health", app.addr.port())).await;
    assert!(plain.is_err(), "{plain:?}");
}

#[tokio::test]
async fn a_renewed_certificate_is_served_from_the_next_connection_on() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let first = certificate(dir.path());
    let app = tls_app(dir.path()).await;
    let served = |tls: &TlsStream<TcpStream>| {
        tls.get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first().cloned())
    };
    let tls = connect_tls(&app, &first).await.expect("the TLS handshake");
    assert_eq!(served(&tls), Some(first));
    drop(tls);

    let renewed = certificate(dir.path());
    eventually("the renewed certificate", || async {
        let tls = connect_tls(&app, &renewed).await?;
        (served(&tls) == Some(renewed.clone())).then_some(())
    })
    .await;
}

#[test]
fn a_key_that_is_not_the_certificates_stops_kaiwa_at_start() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    certificate(dir.path());
    let other = tempfile::tempdir().expect("a temporary directory");
    certificate(other.path());
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kaiwa"))
        .arg("serve")
        .args(["--bind", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .arg("--tls-cert")
        .arg(dir.path().join("cert.pem"))
        .arg("--tls-key")
        .arg(other.path().join("key.pem"))
        .current_dir(dir.path())
        .env_remove("KAIWA_DATABASE_URL")
        .env_remove("DATABASE_URL")
        .output()
        .expect("kaiwa runs");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let printed = String::from_utf8_lossy(&output.stderr);
    assert!(printed.contains("--tls-key"), "{printed}");
    assert!(!printed.contains("PRIVATE KEY"), "{printed}");
}

/// The warnings kaiwa logs at start when it is run as `args` (beyond loopback).
async fn start_warnings(args: &[&str]) -> Vec<String> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut command = support::serve_command(dir.path());
    command.args(args);
    let mut started = support::start_listening("kaiwa", &mut command, dir.path()).await;
    started.child.kill().await.ok();
    started.warnings
}

#[tokio::test]
async fn tokens_in_the_clear_and_an_open_admin_address_beyond_loopback_are_warned_about() {
    let secret = support::tokens::SECRET;
    let warnings = start_warnings(&[
        "--bind",
        "0.0.0.0:0",
        "--admin-bind",
        "0.0.0.0:0",
        "--auth-secret",
        secret,
    ])
    .await;
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("tokens travel in the clear")),
        "{warnings:?}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("--admin-bind is beyond loopback")),
        "{warnings:?}"
    );
    // With TLS, and on loopback, nothing to say.
    let dir = tempfile::tempdir().expect("a temporary directory");
    certificate(dir.path());
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let warnings = start_warnings(&[
        "--bind",
        "0.0.0.0:0",
        "--admin-bind",
        "127.0.0.1:0",
        "--auth-secret",
        secret,
        "--tls-cert",
        cert.to_str().expect("a path"),
        "--tls-key",
        key.to_str().expect("a path"),
    ])
    .await;
    assert!(
        !warnings
            .iter()
            .any(|w| w.contains("in the clear") || w.contains("--admin-bind")),
        "{warnings:?}"
    );
}
