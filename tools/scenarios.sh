#!/usr/bin/env bash
# Replay the supersede incident's five scenarios against a live trio-stream
# server with curl, and print PASS or FAIL for each.
#
#   tools/scenarios.sh [URL] [LOGFILE]
#
# URL      the server (default http://127.0.0.1:8000)
# LOGFILE  optional: the server's stderr, in the default text log format; the
#          script then also checks the lifecycle lines of each scenario, in
#          order.  Without it, only what curl received is checked, and the
#          log lines to look for are printed for the operator.
#
# Environment: TRIO_STREAM_API_KEY (sent as a Bearer key if set),
# SUPERSEDE_TIMEOUT (the server's --supersede-timeout, default 2.0).
#
# The story uses real time: scenario 2 kills its client after 2 s, scenario 3
# sends B 100 ms after A, scenario 4 sends five requests 50 ms apart.  To hit
# scenario 3 exactly as in the incident (B before A's first token), run the
# server with a mock delay above 100 ms, for example:
#
#   trio-stream serve --db :memory: --mock-delay-ms 150 2> server.log &
#   tools/scenarios.sh http://127.0.0.1:8000 server.log
set -euo pipefail

URL=${1:-http://127.0.0.1:8000}
LOG=${2:-}
API_KEY=${TRIO_STREAM_API_KEY:-}
SUPERSEDE_TIMEOUT=${SUPERSEDE_TIMEOUT:-2.0}
RUN=scn-$(date +%s)-$$ # makes this run's session ids unique
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
failures=0

# -- output -------------------------------------------------------------------
pass() { printf 'PASS  %s\n' "$1"; }
fail() {
  printf 'FAIL  %s: %s\n' "$1" "$2"
  failures=$((failures + 1))
}
note() { printf '      %s\n' "$1"; }

# -- one client -----------------------------------------------------------------
# chat NAME SESSION PROMPT MAX_TOKENS [MAX_TIME]
# Streams one completion; leaves NAME.body, NAME.headers, NAME.time, NAME.rc.
chat() {
  local name=$1 session=$2 prompt=$3 max_tokens=$4 max_time=${5:-60} rc=0
  local body
  body=$(printf '{"model":"m","stream":true,"max_tokens":%d,"messages":[{"role":"user","content":"%s"}]}' \
    "$max_tokens" "$prompt")
  local args=(-sS -N --max-time "$max_time" -X POST "$URL/v1/chat/completions"
    -H 'content-type: application/json' -D "$WORK/$name.headers" -o "$WORK/$name.body"
    -w '%{time_starttransfer} %{time_total}\n' --data "$body")
  if [[ -n $session ]]; then args+=(-H "x-session-id: $session"); fi
  if [[ -n $API_KEY ]]; then args+=(-H "authorization: Bearer $API_KEY"); fi
  curl "${args[@]}" >"$WORK/$name.time" 2>"$WORK/$name.err" || rc=$?
  echo "$rc" >"$WORK/$name.rc"
}

done_ok() { grep -q '^data: \[DONE\]' "$WORK/$1.body"; }
error_code() { grep -o '"code":"[a-z_]*"' "$WORK/$1.body" | tail -n 1 | cut -d'"' -f4 || true; }
content_events() { grep -c '"content"' "$WORK/$1.body" || true; }
ttft() { cut -d' ' -f1 "$WORK/$1.time"; }
run_id() { grep -i '^x-run-id:' "$WORK/$1.headers" | head -n 1 | cut -d' ' -f2 | tr -d '\r' || true; }
less_than() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a < b) }'; }

# -- the server's log -----------------------------------------------------------
# in_order PATTERN...: each pattern (a fixed string) on a later line than the last.
in_order() {
  local after=0 pattern line
  for pattern in "$@"; do
    line=$(awk -v after="$after" -v pat="$pattern" \
      'NR > after && index($0, pat) { print NR; exit }' "$LOG")
    if [[ -z $line ]]; then
      note "log: no '$pattern' after line $after"
      return 1
    fi
    after=$line
  done
}

# each_before LAST PATTERN...: every PATTERN on an earlier line than LAST, the
# PATTERNs in any order among themselves.
each_before() {
  local last=$1 pattern
  shift
  for pattern in "$@"; do
    in_order "$pattern" "$last" || return 1
  done
}

# check_log SCENARIO PATTERN...: wait up to 3 s for the lines, in order (or as
# $ORDER, another checker such as each_before, wants them).
check_log() {
  local scenario=$1 tries=30
  shift
  if [[ -z $LOG ]]; then
    note "log lines to look for, in order:"
    local pattern
    for pattern in "$@"; do note "  $pattern"; done
    return 0
  fi
  local order=${ORDER:-in_order}
  until "$order" "$@" >/dev/null; do
    tries=$((tries - 1))
    if ((tries == 0)); then
      "$order" "$@" || true
      fail "$scenario (log)" "lifecycle lines missing or out of order"
      return 0
    fi
    sleep 0.1
  done
  pass "$scenario (log)"
}

# absent SCENARIO PATTERN: the log has no such line.
absent() {
  if [[ -n $LOG ]] && grep -qF "$2" "$LOG"; then
    fail "$1 (log)" "unexpected: $2"
  fi
}

