"""``certify attack``: accuracy under attack over an eps grid, one curve per model."""

from __future__ import annotations

import click

from certify.cli.options import (
    RegistryChoice,
    RegistryNames,
    data_dir_option,
    dataset_option,
    device_option,
    num_samples_option,
    quiet_option,
    seed_option,
)


def _attacks() -> tuple[str, ...]:
    from certify.study.attack_curves import ATTACK_NAMES

    return ATTACK_NAMES


@click.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@dataset_option(required=True)
@click.option("--eps", "eps", default="0:0.014:15", show_default=True,
              help="eps grid (pixel units): start:stop:count (both ends included) or a list "
              "0,0.005,0.01.")
@click.option("--attack", type=RegistryChoice(RegistryNames(_attacks)), default="pgd",
              show_default=True, help="autoattack: worst case of APGD-CE, APGD-DLR, FAB and "
              "Square (needs `pip install --no-deps torchattacks`).")
@num_samples_option(default=500, what="Attack")
@click.option("--steps", type=int, default=40, show_default=True, help="PGD steps.")
@click.option("--restarts", type=int, default=1, show_default=True, help="PGD restarts.")
@click.option("--batch-size", type=int, default=256, show_default=True,
              help="Samples per attack batch (each batch seeded by its number; under torchrun "
              "the batches are split over the processes).")
@click.option("--label", "labels", multiple=True,
              help="Legend name per model, in order (default: file stems).")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False),
              default="reports/attack", show_default=True, help="Output folder.")
@device_option
@seed_option
@data_dir_option
@quiet_option
def attack(models: tuple[str, ...], dataset: str, eps: str, attack: str, n: int, steps: int,
           restarts: int, batch_size: int, labels: tuple[str, ...], out_dir: str, device: str,
           seed: int, data_dir: str | None, quiet: bool) -> None:
    """Accuracy under attack over an eps grid for every model, in one figure.

    Writes attack_curves.png (one curve per model), attack_curves.csv and attack_curves.json
    into the output folder, and prints the table.

    \b
    Example:
      certify attack models/teacher.pt models/student-pruned.pt --dataset svhn --eps 0:0.014:15
      certify attack models/*.pt --dataset digits --eps 0:0.2:11 --attack autoattack -o reports/aa
      torchrun --nproc_per_node=2 -m certify attack models/teacher.pt --dataset svhn \\
          --num-samples 10000
    """
    from certify._io import ensure_dir
    from certify.distributed import is_main
    from certify.study.attack_curves import parse_eps_grid, run_attack_curves

    grid = parse_eps_grid(eps)
    ensure_dir(out_dir)  # before any work: one line, not a traceback at the end
    result = run_attack_curves(list(models), dataset, grid, out_dir=out_dir, attack=attack,
                               n=n, steps=steps, restarts=restarts, labels=labels or None,
                               seed=seed, batch_size=batch_size, device=device,
                               data_dir=data_dir, quiet=quiet)
    if not is_main():  # under torchrun, rank 0 prints the gathered result
        return
    width = max(len(c.label) for c in result.curves)
    click.echo(f"{'eps':>{width}}  " + "  ".join(f"{e:>7.4g}" for e in result.curves[0].eps))
    for c in result.curves:
        click.echo(f"{c.label:>{width}}  " + "  ".join(f"{100 * a:>6.2f}%" for a in c.accuracy))
    click.echo(f"results in {out_dir}")
