#!/usr/bin/env bash
# Install everything the tests need and run the whole suite (README's test command; .ci/run calls it).
# As root on Debian it first installs the Debian packages the tests talk to; as another user it expects them.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v smtp-sink >/dev/null || need+=(postfix)
command -v swaks >/dev/null || need+=(swaks)
perl -MMail::DKIM::Verifier -e1 2>/dev/null || need+=(libmail-dkim-perl)
ldconfig -p | grep -q libopendkim || need+=(libopendkim11)
command -v openssl >/dev/null || need+=(openssl)
command -v chromium >/dev/null || need+=(chromium chromium-driver fonts-dejavu-core fonts-liberation)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v promtool >/dev/null || need+=(prometheus)
command -v pg_ctlcluster >/dev/null || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing Debian packages (run as root to install them): ${need[*]}" >&2
    else
        # never ask, never touch a system mail setup: postfix is only here for smtp-sink/smtp-source
        echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q --no-install-recommends "${need[@]}"
    fi
fi

# the multi-node tests share state in a real PostgreSQL
if command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster 15 main start 2>/dev/null || pg_ctlcluster 15 main status >/dev/null
fi

# two processes (pytest-xdist), a test file each at a time: the suite is mostly waiting on real peers and
# daemons, so two workers on two cores take ~7 minutes where one takes ~12
python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' &&
    .venv/bin/python -m pytest -n "${RELAYD_TEST_JOBS:-2}" --dist loadfile "$@"