# -- the scenarios ----------------------------------------------------------------
scenario_1() {
  local name="1 normal stream"
  chat s1 "$RUN-1" "scenario one" 8
  if done_ok s1 && [[ -z $(error_code s1) ]]; then
    pass "$name"
  else
    fail "$name" "no [DONE] (error: $(error_code s1))"
  fi
  local a
  a=$(run_id s1)
  check_log "$name" "stream_start trace=$a" "stream_end trace=$a status=completed"
  absent "$name" "stream_cancelled trace=$a"
}

scenario_2() {
  local name="2 user stops the stream after 2 s"
  chat s2 "$RUN-2" "scenario two" 1000 2
  if [[ $(cat "$WORK/s2.rc") == 28 ]] && ! done_ok s2 && (($(content_events s2) > 0)); then
    pass "$name"
  else
    fail "$name" "expected tokens, then the client killed at 2 s (curl rc $(cat "$WORK/s2.rc"))"
  fi
  local a
  a=$(run_id s2)
  check_log "$name" "stream_start trace=$a" "stream_cancelled trace=$a reason=client_disconnect" \
    "stream_end trace=$a status=cancelled"
}

scenario_3() {
  local name="3 a new prompt supersedes the running one" session="$RUN-3"
  chat s3a "$session" "prompt A" 10 &
  sleep 0.1
  chat s3b "$session" "prompt B" 10
  wait
  local code
  code=$(error_code s3a)
  if [[ $code == superseded ]] && ! done_ok s3a && done_ok s3b &&
    less_than "$(ttft s3b)" "$SUPERSEDE_TIMEOUT"; then
    pass "$name"
    note "B's time to first byte: $(ttft s3b) s"
  else
    fail "$name" "A: code=${code:-none}; B: [DONE]=$(done_ok s3b && echo yes || echo no), ttfb $(ttft s3b) s"
  fi
  if (($(content_events s3a) > 0)); then
    note "A had tokens before B arrived: use a server --mock-delay-ms above 100 to replay exactly"
  fi
  local a b
  a=$(run_id s3a)
  b=$(run_id s3b)
  check_log "$name" "stream_start trace=$a" "stream_start trace=$b" \
    "stream_cancelled trace=$a reason=superseded" \
    "prev_stream_finished_cleanly session=$session trace=$a" \
    "stream_end trace=$a" "stream_end trace=$b status=completed"
  absent "$name" "prev_stream_timeout_on_cancel session=$session"
}

scenario_4() {
  local name="4 five requests 50 ms apart, no session" i ok=1
  for i in 1 2 3 4 5; do
    chat "s4-$i" "" "scenario four $i" 10 &
    sleep 0.05
  done
  wait
  for i in 1 2 3 4 5; do
    if ! done_ok "s4-$i"; then
      ok=0
      note "request $i: no [DONE] (error: $(error_code "s4-$i"))"
    fi
  done
  if ((ok)); then pass "$name"; else fail "$name" "not all five completed"; fi
  for i in 1 2 3 4 5; do
    local a
    a=$(run_id "s4-$i")
    check_log "$name, request $i" "stream_start trace=$a" "stream_end trace=$a status=completed"
  done
}

scenario_5() {
  local name="5 two sessions with rapid requests" x="$RUN-5x" y="$RUN-5y"
  local order=(x1 y1 x2 y2 x3 y3) n
  for n in "${order[@]}"; do
    local session=$x
    if [[ $n == y* ]]; then session=$y; fi
    chat "s5-$n" "$session" "scenario five $n" 10 &
    sleep 0.05
  done
  wait
  local ok=1
  for n in x1 y1 x2 y2; do
    if [[ $(error_code "s5-$n") != superseded ]]; then
      ok=0
      note "$n: expected superseded, got '$(error_code "s5-$n")'"
    fi
  done
  for n in x3 y3; do
    if ! done_ok "s5-$n"; then
      ok=0
      note "$n: no [DONE] (error: $(error_code "s5-$n"))"
    fi
  done
  if ((ok)); then pass "$name"; else fail "$name" "the runs did not end as expected"; fi
  # The third run starts only when both runs it superseded have ended; those
  # two may end in either order (the second can be superseded while it still
  # waits for the first), so only "both before the third's end" is checked.
  ORDER=each_before check_log "$name, session X" \
    "stream_end trace=$(run_id s5-x3) status=completed" \
    "prev_stream_finished_cleanly session=$x trace=$(run_id s5-x1)" \
    "prev_stream_finished_cleanly session=$x trace=$(run_id s5-x2)"
  ORDER=each_before check_log "$name, session Y" \
    "stream_end trace=$(run_id s5-y3) status=completed" \
    "prev_stream_finished_cleanly session=$y trace=$(run_id s5-y1)" \
    "prev_stream_finished_cleanly session=$y trace=$(run_id s5-y2)"
  absent "$name" "stream_cancelled trace=$(run_id s5-x3)"
  absent "$name" "stream_cancelled trace=$(run_id s5-y3)"
}

main() {
  local auth=()
  if [[ -n $API_KEY ]]; then auth=(-H "authorization: Bearer $API_KEY"); fi
  if ! curl -fsS --max-time 5 "${auth[@]}" "$URL/healthz" >/dev/null; then
    echo "no trio-stream server answers at $URL" >&2
    exit 2
  fi
  if [[ -n $LOG && ! -r $LOG ]]; then
    echo "cannot read the log file $LOG" >&2
    exit 2
  fi
  scenario_1
  scenario_2
  scenario_3
  scenario_4
  scenario_5
  if ((failures)); then
    echo "$failures check(s) failed"
    exit 1
  fi
  echo "all scenarios passed"
}

main
