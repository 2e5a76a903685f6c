# Shared by prepare_instance.sh and run_instance.sh (sourced, not run).
#
# Environment:
#   CERTIFY_PYTHON        the Python interpreter that has certify's dependencies installed
#                         (default: the interpreter of the `certify` command on PATH, else python3)
#   CERTIFY_VNNCOMP_ARGS  extra options for run_instance.py, e.g. "--device cuda --milp never"
#   CERTIFY_VNNCOMP_STATE folder for the record of the running instance (default: $TMPDIR or /tmp)

VERSION_STRING=v1
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$SCRIPT_DIR")"
ENTRY="$SCRIPT_DIR/run_instance.py"
STATE_DIR="${CERTIFY_VNNCOMP_STATE:-${TMPDIR:-/tmp}}"
PID_FILE="$STATE_DIR/certify-vnncomp-$(id -u).pid"

# The certify next to these scripts is the one that runs (ahead of an installed copy).
if [ -f "$REPO_DIR/certify/__init__.py" ]; then
    export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
fi

check_version() {
    if [ "$1" != "$VERSION_STRING" ]; then
        echo "expected the version string '$VERSION_STRING' as the first argument, got '$1'" >&2
        exit 1
    fi
}

# check_arguments COUNT USAGE "$@": the version string first, then exactly COUNT arguments
# (else USAGE and exit 1); sets CATEGORY, ONNX and VNNLIB from arguments 2 to 4.
check_arguments() {
    local count="$1" usage="$2"
    shift 2
    check_version "${1:-}"
    if [ $# -ne "$count" ]; then
        echo "usage: $usage (got $# arguments)" >&2
        exit 1
    fi
    CATEGORY="$2"
    ONNX="$3"
    VNNLIB="$4"
}

# The interpreter: $CERTIFY_PYTHON, else the one in the shebang of `certify` on PATH, else python3.
find_python() {
    if [ -n "${CERTIFY_PYTHON:-}" ]; then
        PYTHON="$CERTIFY_PYTHON"
        return
    fi
    PYTHON=python3
    local entry first
    entry="$(command -v certify 2>/dev/null || true)"
    if [ -n "$entry" ] && [ -f "$entry" ]; then
        IFS= read -r first < "$entry" || true
        first="${first#\#!}"
        first="${first%% *}"
        if [ -x "$first" ] && [[ "$(basename "$first")" == python* ]]; then
            PYTHON="$first"
        fi
    fi
}

# End the instance a previous run_instance.sh left running (its process group, by the id
# recorded in $PID_FILE, and only when that process is still our run_instance.py).
stop_previous() {
    [ -f "$PID_FILE" ] || return 0
    local pid
    pid="$(head -n 1 "$PID_FILE" 2>/dev/null || true)"
    rm -f "$PID_FILE"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 0
    if ! ps -o args= -p "$pid" 2>/dev/null | grep -qF "$ENTRY"; then
        return 0
    fi
    echo "stopping a previous instance (process group $pid)" >&2
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 -- "-$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
}

# Write $2 to the file $1 atomically (a temporary file beside it, renamed over it).
write_result() {
    local tmp
    tmp="$(mktemp "$(dirname "$1")/.$(basename "$1").XXXXXXXX.tmp")" || return 1
    chmod "$(printf '%03o' $((0666 & ~0$(umask))))" "$tmp"  # mktemp makes it 0600
    printf '%s\n' "$2" > "$tmp" && mv -f "$tmp" "$1" || { rm -f "$tmp"; return 1; }
}
