#!/usr/bin/env bash
# The lab's test command. With no argument it runs every stage; name stages to run only those, e.g.
# `tests/run.sh lint unit`, or one Molecule scenario as `molecule:lab`. Each stage (and each Molecule
# scenario) prints one timing line; the last line counts those that passed and failed. Exit status is
# non-zero when any failed.
# Each stage's output is also kept in .cache/test-logs/<stage>.log; for a failed stage the lines that
# say what failed (pytest's FAILED/E lines, Ansible's fatal lines) are repeated before the timings, so
# the end of the output is enough to know why.
# The stages run in the groups of `plan`, one group after another. The lanes of a group (split by `|`)
# run side by side, each lane's stages one after another: on 2 cores, stages that leave a core idle
# (the image builds, lint, unit) or that together fill both (lab-e2e beside Molecule) share the machine.
# A group's logs are printed when all its lanes have ended. FLOWERLAB_TEST_SERIAL=1 runs every stage
# one after another.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD

# Every role's scenario (the Flower roles' is the multi-host lab). The lanes of a group take about equal
# time on 2 cores, as measured (each group's line says how busy the cores were: a group far from 100%
# has room for more beside it). Beside unit and app-e2e, images and lint left a core idle for about
# 270 s (442 s at 63 %): three small scenarios take it. In the last group, at the last five full
# measures: lab-e2e 1418 to 1628 s, the lab scenario 766 to 1016 s; the other scenarios (70 to 200 s
# each) are shared out so that the lanes come out about equal (1418 | 1394 s, 1569 | 1583 s,
# 1628 | 1716 s and 1467 | 1571 s with node_exporter in the lab scenario's lane; 1564 | 1442 s with it
# in lab-e2e's).
plan=(
  "setup"
  "images lint molecule:cadvisor molecule:lab_preflight molecule:docker | unit app-e2e"
  "lab-up"
  "lab-e2e | molecule:lab molecule:lab_common molecule:node_exporter molecule:prometheus molecule:grafana molecule:lab_images"
)
all_stages=(setup lint unit app-e2e images lab-up lab-e2e molecule)

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
# lab-up brings the lab up with nothing else running and runs the tests that need the machine to
# themselves (marked lab_up: the first run's tiers, a second site.yml, a run under a known load); lab-e2e
# then runs the other end-to-end tests on that lab, or all of them on a lab of its own when lab-up was not
# run (or failed) in this call.
stage_lab_up() { pytest -q --durations=30 -m lab_up tests/e2e; }
stage_lab_e2e() {
  if wanted lab-up && [ "$(cut -d' ' -f1 "$logs/lab-up.status" 2>/dev/null)" = 0 ]; then
    FLOWERLAB_E2E_LAB_UP=1 pytest -q --durations=30 -m "not lab_up" tests/e2e
  else
    pytest -q --durations=30 tests/e2e
  fi
}
stage_molecule() { molecule test -s "$1"; }  # scenario

