"""``certify area``: per-sample maximal certified eps, attack eps and the certification area."""

from __future__ import annotations

import json

import click

from certify.cli.helpers import MethodName, indices_callback
from certify.cli.options import (
    data_dir_option,
    dataset_option,
    device_option,
    dtype_option,
    num_samples_option,
    quiet_option,
    seed_option,
)


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@dataset_option(required=False, help="Dataset name [default: the one the checkpoint records; "
                "an ONNX network needs it].")
@click.option("--split", default="test", show_default=True, help="Dataset split.")
@num_samples_option(default=None, what="Certify")
@click.option("--indices", callback=indices_callback, default=None,
              help="Certify these sample positions instead: 0,5,10 or ranges 0:100.")
@click.option("--method", "methods", type=MethodName(), multiple=True,
              help="Bound method; repeat for several [default: crown]. lirpa-* are "
                   "auto_LiRPA's (optional; install it from its repository).")
@click.option("--attack", type=click.Choice(["pgd", "none"]), default="pgd", show_default=True,
              help="Per-sample minimal adversarial eps by PGD (an upper bound), or none.")
@click.option("--eps-max", type=float, default=0.5, show_default=True,
              help="Largest eps searched (pixel units, > 0).")
@click.option("--tol", type=float, default=1e-4, show_default=True,
              help="Precision of each certified eps (> 0).")
@click.option("--search", type=click.Choice(["fast", "bisection"]), default="fast",
              show_default=True, help="Radius search: margin-interpolating, or plain bisection.")
@click.option("--exact", is_flag=True,
              help="Also the exact minimal adversarial eps of every sample, by MILP (small "
                   "networks): an exact_eps column, the exact curve, certified/exact ratios.")
@click.option("--exact-time-limit", type=float, default=60.0, show_default=True,
              help="Seconds per MILP of --exact; a sample that hits it is 'unknown'.")
@click.option("--bab-time-limit", type=click.FloatRange(min=0, min_open=True), default=None,
              help="--method bab: seconds per branch and bound (one per sample and search "
                   "step; one that spends them is 'not proven') [default: the method's, 60].")
@click.option("--bab-max-domains", type=click.IntRange(min=1), default=None,
              help="--method bab: most domains per branch and bound [default: 200000].")
@click.option("--bab-budget-reach", type=click.FloatRange(min=0, min_open=True), default=None,
              help="--method bab: skip a search step between a proof that took this share of "
                   "the time limit and a larger eps that ran out of it (0.75: about 2/3 of the "
                   "time for a radius under 1%% smaller on a digits MLP) [default: off].")
@click.option("--batch-size", type=int, default=100, show_default=True,
              help="Samples per batch (partial results are saved after each).")
@device_option
@dtype_option
@seed_option
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Run folder [default: reports/area/<YYYYmmdd-HHMMSS>-<model>].")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run (in -o DIR, or the newest matching one).")
@data_dir_option
@quiet_option
@click.option("--json", "as_json", is_flag=True, help="Print results.json to stdout.")
def area(model: str, dataset: str | None, split: str, n: int | None,
         indices: tuple[int, ...] | None, methods: tuple[str, ...], attack: str,
         eps_max: float, tol: float,
         search: str, exact: bool, exact_time_limit: float, bab_time_limit: float | None,
         bab_max_domains: int | None, bab_budget_reach: float | None, batch_size: int,
         device: str,
         dtype: str, seed: int, out_dir: str | None, resume: bool, data_dir: str | None,
         quiet: bool, as_json: bool) -> None:
    """Largest certified eps of every test point, next to the smallest attack eps.

    For each sample and bound method: the largest L-inf eps (pixel units) at which the method
    proves the prediction robust, and the smallest eps at which PGD finds an adversarial
    example. Writes per_sample.csv, results.json, sorted_eps.png, certified_accuracy.png and
    summary.md into the run folder; prints a summary. With --exact, also the exact distance to
    the decision boundary from a MILP (certified <= exact <= attack is checked per sample).

    \b
    Example:
      certify area models/teacher.pt --num-samples 500   # the dataset the checkpoint records
      certify area models/m.pt --dataset digits --method ibp --method crown -o reports/m
      certify area models/m.pt --dataset digits -o reports/m --resume
      certify area models/m.pt --dataset digits --method lirpa-alpha-crown
      certify area models/m.pt --dataset digits --method bab --bab-time-limit 5
      certify area models/mlp.pt --dataset digits --num-samples 20 --method crown \\
          --method milp --exact
      torchrun --nproc_per_node=4 -m certify area models/m.pt --dataset svhn -o reports/m

    Under torchrun the samples' batches are sharded over the processes and rank 0 writes the
    same report a single process would.
    """
    from certify.distributed import is_main
    from certify.records import RESULTS_FILE, read_json
    from certify.report.summary import summary_table
    from certify.run.area import AreaConfig, run_area

    budgets = {k: v for k, v in (("time_limit", bab_time_limit),
                                 ("max_domains", bab_max_domains),
                                 ("budget_reach", bab_budget_reach)) if v is not None}
    if budgets and "bab" not in methods:
        raise click.UsageError("--bab-time-limit, --bab-max-domains and --bab-budget-reach apply "
                               "to --method bab; add it or drop them.")
    config = AreaConfig(model=model, dataset=dataset, split=split, n=n, indices=indices,
                        methods=methods or ("crown",), attack=attack, eps_max=eps_max, tol=tol,
                        batch_size=batch_size, device=device, dtype=dtype, seed=seed,
                        search=search, data_dir=data_dir, exact=exact,
                        exact_time_limit=exact_time_limit,
                        method_options={"bab": budgets} if budgets else {})
    result = run_area(config, out_dir=out_dir, resume=resume, quiet=quiet)
    if not is_main():  # under torchrun, rank 0 prints the gathered result
        return
    if as_json:
        click.echo(json.dumps(read_json(result.run_dir / RESULTS_FILE), indent=2))
        return
    click.echo(summary_table(result.summaries))
    click.echo(f"results in {result.run_dir}")
