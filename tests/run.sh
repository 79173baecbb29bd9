#!/usr/bin/env bash
# The lab's test command. With no argument it runs every stage in order; name stages to run
# only those, e.g. `tests/run.sh lint unit`. Each stage prints one timing line; the last line
# counts the stages that passed and failed. Exit status is non-zero when any stage failed.
# Each stage's output is also kept in .cache/test-logs/<stage>.log; for a failed stage the lines
# that say what failed (pytest's FAILED/E lines, Ansible's fatal lines) are repeated before the
# timings, so the end of the output is enough to know why.
# lab-e2e and molecule, when both are asked for, run side by side (they share nothing but the
# machine and the images, which the images stage builds first): most Molecule scenarios beside
# lab-e2e, the rest after it; their logs are printed when both have ended.
# FLOWERLAB_TEST_SERIAL=1 runs them one after the other.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD

all_stages=(setup lint unit app-e2e images lab-e2e molecule)
# Every role's scenario (the three Flower roles share flower_supernodes) and the multi-host lab.
# Side by side with lab-e2e, the first group runs after lab-e2e and the second beside it (lanes of
# about equal time on 2 cores, as measured).
molecule_after_lab_e2e=(lab_common)
molecule_beside=(prometheus grafana flower_supernodes lab_images docker node_exporter lab lab_preflight cadvisor)
molecule_scenarios=("${molecule_after_lab_e2e[@]}" "${molecule_beside[@]}")
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=("${all_stages[@]}")

export PATH="$root/.venv/bin:$PATH"
export ANSIBLE_CONFIG="$root/ansible.cfg"
export ANSIBLE_ROLES_PATH="$root/roles"
export ANSIBLE_FORCE_COLOR=0 PY_COLORS=0 ANSIBLE_NOCOLOR=1
export COLUMNS=200  # pytest's one-line failure summaries are cut at the terminal width
logs="$root/.cache/test-logs"
mkdir -p "$logs"

stage_setup()   { bash tests/setup.sh; }
stage_lint() {
  yamllint -s . && ansible-lint && ruff check . && ruff format --check app tests
}
stage_unit() {
  pytest -q -m "not e2e" app/tests tests/dashboards tests/preflight tests/filters tests/modules \
    && promtool check rules roles/prometheus/files/rules/*.yml \
    && promtool test rules tests/prometheus/*_test.yml
}
stage_app_e2e() { pytest -q --durations=15 -m e2e app/tests; }
# The lab's images, built once on this machine (when missing or stale) before the stages that use them.
stage_images() { ansible-playbook playbooks/images.yml -i inventory/local; }
stage_lab_e2e() { pytest -q --durations=30 tests/e2e; }
stage_molecule() {  # [scenario ...] (default: every scenario)
  local rc=0 s t0 scenarios=("$@")
  [ ${#scenarios[@]} -gt 0 ] || scenarios=("${molecule_scenarios[@]}")
  for s in "${scenarios[@]}"; do
    t0=$SECONDS
    if molecule test -s "$s"; then
      echo "molecule: $s passed in $((SECONDS - t0)) s"
    else
      echo "molecule: $s FAILED after $((SECONDS - t0)) s"; rc=1
    fi
  done
  return $rc
}

# What a failed stage's log says about the failure: at most 30 lines, the last ones.
failure_lines() {
  grep -E '^(FAILED|ERROR) |^E  |^fatal: |^failed: |FAILED after|Error: |error: ' "$1" | cut -c1-300 | tail -n 30
}

passed=0; failed=0; report=(); failed_stages=()
record() {  # stage, exit status, seconds
  if [ "$2" -eq 0 ]; then
    passed=$((passed + 1)); report+=("stage $1: passed in $3 s")
  else
    failed=$((failed + 1)); report+=("stage $1: FAILED after $3 s"); failed_stages+=("$1")
  fi
  echo "${report[-1]}"
}
side_by_side=0
if [ "${FLOWERLAB_TEST_SERIAL:-0}" != 1 ] && [[ " ${stages[*]} " == *" lab-e2e "* ]] \
   && [[ " ${stages[*]} " == *" molecule "* ]]; then
  side_by_side=1
fi
for stage in "${stages[@]}"; do
  fn="stage_${stage//-/_}"
  if ! declare -F "$fn" >/dev/null; then
    echo "tests/run.sh: unknown stage '$stage' (stages: ${all_stages[*]})" >&2; exit 2
  fi
done
for stage in "${stages[@]}"; do
  fn="stage_${stage//-/_}"
  if [ "$side_by_side" = 1 ] && [ "$stage" = molecule ]; then
    continue  # ran beside lab-e2e
  fi
  if [ "$side_by_side" = 1 ] && [ "$stage" = lab-e2e ]; then
    echo "=== stages lab-e2e and molecule, side by side (logs in .cache/test-logs/, printed when both end)"
    t0=$SECONDS
    rm -f "$logs"/*.status
    (
      stage_lab_e2e > "$logs/lab-e2e.log" 2>&1; echo "$? $((SECONDS - t0))" > "$logs/lab-e2e.status"
      stage_molecule "${molecule_after_lab_e2e[@]}" > "$logs/molecule-after.log" 2>&1
      echo $? > "$logs/molecule-after.status"
    ) &
    ( stage_molecule "${molecule_beside[@]}" > "$logs/molecule.log" 2>&1; echo $? > "$logs/molecule-beside.status" ) &
    wait
    cat "$logs/molecule-after.log" >> "$logs/molecule.log"
    read -r rc_after < "$logs/molecule-after.status" || rc_after=1
    read -r rc_beside < "$logs/molecule-beside.status" || rc_beside=1
    echo "$(( rc_after || rc_beside )) $((SECONDS - t0))" > "$logs/molecule.status"
    for s in lab-e2e molecule; do
      echo "=== stage $s (output)"
      cat "$logs/$s.log"
      read -r rc secs < "$logs/$s.status" || { rc=1; secs=$((SECONDS - t0)); }
      record "$s" "$rc" "$secs"
    done
    continue
  fi
  echo "=== stage $stage"
  t0=$SECONDS
  "$fn" 2>&1 | tee "$logs/$stage.log"
  record "$stage" "${PIPESTATUS[0]}" $((SECONDS - t0))
done
for stage in "${failed_stages[@]}"; do
  echo "=== why $stage failed (from .cache/test-logs/$stage.log)"
  failure_lines "$logs/$stage.log"
done
echo "=== timings"
printf '%s\n' "${report[@]}"
[ ! -f "$logs/molecule.log" ] || [[ " ${stages[*]} " != *" molecule "* ]] || grep -h '^molecule: ' "$logs/molecule.log"
for stage in app-e2e lab-e2e; do  # pytest's --durations lines: where the end-to-end time goes
  [[ " ${stages[*]} " != *" $stage "* ]] || [ ! -f "$logs/$stage.log" ] \
    || grep -E '^[0-9.]+s (setup|call|teardown) ' "$logs/$stage.log" | sed "s/^/$stage: /" | head -n 12
done
echo "stages: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
