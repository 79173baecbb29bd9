#!/usr/bin/env bash
# The lab's test command. With no argument it runs every stage in order; name stages to run
# only those, e.g. `tests/run.sh lint unit`. Each stage prints one timing line; the last line
# counts the stages that passed and failed. Exit status is non-zero when any stage failed.
# Each stage's output is also kept in .cache/test-logs/<stage>.log; for a failed stage the lines
# that say what failed (pytest's FAILED/E lines, Ansible's fatal lines) are repeated before the
# timings, so the end of the output is enough to know why.
# Every stage asked for: after setup, two lanes share the machine (see "Lanes" below) and their logs
# are printed when both have ended. FLOWERLAB_TEST_SERIAL=1 runs the stages one after the other.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD

all_stages=(setup lint unit app-e2e images lab-e2e molecule)
# Every role's scenario (the three Flower roles share flower_supernodes) and the multi-host lab, the
# longest first (as measured), so that the lanes, which take them in this order, end close together.
molecule_scenarios=(lab flower_supernodes lab_images prometheus grafana lab_common node_exporter cadvisor docker
                    lab_preflight)
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
# Lanes (every stage asked for and FLOWERLAB_TEST_SERIAL unset): after setup, one lane runs images then
# lab-e2e, the other lint, unit and app-e2e (which need no image); then each lane takes the next Molecule
# scenario from a shared queue until none is left (the second lane waits for images first).
lanes=0
if [ "${FLOWERLAB_TEST_SERIAL:-0}" != 1 ]; then
  lanes=1
  for stage in lint unit app-e2e images lab-e2e molecule; do
    [[ " ${stages[*]} " == *" $stage "* ]] || lanes=0
  done
fi
for stage in "${stages[@]}"; do
  fn="stage_${stage//-/_}"
  if ! declare -F "$fn" >/dev/null; then
    echo "tests/run.sh: unknown stage '$stage' (stages: ${all_stages[*]})" >&2; exit 2
  fi
done
logged() {  # log name, command...: runs it into .cache/test-logs/<name>.log, its "status seconds" in <name>.status
  local name=$1 t0=$SECONDS; shift
  "$@" > "$logs/$name.log" 2>&1
  echo "$? $((SECONDS - t0))" > "$logs/$name.status"
}
queue="$logs/molecule.queue"
next_scenario() {  # prints the next scenario of the queue and removes it (nothing when the queue is empty)
  (
    flock 9
    head -n 1 "$queue"
    sed -i 1d "$queue"
  ) 9> "$queue.lock"
}
take_scenarios() {  # runs scenarios from the queue until it is empty; fails if one failed
  local rc=0 s
  while s=$(next_scenario) && [ -n "$s" ]; do
    stage_molecule "$s" || rc=1
  done
  return $rc
}
lane_images_first() {
  logged images stage_images
  logged lab-e2e stage_lab_e2e
  logged molecule-lane1 take_scenarios
}
lane_checks_first() {
  local stage
  for stage in lint unit app-e2e; do logged "$stage" "stage_${stage//-/_}"; done
  while [ ! -f "$logs/images.status" ]; do sleep 5; done
  logged molecule-lane2 take_scenarios
}
for stage in "${stages[@]}"; do
  fn="stage_${stage//-/_}"
  if [ "$lanes" = 1 ] && [ "$stage" != setup ]; then
    [ "$stage" = lint ] || continue  # the lanes run every stage after setup
    echo "=== stages in two lanes: images, lab-e2e, then Molecule scenarios | lint, unit, app-e2e, then Molecule"
    echo "    scenarios (logs in .cache/test-logs/, printed when both lanes have ended)"
    t0=$SECONDS
    rm -f "$logs"/*.status "$logs"/molecule-lane*
    printf '%s\n' "${molecule_scenarios[@]}" > "$queue"
    lane_images_first & lane_checks_first & wait
    cat "$logs/molecule-lane1.log" "$logs/molecule-lane2.log" > "$logs/molecule.log"
    read -r rc1 _ < "$logs/molecule-lane1.status" || rc1=1
    read -r rc2 _ < "$logs/molecule-lane2.status" || rc2=1
    [ ! -s "$queue" ] || { echo "molecule: scenarios never taken: $(xargs < "$queue")" >> "$logs/molecule.log"; rc1=1; }
    echo "$(( rc1 || rc2 )) $((SECONDS - t0))" > "$logs/molecule.status"
    for s in lint unit app-e2e images lab-e2e molecule; do
      echo "=== stage $s (output)"
      cat "$logs/$s.log"
      read -r rc secs < "$logs/$s.status" || { rc=1; secs=$((SECONDS - t0)); }
      record "$s" "$rc" "$secs"
    done
    echo "stages in two lanes: $((SECONDS - t0)) s in all"
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
