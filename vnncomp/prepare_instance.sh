#!/bin/bash
# VNN-COMP: get ready for one instance.
#   prepare_instance.sh v1 CATEGORY ONNX VNNLIB
# Stops what a previous instance left running, checks that the interpreter imports certify and
# that both files exist. Exit 0 when ready; writes no result file. See common.sh for the
# environment variables (CERTIFY_PYTHON chooses the interpreter).

set -u
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

check_arguments 4 "prepare_instance.sh v1 CATEGORY ONNX VNNLIB" "$@"

stop_previous

for file in "$ONNX" "$VNNLIB"; do
    if [ ! -f "$file" ] && [ ! -f "$file.gz" ]; then
        echo "file not found: $file" >&2
        exit 1
    fi
done

find_python
if ! "$PYTHON" -c "import certify.verify" 2>/dev/null; then
    echo "the interpreter '$PYTHON' cannot import certify; install it there or point" \
         "CERTIFY_PYTHON at an interpreter that can" >&2
    exit 1
fi
echo "certify ready for category '$CATEGORY' ($ONNX, $VNNLIB) with $PYTHON"
exit 0
