#!/usr/bin/env bash
# The lab's test command. With no argument it runs every stage in order; name stages to run
# only those, e.g. `tests/run.sh lint unit`. Each stage prints one timing line; the last line
# counts the stages that passed and failed. Exit status is non-zero when any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD

all_stages=(setup lint unit app-e2e lab-e2e molecule)
# Every role's scenario, then the multi-host lab.
molecule_scenarios=(docker lab_common lab_images lab_preflight node_exporter cadvisor prometheus grafana
                    flower_superlink flower_supernodes flower_run lab)
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=("${all_stages[@]}")

export PATH="$root/.venv/bin:$PATH"
export ANSIBLE_CONFIG="$root/ansible.cfg"
export ANSIBLE_ROLES_PATH="$root/roles"
export ANSIBLE_FORCE_COLOR=0 PY_COLORS=0 ANSIBLE_NOCOLOR=1

stage_setup()   { bash tests/setup.sh; }
stage_lint() {
  yamllint -s . && ansible-lint && ruff check . && ruff format --check app tests
}
stage_unit() {
  pytest -q -m "not e2e" app/tests tests/dashboards \
    && promtool check rules roles/prometheus/files/rules/*.yml \
    && promtool test rules tests/prometheus/*_test.yml
}
stage_app_e2e() { pytest -q -m e2e app/tests; }
stage_lab_e2e() { pytest -q tests/e2e; }
stage_molecule() {
  local rc=0 s t0
  for s in "${molecule_scenarios[@]}"; do
    t0=$SECONDS
    if molecule test -s "$s"; then
      echo "molecule: $s passed in $((SECONDS - t0)) s"
    else
      echo "molecule: $s FAILED after $((SECONDS - t0)) s"; rc=1
    fi
  done
  return $rc
}

passed=0; failed=0; report=()
for stage in "${stages[@]}"; do
  fn="stage_${stage//-/_}"
  if ! declare -F "$fn" >/dev/null; then
    echo "tests/run.sh: unknown stage '$stage' (stages: ${all_stages[*]})" >&2; exit 2
  fi
  echo "=== stage $stage"
  t0=$SECONDS
  if "$fn"; then
    passed=$((passed + 1)); report+=("stage $stage: passed in $((SECONDS - t0)) s")
  else
    failed=$((failed + 1)); report+=("stage $stage: FAILED after $((SECONDS - t0)) s")
  fi
  echo "${report[-1]}"
done
echo "=== timings"
printf '%s\n' "${report[@]}"
echo "stages: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
