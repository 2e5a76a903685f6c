"""VNN-COMP: decide one instance with certify and write the competition's result file.

Called by ``run_instance.sh``::

    python run_instance.py ONNX VNNLIB RESULTS TIMEOUT [--started EPOCH] [options]

The result file is written atomically (a temporary file renamed over it): its first line is
``sat``, ``unsat``, ``unknown``, ``timeout`` or ``error``; after ``sat`` comes the counterexample
``((X_0 v) ... (Y_0 v) ...)``, the input in the order of the ONNX input flattened and the
network's outputs there (:func:`certify.verify.format_result`).

``TIMEOUT`` counts from ``--started`` (the shell script's start, in seconds since the epoch),
so the interpreter's start and the imports are paid from it; a margin of
:data:`MARGIN_FRACTION` of the timeout (at most :data:`MARGIN_MAX` seconds) is kept for
writing the result and exiting. A network or property certify cannot take (an unsupported
operator, a malformed file) gives ``error`` and a one-line message on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time

#: The part of the timeout kept back for writing the result and exiting ...
MARGIN_FRACTION = 0.1
#: ... at most this many seconds.
MARGIN_MAX = 2.0


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx")
    parser.add_argument("vnnlib")
    parser.add_argument("results")
    parser.add_argument("timeout", type=float)
    parser.add_argument("--started", default=None,
                        help="when the timeout started, in seconds since the epoch [now]")
    parser.add_argument("--method", action="append", dest="methods",
                        help="bound method, cheap to tight; repeat [ibp, crown, alpha-crown]")
    parser.add_argument("--milp", choices=["auto", "always", "never"], default="auto")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto [cpu]")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _started(value: str | None) -> float:
    try:
        return float(value) if value is not None else time.time()
    except ValueError:  # a `date` without %N
        return time.time()


def main(argv: list[str] | None = None) -> int:
    """Decide the instance and write its result file; 0 unless an unexpected error occurred."""
    args = _arguments(argv)
    started = _started(args.started)

    from certify._io import atomic_write_text
    from certify.errors import CertifyError

    def write(text: str) -> None:
        atomic_write_text(args.results, text)

    if not args.timeout > 0:
        print(f"error: the timeout must be a positive number of seconds, got {args.timeout}",
              file=sys.stderr)
        write("error\n")
        return 0
    margin = min(MARGIN_MAX, MARGIN_FRACTION * args.timeout)
    try:
        from certify.utils import resolve_device
        from certify.verify import format_result, verify_files

        budget = args.timeout - margin - (time.time() - started)
        if budget <= 0:
            print("timeout: the budget was spent before verification started", file=sys.stderr)
            write("timeout\n")
            return 0
        verdict = verify_files(
            args.onnx, args.vnnlib, timeout=budget,
            methods=tuple(args.methods or ("ibp", "crown", "alpha-crown")),
            use_milp="auto" if args.milp == "auto" else args.milp == "always",
            device=resolve_device(args.device), seed=args.seed)
    except CertifyError as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        write("error\n")
        return 0
    write(format_result(verdict))
    by = f" by {verdict.method}" if verdict.method else ""
    print(f"{verdict.result}{by} in {verdict.seconds:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
