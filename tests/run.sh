#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need (idempotently), then
# runs every test. `bash .ci/run` calls exactly this script.
#
#   Debian's chromium      the browser the twilio-video SDK runs in (tests/browser.rs, media.rs,
#                          compat.rs)
#   Debian's firefox-esr   the second engine the SDK runs in (tests/compat.rs)
#   Debian's WebKitGTK     the third (webkit2gtk-driver's WebKitWebDriver and MiniBrowser, under
#                          xvfb's Xvfb; tests/compat.rs)
#   Debian's coturn        the stand-in for Twilio's TURN servers (tests/media.rs)
#   Debian's prometheus    Prometheus 2.42 and promtool: the alert rules' unit tests, and every
#                          rule and dashboard query evaluated against a scraped relay
#                          (tests/prometheus.rs); systemd-analyze, which checks the systemd unit
#                          (tests/systemd.rs), comes with Debian's systemd
#   npm packages           twilio-video (several releases, as npm aliases), playwright-core and
#                          puppeteer-core, pinned in tests/browser/package-lock.json
#   websocat 1.x           the real tool operators use (tests/websocat.rs), via cargo install
#   kubernetes-validate    validates config/kubernetes (tests/kubernetes.rs), in a venv from PyPI
#   sslyze                 audits the listener's TLS (tests/tls_audit.rs), in a venv from PyPI
#   cargo-fuzz             runs the fuzz targets for a bounded time (tests/fuzz.sh)
#   Autobahn|Testsuite     wstest's fuzzing client (tests/autobahn.rs), by ../shared/tools/autobahn
#                          into /opt/autobahn, with its own Python 2.7 (the system's is untouched)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

apt_packages=()
command -v chromium >/dev/null || apt_packages+=(chromium)
command -v firefox-esr >/dev/null || apt_packages+=(firefox-esr)
command -v WebKitWebDriver >/dev/null || apt_packages+=(webkit2gtk-driver)
command -v Xvfb >/dev/null || apt_packages+=(xvfb)
command -v turnserver >/dev/null || apt_packages+=(coturn)
command -v prometheus >/dev/null && command -v promtool >/dev/null || apt_packages+=(prometheus)
command -v systemd-analyze >/dev/null || apt_packages+=(systemd)
command -v node >/dev/null && command -v npm >/dev/null || apt_packages+=(nodejs npm)
if ! websocat --version 2>/dev/null | grep -q '^websocat 1\.'; then
    # websocat 1.x links OpenSSL.
    pkg-config --exists openssl 2>/dev/null || apt_packages+=(libssl-dev pkg-config)
fi
command -v python3 >/dev/null || apt_packages+=(python3)
python3 -c 'import ensurepip' 2>/dev/null || apt_packages+=(python3-venv)
if [ ${#apt_packages[@]} -gt 0 ]; then
    echo "tests/run.sh: installing ${apt_packages[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${apt_packages[@]}" >/dev/null
fi

if ! websocat --version 2>/dev/null | grep -q '^websocat 1\.'; then
    echo "tests/run.sh: installing websocat 1.x"
    cargo install --locked --quiet websocat --version '^1'
fi

# kubernetes-validate checks config/kubernetes against the schemas it ships (offline).
kv_venv="$HOME/.cache/sigrelay/kubernetes-validate-1.37.0"
if [ ! -x "$kv_venv/bin/kubernetes-validate" ]; then
    echo "tests/run.sh: installing kubernetes-validate 1.37.0"
    python3 -m venv "$kv_venv"
    "$kv_venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate==1.37.0
fi
export PATH="$kv_venv/bin:$PATH"

sslyze_venv="$HOME/.cache/sigrelay/sslyze-6.3.1"
if [ ! -x "$sslyze_venv/bin/sslyze" ]; then
    echo "tests/run.sh: installing sslyze 6.3.1"
    python3 -m venv "$sslyze_venv"
    "$sslyze_venv/bin/pip" install --quiet --disable-pip-version-check sslyze==6.3.1
fi
export PATH="$PATH:$sslyze_venv/bin"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "tests/run.sh: installing cargo-fuzz"
    cargo install --locked --quiet cargo-fuzz
fi

autobahn=../shared/tools/autobahn/setup.sh
if [ -f "$autobahn" ]; then
    # Idempotent: a few seconds when already installed.
    $sudo env AUTOBAHN_SETUP_SELFTEST=0 bash "$autobahn" >/dev/null
fi

if ! (cd tests/browser && npm ls --silent >/dev/null 2>&1); then
    echo "tests/run.sh: installing the browser test's npm packages"
    (cd tests/browser && npm ci --no-audit --no-fund --silent)
fi

# CI=true makes the browser, media, websocat, Kubernetes, TLS audit, Prometheus, systemd and
# Autobahn tests fail, not skip, when something above is missing.
cargo test --locked --all-targets

# Every fuzz target for a bounded time (FUZZ_SECONDS each, default 15); longer runs by hand.
bash tests/fuzz.sh
