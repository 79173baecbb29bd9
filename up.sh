#!/usr/bin/env bash
# Bring the lab up on a fresh Debian or Ubuntu machine, as root:
#   ./up.sh                              # inventory/local
#   ./up.sh inventory/multihost -e ...   # another inventory, more ansible-playbook options
# Installs the controller's tools first (tests/setup.sh: the venv with the pinned Ansible and
# collections, Debian's packages, the Docker engine with the lab's own docker role), then runs
# `ansible-playbook site.yml`. With the tools in place, `ansible-playbook site.yml -i INVENTORY` is
# the same thing.
set -euo pipefail
cd "$(dirname "$0")"
inventory=inventory/local
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  inventory=$1
  shift
fi
bash tests/setup.sh
export ANSIBLE_CONFIG=$PWD/ansible.cfg
exec .venv/bin/ansible-playbook site.yml -i "$inventory" "$@"