# The stage names asked for (default: all), checked; `molecule` stands for every scenario of the plan.
asked=("$@")
[ ${#asked[@]} -gt 0 ] || asked=("${all_stages[@]}")
planned=" $(printf '%s ' "${plan[@]}" | tr -d '|') "
for stage in "${asked[@]}"; do
  if [ "$stage" != molecule ] && [[ "$planned" != *" $stage "* ]]; then
    echo "tests/run.sh: unknown stage '$stage' (stages: ${all_stages[*]}, or molecule:SCENARIO)" >&2; exit 2
  fi
done
wanted() {  # stage
  local s
  for s in "${asked[@]}"; do
    [ "$s" = "$1" ] || { [ "$s" = molecule ] && [[ "$1" == molecule:* ]]; } && return 0
  done
  return 1
}

run_stage() {  # stage [tee]: its output to its log (and to stdout with tee), "rc seconds" to its status
  local t0=$SECONDS fn="stage_${1//-/_}" args=()
  if [[ "$1" == molecule:* ]]; then fn=stage_molecule; args=("${1#molecule:}"); fi
  if [ "${2:-}" = tee ]; then
    "$fn" "${args[@]}" 2>&1 | tee "$logs/$1.log"
  else
    "$fn" "${args[@]}" > "$logs/$1.log" 2>&1
  fi
  echo "${PIPESTATUS[0]} $((SECONDS - t0))" > "$logs/$1.status"
}
record_stage() {  # stage: from its status (a lane that died before writing it: failed)
  local rc secs
  read -r rc secs < "$logs/$1.status" 2>/dev/null || { rc=1; secs=?; }
  record "$1" "$rc" "$secs"
}

# What a failed stage's log says about the failure: at most 30 lines, the last ones.
failure_lines() {
  grep -E '^(FAILED|ERROR) |^E  |^fatal: |^failed: |Error: |error: ' "$1" | cut -c1-300 | tail -n 30
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

# The groups to run: each a list of lanes (stage lists) with only the stages asked for.
groups=()
for group in "${plan[@]}"; do
  lanes=()
  IFS='|' read -r -a parts <<< "$group"
  for part in "${parts[@]}"; do
    lane=()
    for stage in $part; do wanted "$stage" && lane+=("$stage"); done
    [ ${#lane[@]} -eq 0 ] || lanes+=("${lane[*]}")
  done
  [ ${#lanes[@]} -eq 0 ] && continue
  if [ "${FLOWERLAB_TEST_SERIAL:-0}" = 1 ]; then
    for lane in "${lanes[@]}"; do for stage in $lane; do groups+=("$stage"); done; done
  else
    groups+=("$(IFS='|'; echo "${lanes[*]}")")
  fi
done

cpu_ticks() {  # busy and total jiffies of all cores since boot
  awk '/^cpu /{t=0; for (i=2; i<=NF; i++) t+=$i; print t-$5-$6, t}' /proc/stat
}
group_line() {  # group, seconds, busy and total jiffies at its start
  local busy total
  read -r busy total < <(cpu_ticks)
  report+=("group [$1]: $2 s, cores busy $(( (busy - $3) * 100 / (total - $4 > 0 ? total - $4 : 1) ))%")
}

for group in "${groups[@]}"; do
  IFS='|' read -r -a lanes <<< "$group"
  group_t0=$SECONDS
  read -r busy0 total0 < <(cpu_ticks)
  for stage in ${lanes[*]}; do rm -f "$logs/$stage.status"; done
  if [ ${#lanes[@]} -eq 1 ]; then
    for stage in ${lanes[0]}; do  # one lane: each stage's output as it comes
      echo "=== stage $stage"
      run_stage "$stage" tee
      record_stage "$stage"
    done
    group_line "$group" $((SECONDS - group_t0)) "$busy0" "$total0"
    continue
  fi
  echo "=== side by side: $(printf '[%s] ' "${lanes[@]}")(logs in .cache/test-logs/, printed when all end)"
  for lane in "${lanes[@]}"; do
    ( for stage in $lane; do run_stage "$stage"; done ) &
  done
  wait
  for stage in ${lanes[*]}; do
    echo "=== stage $stage (output)"
    cat "$logs/$stage.log"
    record_stage "$stage"
  done
  group_line "$group" $((SECONDS - group_t0)) "$busy0" "$total0"
done
for stage in "${failed_stages[@]}"; do
  echo "=== why $stage failed (from .cache/test-logs/$stage.log)"
  failure_lines "$logs/$stage.log"
done
echo "=== timings"
printf '%s\n' "${report[@]}"
for stage in app-e2e lab-up lab-e2e; do  # pytest's --durations lines: where the end-to-end time goes
  ! wanted "$stage" || [ ! -f "$logs/$stage.log" ] \
    || grep -E '^[0-9.]+s (setup|call|teardown) ' "$logs/$stage.log" | sed "s/^/$stage: /" | head -n 12
done
echo "stages: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
