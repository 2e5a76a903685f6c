"""``certify verify``: decide a VNNLIB property for a network (VNN-COMP style)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import click

from certify.cli.options import device_option, model_input_options, quiet_option, seed_option

DEFAULT_METHODS = ("ibp", "crown", "alpha-crown")


@click.command()
@click.argument("net", required=False, type=click.Path(dir_okay=False))
@click.argument("spec", required=False, type=click.Path(dir_okay=False))
@click.option("--instances", type=click.Path(dir_okay=False),
              help="A VNN-COMP benchmark's instances.csv (rows: onnx, vnnlib, timeout) to run "
              "instead of NET SPEC.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds per property [default: 60; with --instances the csv's].")
@click.option("--results", type=click.Path(dir_okay=False),
              help="NET SPEC: write the VNN-COMP result file. --instances: the results CSV "
              "[default: reports/verify/<benchmark>/results.csv].")
@click.option("--method", "methods", multiple=True,
              help="Bound method to try, cheap to tight; repeat the option [default: ibp, crown, "
              "alpha-crown].")
@click.option("--milp", type=click.Choice(["auto", "always", "never"]), default="auto",
              show_default=True, help="Exact MILP at the end of the cascade (auto: small nets).")
@click.option("--bab/--no-bab", "use_bab", default=True, show_default=True,
              help="Branch and bound (bab) after the bounds, before the MILP.")
@click.option("--no-resume", is_flag=True, help="--instances: run every instance again.")
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
@model_input_options
@device_option
@seed_option
@quiet_option
def verify(net: str | None, spec: str | None, instances: str | None, timeout: float | None,
           results: str | None, methods: tuple[str, ...], milp: str, use_bab: bool,
           no_resume: bool,
           as_json: bool, input_shape: tuple[int, ...] | None, mean: tuple[float, ...] | None,
           std: tuple[float, ...] | None, device: str, seed: int, quiet: bool) -> None:
    """Prove a VNNLIB property (unsat), find a counterexample (sat), or say unknown/timeout.

    The cascade: an attack in the input box, then the bound methods from cheap to tight, then
    an exact MILP for small networks. A sat verdict carries a counterexample checked by a
    forward pass; unsat is only ever reported when proven.

    \b
    Example:
      certify verify net.onnx prop.vnnlib --timeout 60 --results out.txt
      certify verify --instances benchmarks/mnist/instances.csv
    """
    from certify._io import check_output_file
    from certify.errors import SpecError
    from certify.utils import resolve_device
    from certify.verify import InstanceResult, format_result, run_instances, verify_files

    use_milp: bool | Literal["auto"] = "auto" if milp == "auto" else milp == "always"
    methods = methods or DEFAULT_METHODS
    torch_device = resolve_device(device)
    if input_shape is not None and len(input_shape) != 3:
        raise SpecError(f"--input-shape must be C,H,W (three sizes), got {input_shape}.")
    if instances is not None:
        if net is not None or spec is not None:
            raise click.UsageError("give either NET SPEC or --instances, not both.")
        out = Path(results) if results else Path("reports", "verify",
                                                  Path(instances).resolve().parent.name,
                                                  "results.csv")
        check_output_file(out)  # before any work: one line, not a traceback at the end

        def report(item: InstanceResult) -> None:
            if not quiet:
                click.echo(f"{item.result:8s} {item.seconds:8.2f}s  {item.onnx}  {item.vnnlib}"
                           + (f"  ({item.method})" if item.result == "error" else ""), err=True)

        from certify._lock import hold_output

        with hold_output(out, command="verify", folder=False):
            rows = run_instances(instances, out, methods=methods, use_milp=use_milp,
                                 use_bab=use_bab,
                                 timeout=timeout, input_shape=input_shape, mean=mean, std=std,
                                 device=torch_device, seed=seed,
                                 resume=not no_resume, on_result=report)
        counts = {r: sum(1 for x in rows if x.result == r)
                  for r in ("sat", "unsat", "unknown", "timeout", "error")}
        if as_json:
            click.echo(json.dumps({"results": str(out), "counts": counts,
                                   "seconds": sum(x.seconds for x in rows)}))
            return
        click.echo("  ".join(f"{k}={v}" for k, v in counts.items() if v or k != "error")
                   + f"  total={len(rows)}")
        click.echo(f"results: {out}")
        return
    if net is None or spec is None:
        raise click.UsageError("give NET and SPEC (a network and a .vnnlib property), or "
                               "--instances CSV.")
    if results:
        check_output_file(results)
    verdict = verify_files(net, spec, timeout=timeout or 60.0, methods=methods, use_bab=use_bab,
                           use_milp=use_milp, input_shape=input_shape, mean=mean,
                           std=std, device=torch_device, seed=seed)
    if results:
        from certify._io import atomic_write_text

        atomic_write_text(results, format_result(verdict))
    if as_json:
        ce = verdict.counterexample
        click.echo(json.dumps({
            "result": verdict.result, "method": verdict.method, "seconds": verdict.seconds,
            "counterexample": None if ce is None else {"x": ce[0].tolist(), "y": ce[1].tolist()},
        }))
        return
    by = f"  ({verdict.method})" if verdict.method else ""
    click.echo(f"{verdict.result}{by}  {verdict.seconds:.2f}s")
