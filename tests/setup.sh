#!/usr/bin/env bash
# Set up a controller for the lab and its tests: the Python venv (.venv) with the pinned
# controller tools and the app's dependencies, the collections, and the Debian packages the
# tests use on the controller (Prometheus/promtool for expression checks, debootstrap, tc).
# Idempotent; safe to run again. The Docker engine is installed and started by the lab's own docker
# role (tests/engine.yml), so a fresh machine needs nothing but Debian's and PyPI's archives.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  need=()
  for pkg in python3-venv prometheus debootstrap iproute2 ca-certificates curl; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
  done
  if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=.venv/.flowerlab-installed
want=$( (cat requirements.txt app/pyproject.toml requirements.yml; echo compiled) | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python requirements into .venv"
  .venv/bin/pip install -q --no-compile -r requirements.txt -e ./app
  # Byte-compiled once, here, on both cores: where PYTHONDONTWRITEBYTECODE is set (as on the machines
  # the README's test times were measured on) Python never caches what it compiles, and every
  # ansible-playbook, module run, Molecule and pytest process compiled its imports again (30 command
  # tasks: 18.6 s without, 9.2 s with; a whole tests/run.sh 2731 s without, 2500 s with). The collections
  # the lab does not use (all but requirements.yml's) are left out: half the files, about 20 s of the 40
  # it takes.
  used=$(sed -n 's/^ *- name: \([a-z_]*\)\.\([a-z_]*\)$/\1\/\2/p' requirements.yml | paste -sd'|')
  .venv/bin/python -m compileall -q -j 0 -x "ansible_collections/(?!($used)/)" .venv/lib/python3*/site-packages \
    >/dev/null
  echo "$want" > "$stamp"
fi
.venv/bin/ansible-galaxy collection install --offline -r requirements.yml >/dev/null
ANSIBLE_CONFIG=$PWD/ansible.cfg ANSIBLE_ROLES_PATH=$PWD/roles \
  .venv/bin/ansible-playbook -i localhost, tests/engine.yml >/tmp/flowerlab-engine.log 2>&1 \
  || { tail -40 /tmp/flowerlab-engine.log; echo "setup: the docker role could not start an engine" >&2; exit 1; }
echo "setup: Docker engine $(docker version --format '{{.Server.Version}}')"
echo "setup: ready (.venv: $(.venv/bin/ansible --version | sed -n 1p))"
