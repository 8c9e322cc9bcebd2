# kaiwa in a container: one image for every role (`serve`, `gateway`, `worker`, `migrate`).
#
#   docker build -t kaiwa .
#   docker run --rm kaiwa --help
#
# Not built or run on the machines where kaiwa is developed (no container engine runs there):
# see deploy/README.md. The tested way to run a cluster on one machine is scripts/cluster.sh.

# The workspace needs Rust 1.89 or newer (rust-version in Cargo.toml).
ARG RUST_VERSION=1

# ---- build ---------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src

# 1. Dependencies only, in a layer of their own: the manifests, the lock file and empty
#    targets. This layer is rebuilt only when a Cargo.toml or Cargo.lock changes. Every
#    workspace member's manifest is needed for --locked, kaiwa-load's too, though it is not
#    built.
COPY Cargo.toml Cargo.lock ./
COPY crates/kaiwa-protocol/Cargo.toml crates/kaiwa-protocol/
COPY crates/kaiwa/Cargo.toml crates/kaiwa/
COPY crates/kaiwa-load/Cargo.toml crates/kaiwa-load/
RUN mkdir -p crates/kaiwa-protocol/src crates/kaiwa/src crates/kaiwa-load/src/bin \
    && touch crates/kaiwa-protocol/src/lib.rs crates/kaiwa/src/lib.rs crates/kaiwa-load/src/lib.rs \
    && echo 'fn main() {}' > crates/kaiwa/src/main.rs \
    && echo 'fn main() {}' > crates/kaiwa-load/src/main.rs \
    && echo 'fn main() {}' > crates/kaiwa-load/src/bin/kaiwa-echo.rs \
    && cargo build --release --locked -p kaiwa \
    && rm -rf crates/*/src

# 2. The sources. What is compiled in: crates/ (Rust sources, and the SQL migrations and the
#    voice clips that sqlx::migrate! and include_bytes! embed) and the browser client's files
#    in web/ (embedded by crates/kaiwa/src/http/web.rs). .dockerignore keeps out the rest.
COPY crates crates
COPY web web
# COPY keeps the files' own modification times, which can be older than the empty targets
# built above: touch them so that cargo rebuilds the workspace's crates from the real sources.
RUN find crates -name '*.rs' -exec touch {} + \
    && cargo build --release --locked -p kaiwa --bin kaiwa \
    && install -m 0755 target/release/kaiwa /usr/local/bin/kaiwa

# ---- runtime -------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

# ca-certificates: the language model's API is called over HTTPS (rustls reads the system's
# roots). Nothing else: the health check below needs only bash, which the image has. Not
# pinned to a version (DL3008): bookworm's security updates replace it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A user of its own; /var/lib/kaiwa holds the SQLite file and uploads of a lone `serve`,
# /var/lib/kaiwa-media is where deploy/compose.yaml mounts the media volume the gateways share
# (made here so that a new named volume takes the kaiwa user as its owner).
RUN groupadd --system --gid 10001 kaiwa \
    && useradd --system --uid 10001 --gid kaiwa --home-dir /var/lib/kaiwa --shell /usr/sbin/nologin kaiwa \
    && mkdir -p /var/lib/kaiwa /var/lib/kaiwa-media \
    && chown kaiwa:kaiwa /var/lib/kaiwa /var/lib/kaiwa-media

COPY --from=build /usr/local/bin/kaiwa /usr/local/bin/kaiwa
COPY deploy/healthcheck.sh /usr/local/bin/kaiwa-healthcheck

# Listen on every address of the container. kaiwa refuses to start on such an address without
# auth (KAIWA_AUTH_SECRET or KAIWA_AUTH_SECRET_FILE) unless KAIWA_ALLOW_ANONYMOUS=true is set.
# Logs go to standard output only, which the container runtime collects and rotates: no log
# files in the volume (KAIWA_LOG_FILES=true brings them back, rotated daily).
ENV KAIWA_BIND=0.0.0.0:8082 \
    KAIWA_DATA_DIR=/var/lib/kaiwa \
    KAIWA_LOG_FILES=false

# Numeric, so that a runtime can tell it is not root without reading /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/kaiwa
VOLUME ["/var/lib/kaiwa"]
# The WebSocket, the HTTP API and the page (gateway, serve); /health and /metrics (worker).
EXPOSE 8082

# GET /health on the port of KAIWA_BIND: 200 while serving, 503 while draining or degraded.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/kaiwa-healthcheck"]

# kaiwa stops gracefully on SIGTERM (it lets messages in flight finish, up to
# KAIWA_SHUTDOWN_GRACE seconds): give it longer than that, e.g. `docker stop -t 30`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/kaiwa"]
CMD ["serve"]
