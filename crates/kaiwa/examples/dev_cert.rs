//! A self-signed certificate for trying TLS on this machine, and for the browser tests that
//! load the page over `https://`: writes `cert.pem` and `key.pem` for `localhost`, 127.0.0.1
//! and ::1 into a directory. Not for production: browsers trust it only when told to.
//!
//!     cargo run -p kaiwa --example dev_cert -- target/dev-cert
//!     cargo run --release -p kaiwa -- serve \
//!       --tls-cert target/dev-cert/cert.pem --tls-key target/dev-cert/key.pem

use anyhow::Context;
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: dev_cert <directory for cert.pem and key.pem>")?,
    );
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let names = ["localhost", "127.0.0.1", "::1"]
        .map(str::to_owned)
        .to_vec();
    let made = rcgen::generate_simple_self_signed(names).context("cannot make a certificate")?;
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, made.cert.pem())
        .with_context(|| format!("cannot write {}", cert.display()))?;
    std::fs::write(&key, made.signing_key.serialize_pem())
        .with_context(|| format!("cannot write {}", key.display()))?;
    println!("{}\n{}", cert.display(), key.display());
    Ok(())
}
