"""The tables and figures of the tuned-baselines benchmark, from its results JSON."""

from __future__ import annotations

import pathlib

import numpy as np

# ------------------------------------------------------------------------------ tables


def fmt_steps(stat: dict) -> str:
    """'mean ± ci' steps over seeds, or how many seeds reached the target."""
    if "mean" not in stat:
        return f"{stat['reached']}/{stat['n']} reached"
    return f"{stat['mean']:,.0f} ± {stat['ci95']:,.0f}"


def fmt_seconds(stat: dict) -> str:
    if "mean" not in stat:
        return f"{stat['reached']}/{stat['n']} reached"
    return f"{stat['mean']:.3f} ± {stat['ci95']:.3f}"


def fmt_loss(stat: dict) -> str:
    return f"{stat['mean']:.4g} ± {stat['ci95']:.2g}"


def fmt_ratio(ratio: dict | None) -> str:
    if ratio is None:
        return "–"
    return f"{ratio['geomean']:.2f} [{ratio['low']:.2f}, {ratio['high']:.2f}]"


def fmt_lr_range(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    low, high = min(values), max(values)
    return f"{low:.3g}" if np.isclose(low, high) else f"{low:.3g}–{high:.3g}"


def tables_markdown(results: dict) -> str:
    """The markdown tables of docs/reproduction.md for the sections in ``results``."""
    lines = []
    if "ethanol" in results:
        eth = results["ethanol"]
        N = eth["depth"]
        n_seeds = len(next(iter(eth["inits"].values()))["per_seed"])
        for init_name, rows in eth["summary"].items():
            lines += [
                f"#### Ethanol l4, init {init_name}: {n_seeds} seeds, {eth['steps']:,} steps",
                "",
                f"| method | us/step | stable lr edge | lr for T1 | steps to T1 | seconds to T1 "
                f"| steps to T1 / depth {N} | sooner than depth {N} | steps to T2 "
                f"| seconds to T2 | best final loss |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for label, row in rows.items():
                lines.append(
                    f"| {label} | {1e6 * eth['seconds_per_step'][label]:.0f} "
                    f"| {fmt_lr_range(row['edge_learning_rates'])} "
                    f"| {fmt_lr_range(row['T1']['learning_rates'])} "
                    f"| {fmt_steps(row['T1']['steps'])} | {fmt_seconds(row['T1']['seconds'])} "
                    f"| {fmt_ratio(row['T1']['steps_ratio_to_depth'])} "
                    f"| {row['T1']['seeds_sooner_than_depth']}/{row['T1']['steps']['n']} "
                    f"| {fmt_steps(row['T2']['steps'])} | {fmt_seconds(row['T2']['seconds'])} "
                    f"| {fmt_loss(row['best_final_loss'])} |"
                )
            lines.append("")
    if "mnist" in results and "modes" in results["mnist"]:
        mnist = results["mnist"]
        ats = [k.split("@")[1] for k in next(iter(mnist["modes"].values())) if
               k.startswith("steps_to_plain@")]  # fmt: skip
        lines += [
            f"#### MNIST CNN, momentum SGD (plain lr {mnist['learning_rates']['plain']:g}, "
            f"implicit lr {mnist['learning_rates']['implicit']:g})",
            "",
            "| mode | ms/step | final train loss | test accuracy | "
            + " | ".join(f"steps to plain@{a} | seconds to plain@{a}" for a in ats) + " |",
            "|---|---:|---:|---:|" + "---:|---:|" * len(ats),
        ]
        for name, row in mnist["modes"].items():
            lines.append(
                f"| {name} | {1e3 * row['seconds_per_step']:.0f} | {fmt_loss(row['final_loss'])} "
                f"| {fmt_loss(row['test_accuracy'])} | "
                + " | ".join(f"{fmt_steps(row[f'steps_to_plain@{a}'])} | "
                             f"{fmt_seconds(row[f'seconds_to_plain@{a}'])}" for a in ats)
                + " |"
            )
        grids = mnist["learning_rate_grids"]
        rates = sorted({float(lr) for grid in grids.values() for lr in grid})
        lines += ["", f"Learning-rate grids: final training loss (mean of the last 10% of steps), "
                  f"seed mean over seeds {', '.join(map(str, mnist['tune_seeds']))} "
                  f"(inf: diverged)", "",
                  "| learning rate | " + " | ".join(grids) + " |",
                  "|---:|" + "---:|" * len(grids)]  # fmt: skip
        for lr in rates:
            cells = []
            for grid in grids.values():
                finals = grid.get(f"{lr:g}", {})
                tuned = [finals[str(s)] for s in mnist["tune_seeds"] if str(s) in finals]
                cells.append(f"{np.mean(tuned):.4g}" if tuned else "–")
            lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
        lines.append("")
    if "fig5" in results:
        fig5 = results["fig5"]
        lines += [
            f"#### Deep linear networks on Ethanol l4, near-zero vs near-identity init "
            f"({len(next(iter(fig5['runs'].values()))['per_seed'])} seeds, "
            f"{fig5['steps']:,} steps)",
            "",
            "| init, depth | method | steps to depth-1 GD's final loss | best final loss "
            "| initial norm of w | initial delta (last pair) | max gap implicit vs explicit |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for name, block in fig5["summary"].items():
            imbalance = [v[-1] for v in block["imbalance"]]
            norms = block["initial_norm"]
            gaps = [g for g in block["implicit_vs_explicit_max_rel_loss_gap"] if g is not None]
            for label, row in block.items():
                if not isinstance(row, dict):
                    continue
                extra = ("| – | – | – |" if not label.startswith("explicit") else
                         f"| {min(norms):.2g}–{max(norms):.2g} "
                         f"| {min(imbalance):.2g}–{max(imbalance):.2g} "
                         f"| {100 * min(gaps):.1f}–{100 * max(gaps):.1f}% |")  # fmt: skip
                lines.append(f"| {name} | {label} | {fmt_steps(row['steps'])} "
                             f"| {fmt_loss(row['best_final_loss'])} {extra}")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ figures


def _save(fig, axes, path: pathlib.Path) -> str:
    """Grid and legend on every axis, then the figure to ``path`` (closed); the path."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot(results: dict, figures_dir: pathlib.Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if "ethanol" in results:
        eth = results["ethanol"]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
        for ax, (init_name, block) in zip(axes, eth["inits"].items(), strict=True):
            seed0 = block["per_seed"][0]
            for label, rec in seed0["methods"].items():
                curve = np.asarray(rec["best_final_curve"])
                ax.plot(np.arange(len(curve)) * rec["curve_stride"], curve,
                        label=f"{label} (lr {rec['best_final_learning_rate']:.2g})")  # fmt: skip
            for t, ls in (("T1", ":"), ("T2", "--")):
                ax.axhline(seed0["targets"][t], color="gray", linestyle=ls, linewidth=1)
            ax.set(yscale="log", xlabel="step", ylabel="training loss",
                   title=f"Ethanol l4, init {init_name}, seed {seed0['seed']}")  # fmt: skip
        written.append(_save(fig, axes, figures_dir / "tuned_ethanol.png"))
    if "fig5" in results:
        runs = results["fig5"]["runs"]
        kinds = ["near-zero", "near-identity"]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.3), sharey=True)
        for ax, kind in zip(axes, kinds, strict=True):
            color = 0
            for block in runs.values():
                if block["init"] != kind:
                    continue
                seed0 = block["per_seed"][0]
                for label, rec in seed0["methods"].items():
                    if label == "GD depth 1" and block["depth"] != min(
                            b["depth"] for b in runs.values()):
                        continue
                    curve = np.asarray(rec["best_final_curve"])
                    style = "--" if label.startswith("explicit") else "-"
                    ax.plot(np.arange(len(curve)) * rec["curve_stride"], curve, style,
                            color=f"C{color}", label=f"{label} (lr {rec['best_final_learning_rate']:.2g})")  # noqa: E501
                    color += 1
            ax.set(yscale="log", xlabel="step", ylabel="training loss",
                   title=f"Ethanol l4, deep linear net, {kind} init (seed 0)")  # fmt: skip
        written.append(_save(fig, axes, figures_dir / "fig5_init.png"))
    if "mnist" in results and "modes" in results["mnist"]:
        mnist = results["mnist"]
        fig, ax = plt.subplots(figsize=(7, 4.3))
        for name, row in mnist["modes"].items():
            curve = np.asarray(row["mean_curve"])
            steps = mnist["curve"]["window"] + np.arange(len(curve)) * mnist["curve"]["stride"]
            ax.plot(steps, curve, label=f"{name} ({len(row['seeds'])} seeds)")
        ax.set(yscale="log", xlabel="step", ylabel="training loss (100-step mean, seed mean)",
               title="MNIST CNN, momentum SGD, each at its best learning rate")  # fmt: skip
        written.append(_save(fig, [ax], figures_dir / "tuned_mnist.png"))
    return written


