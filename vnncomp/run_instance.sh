#!/bin/bash
# VNN-COMP: decide one instance.
#   run_instance.sh v1 CATEGORY ONNX VNNLIB RESULTS_FILE TIMEOUT_SECONDS
# Writes RESULTS_FILE (atomically): sat (with the counterexample), unsat, unknown, timeout or
# error. The timeout counts from this script's start. See common.sh for the environment
# variables (CERTIFY_PYTHON chooses the interpreter, CERTIFY_VNNCOMP_ARGS adds options).

set -u
STARTED="$(date +%s.%N)"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

check_arguments 6 "run_instance.sh v1 CATEGORY ONNX VNNLIB RESULTS_FILE TIMEOUT" "$@"
RESULTS="$5"
TIMEOUT="$6"

# A stale verdict must never be read as this run's.
rm -f "$RESULTS"
find_python
mkdir -p "$STATE_DIR"

echo "certify on category '$CATEGORY': $ONNX $VNNLIB (timeout $TIMEOUT s)"
# Stopped from outside (the harness's timeout): stop the verifier's whole process group too.
CHILD=""
trap '[ -n "$CHILD" ] && kill -TERM -- "-$CHILD" 2>/dev/null; rm -f "$PID_FILE"; exit 143' \
    TERM INT HUP
# Its own process group (job control), so that it can be stopped as a whole.
set -m
# shellcheck disable=SC2086  # CERTIFY_VNNCOMP_ARGS is a list of options
"$PYTHON" "$ENTRY" "$ONNX" "$VNNLIB" "$RESULTS" "$TIMEOUT" --started "$STARTED" \
    ${CERTIFY_VNNCOMP_ARGS:-} &
CHILD=$!
set +m
echo "$CHILD" > "$PID_FILE"
wait "$CHILD"
STATUS=$?
rm -f "$PID_FILE"

if [ ! -f "$RESULTS" ]; then
    echo "run_instance.py ended with status $STATUS and no result; writing 'error'" >&2
    write_result "$RESULTS" "error"
fi
exit "$STATUS"
