#!/usr/bin/env bash
# Runs the whole test suite, the way CI does: formatting, lints, every test in the workspace,
# schemathesis against the HTTP API's OpenAPI document, then the browser client's tests in
# headless Chromium. Installs or starts what the tests need first, so it works on a fresh
# machine; a prerequisite it cannot get fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
fail() { printf '\nerror: %s\n' "$*" >&2; exit 1; }
# Installs Debian package $1 with apt-get (as root, or with sudo), updating the package lists
# if the first attempt fails; $2 says what needs it; more arguments go to apt-get install.
install_package() {
  local package=$1 why=$2 sudo=""
  shift 2
  command -v apt-get >/dev/null || fail "$package is missing and there is no apt-get to install it: $why"
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || fail "$package is missing; installing it needs root (or sudo): $why"
    sudo=sudo
  fi
  echo "installing $package"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y "$@" "$package" || { $sudo apt-get update && $sudo apt-get install -y "$@" "$package"; } \
    || fail "could not install $package with apt-get"
}

step "toolchain"
cargo --version
if ! cargo nextest --version >/dev/null 2>&1; then
  step "installing cargo-nextest"
  cargo install cargo-nextest --locked
fi

step "formatting"
cargo fmt --all -- --check

step "lints"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "services: PostgreSQL"
# The store's contract and the server's PostgreSQL tests make a database of their own on this
# server and drop it after; KAIWA_TEST_POSTGRES points them at another one.
pg_url="${KAIWA_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432/postgres}"
pg_start='pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start'
pg_ready() {
  if command -v pg_isready >/dev/null; then
    pg_isready -q -d "$pg_url"
  else
    # No client tools: at least something must listen on the port.
    (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null
  fi
}
if ! pg_ready; then
  if [ -z "${KAIWA_TEST_POSTGRES:-}" ] && command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    echo "PostgreSQL does not answer; starting it: $pg_start"
    sh -c "$pg_start" || true
    for _ in $(seq 1 30); do
      pg_ready && break
      sleep 1
    done
  fi
  pg_ready || fail "PostgreSQL does not answer at ${KAIWA_TEST_POSTGRES:-127.0.0.1:5432}: start it ($pg_start) or set KAIWA_TEST_POSTGRES to a server the tests may create databases on"
fi
echo "PostgreSQL answers"
# tests/backup.rs runs README's backup procedure for PostgreSQL with the server's own tools.
command -v pg_dump >/dev/null && command -v pg_restore >/dev/null \
  || install_package postgresql-client "tests/backup.rs backs up with pg_dump and restores with pg_restore"

step "services: RabbitMQ"
# The cluster tests make a vhost of their own with rabbitmqctl and delete it after;
# KAIWA_TEST_AMQP points them at another broker (without the vhost).
rabbit_start='rabbitmq-server -detached'
rabbit_ready() { rabbitmqctl -q status >/dev/null 2>&1 && (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
command -v rabbitmqctl >/dev/null || fail "rabbitmqctl is missing: the cluster tests need RabbitMQ (Debian package rabbitmq-server)"
if ! rabbit_ready; then
  echo "RabbitMQ does not answer; starting it: $rabbit_start"
  sh -c "$rabbit_start" || true
  for _ in $(seq 1 60); do
    rabbit_ready && break
    sleep 1
  done
  rabbit_ready || fail "RabbitMQ does not answer on 127.0.0.1:5672: start it ($rabbit_start)"
fi
echo "RabbitMQ answers"

step "Prometheus: deploy/prometheus checked, its rules unit-tested"
# promtool checks the configurations and rules; tests/operators.rs runs a real Prometheus.
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  install_package prometheus "promtool checks deploy/prometheus, and tests/operators.rs runs Prometheus" \
    --no-install-recommends
  # Where the package may start its own service (on port 9090; not where policy-rc.d forbids
  # it, as in containers), it is stopped and disabled: the test runs a Prometheus of its own.
  if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl disable --now prometheus || true
  elif [ -x /etc/init.d/prometheus ] && /etc/init.d/prometheus status >/dev/null 2>&1; then
    /etc/init.d/prometheus stop || true
    update-rc.d prometheus disable >/dev/null 2>&1 || true
  fi
fi
command -v promtool >/dev/null || fail "promtool is missing after installing Debian's prometheus package"
command -v prometheus >/dev/null || fail "prometheus is missing after installing Debian's prometheus package"
promtool check config deploy/prometheus/*.yml || fail "deploy/prometheus: a configuration does not check"
promtool check rules deploy/prometheus/rules/*.yml || fail "deploy/prometheus/rules does not check"
promtool test rules deploy/prometheus/tests/*.yml || fail "deploy/prometheus/tests: a rule's unit test failed"

step "deploy/compose.yaml (docker-compose config; the files it mounts exist)"
command -v docker-compose >/dev/null || install_package docker-compose "it checks deploy/compose.yaml" --no-install-recommends
compose_config="$(KAIWA_AUTH_SECRET=only-checked KAIWA_TLS_DIR=/only-checked docker-compose -f deploy/compose.yaml config)" \
  || fail "deploy/compose.yaml is not a valid Compose file (see above)"
# Bind mounts of files in the repository (docker-compose prints them as absolute paths).
for source in $(sed -n "s#^ *- \($PWD/deploy/[^:]*\):.*#\1#p" <<<"$compose_config"); do
  [ -e "$source" ] || fail "deploy/compose.yaml mounts $source, which does not exist"
done
echo "deploy/compose.yaml is valid"

step "tests"
cargo nextest run --workspace --locked --no-fail-fast -E 'not binary(cluster_faults)' "$@"

step "tests that stop RabbitMQ and PostgreSQL (alone, one at a time)"
# They stop services the other tests use: nothing else may run meanwhile.
cargo nextest run -p kaiwa --locked --no-fail-fast --test cluster_faults --test-threads 1 "$@"

step "browser tests: prerequisites"
chromium_path="${CHROMIUM_PATH:-/usr/bin/chromium}"
if [ ! -x "$chromium_path" ]; then
  [ "$chromium_path" = /usr/bin/chromium ] || fail "CHROMIUM_PATH=$chromium_path is not an executable"
  install_package chromium "the browser tests drive it (or set CHROMIUM_PATH)"
fi
"$chromium_path" --version 2>/dev/null || fail "$chromium_path does not run"
command -v node >/dev/null || fail "Node.js 20 or newer is needed for the browser tests (node not found)"
node_major="$(node -p 'process.versions.node.split(".")[0]')"
[ "$node_major" -ge 20 ] || fail "Node.js 20 or newer is needed for the browser tests (found $(node --version))"
command -v npm >/dev/null || fail "npm is needed for the browser tests (not found)"
echo "node $(node --version), npm $(npm --version 2>/dev/null)"
(cd web/tests && npm ci --no-audit --no-fund)

step "browser tests: building kaiwa"
# The page is embedded in the binary at compile time: build it after any change to web/. The
# binaries are wherever cargo put them (CARGO_TARGET_DIR, build.target-dir, --target): ask
# cargo. The dev_cert example makes the certificate of the test that loads the page over https.
built="$(cargo build -p kaiwa --bin kaiwa --example dev_cert --locked --message-format=json-render-diagnostics | node -e '
  let text = "";
  process.stdin.on("data", (chunk) => { text += chunk; });
  process.stdin.on("end", () => {
    const messages = text.split("\n").filter(Boolean).map((line) => JSON.parse(line));
    const executable = (name, kind) => messages.find((message) =>
      message.reason === "compiler-artifact" && message.target.name === name
      && message.target.kind.includes(kind) && message.executable)?.executable;
    const kaiwa = executable("kaiwa", "bin");
    const devCert = executable("dev_cert", "example");
    if (!kaiwa || !devCert) {
      console.error("cargo reported no kaiwa or dev_cert executable");
      process.exit(1);
    }
    console.log(`${kaiwa}\n${devCert}`);
  });
')" || fail "could not build kaiwa (see above)"
KAIWA_BIN="$(sed -n 1p <<<"$built")"
KAIWA_DEV_CERT_BIN="$(sed -n 2p <<<"$built")"
export KAIWA_BIN KAIWA_DEV_CERT_BIN
export BROWSER_TEST_OUTPUT="$PWD/target/browser-tests"
rm -rf "$BROWSER_TEST_OUTPUT"

step "TLS ended by HAProxy (deploy/haproxy.cfg checked, the cluster of scripts/cluster.sh over https and wss)"
command -v haproxy >/dev/null || install_package haproxy "the TLS check runs it in front of kaiwa"
command -v psql >/dev/null || fail "psql is needed to make the TLS check's database (Debian package postgresql-client)"
scripts/check-tls-proxy.sh "$KAIWA_BIN"

step "API fuzzing: prerequisites (schemathesis, in target/schemathesis)"
# schemathesis fuzzes the HTTP API against the OpenAPI document kaiwa serves; it comes from PyPI
# into a virtual environment of its own, made again when the pinned version changes.
schemathesis_version=4.32.5
venv=target/schemathesis
if [ "$("$venv/bin/st" --version 2>/dev/null)" != "st, version $schemathesis_version" ]; then
  command -v python3 >/dev/null || fail "python3 is needed to fuzz the HTTP API with schemathesis (not found)"
  rm -rf "$venv"
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    # Debian's python3 makes no virtual environment without python3-venv.
    install_package python3-venv "python3 -m venv makes schemathesis's environment"
    rm -rf "$venv"
    python3 -m venv "$venv" || fail "python3 -m venv $venv failed"
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$schemathesis_version" \
    || fail "could not install schemathesis $schemathesis_version from PyPI into $venv"
fi
"$venv/bin/st" --version
command -v curl >/dev/null || fail "curl is needed to wait for kaiwa in the API fuzzing (not found)"

step "API fuzzing (schemathesis against /api/openapi.json, auth off and on)"
scripts/api-fuzz.sh "$KAIWA_BIN" "$venv/bin/st"

step "browser tests (screenshots and logs in target/browser-tests/)"
(cd web/tests && node --test --test-concurrency=1 --test-reporter=spec)
