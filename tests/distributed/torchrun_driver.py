"""Run several ``certify`` commands in one torchrun launch (tests only).

``python -m torch.distributed.run --nproc_per_node=N tests/distributed/torchrun_driver.py PLAN``
reads PLAN (JSON: ``{"out": folder, "steps": [{"name", "args", "env", "fail"}]}``) and runs
each step's ``certify ARGS`` in turn in the same process group, as the command line would (user
errors: one line on stderr and exit code 1), with `env` set for that step only. ``"fail":
[rank, after]`` injects a failure for that step only (monkeypatching
:func:`certify.distributed.sharded`): rank `rank` raises once it has handed on `after`
results. A step ``{"name", "copy": [src, dst]}`` instead has rank 0 copy the folder `src` to
`dst` (e.g. a failed run's shards before ``--resume`` merges them) while the other ranks wait.
Each rank writes ``<out>/rank-<r>.json``: per step its exit code, stdout and stderr. One launch
instead of one per command saves the start-up of torchrun, Python and torch for every command.

Should a rank die by a signal (a crash inside torch's process group, say), the launch's stderr
tells where: each rank names every step on the real stderr as it starts it, and
:mod:`faulthandler` prints every thread's Python stack on a fatal signal.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import json
import os
import shutil
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def failing_rank(fail: list[int] | None) -> Iterator[None]:
    """Meanwhile rank ``fail[0]`` raises in its batch loop after ``fail[1]`` kept results."""
    from certify import distributed

    if not fail:
        yield
        return
    rank, after = fail
    real = distributed.sharded

    def sharded(*args: Any, **kwargs: Any) -> Iterator[Any]:
        results = real(*args, **kwargs)
        handed = 0
        while True:
            if distributed.context().rank == rank and handed >= after:
                raise RuntimeError(f"injected failure (rank {rank}) after {handed} items")
            try:
                result = next(results)
            except StopIteration:
                return
            yield result
            handed += 1

    distributed.sharded = sharded  # type: ignore[assignment]
    try:
        yield
    finally:
        distributed.sharded = real  # type: ignore[assignment]


def run_step(args: list[str], env: dict[str, str],
             fail: list[int] | None = None) -> dict[str, object]:
    """``certify ARGS`` in this process, with `env` added to the environment meanwhile (and
    the failure `fail` injected, see :func:`failing_rank`)."""
    from certify.cli import main

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                failing_rank(fail):
            try:
                main.main(args, prog_name="certify", standalone_mode=True)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except Exception:  # a bug, not a user error: keep the traceback
                traceback.print_exc()
                code = 1
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def copy_step(src: str, dst: str) -> dict[str, object]:
    """Rank 0 copies the folder `src` to `dst`; every rank waits until it is done."""
    from certify import distributed

    if distributed.is_main():
        shutil.copytree(src, dst)
    distributed.barrier()
    return {"code": 0, "stdout": "", "stderr": ""}


def main() -> None:
    # the real stderr: the steps' own output is captured (redirect_stderr), these lines are not
    faulthandler.enable(file=sys.__stderr__, all_threads=True)
    plan = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    record = {}
    for step in plan["steps"]:
        print(f"rank {rank}: step {step['name']}", file=sys.__stderr__, flush=True)
        record[step["name"]] = (copy_step(*step["copy"]) if "copy" in step
                                else run_step(step["args"], step.get("env", {}), step.get("fail")))
    Path(plan["out"], f"rank-{rank}.json").write_text(json.dumps(record, indent=1))
    print(f"rank {rank}: done, exiting", file=sys.__stderr__, flush=True)


if __name__ == "__main__":
    main()
