"""The tables and figures of ``benchmarks/reproduce_paper.py``, from its results."""

from __future__ import annotations

import pathlib

import numpy as np

from paper_sections import MNIST_SMOOTHING

# ------------------------------------------------------------------------------ output


def _fmt_steps(steps) -> str:
    return "not reached" if steps is None else f"{steps:,}"


def tables_markdown(results: dict, runs: dict) -> str:
    """The markdown tables of every section in ``results``; ``runs`` made each section."""
    lines = []
    for name, section in results.get("regression", {}).items():
        steps = runs["regression"]["config"]["steps"]  # the horizon of that section's run
        lines += [
            f"### Ethanol {name} (target = best depth-1 GD loss at step {steps:,}: "
            f"{section['target']:.6g})",
            "",
            "| method | best lr | final loss | steps to target | fastest on grid |",
            "|---|---:|---:|---:|---:|",
        ]
        for label, s in section["methods"].items():
            lines.append(
                f"| {label} | {s['learning_rate']:.3g} | {s['final_loss']:.6g} | "
                f"{_fmt_steps(s['steps_to_target'])} | "
                f"{_fmt_steps(s['fastest_steps_to_target_any_lr'])} |"
            )
        lines += [
            "",
            "Explicit balanced depth-N networks (GD on the factors) vs the implicit rule, same lr:",
            "",
            "| depth | lr | explicit final loss | implicit final loss | max rel. gap of W_e |",
            "|---|---:|---:|---:|---:|",
        ]
        for depth, v in section["validation"].items():
            lines.append(
                f"| {depth} | {v['learning_rate']:.3g} | {v['explicit_final_loss']:.6g} | "
                f"{v['implicit_final_loss']:.6g} | {v['max_relative_gap']:.2e} |"
            )
        lines.append("")
    for name, rows in results.get("seeds", {}).items():
        depths = [k for k in rows[0] if k.startswith("depth ") and k != "depth 1"]
        lines += [
            f"### Ethanol {name}: steps to the depth-1 target, per init seed",
            "",
            "| seed | target | depth-1 lr | " + " | ".join(depths) + " |",
            "|---" * (3 + len(depths)) + "|",
        ]
        for row in rows:
            lines.append(
                f"| {row['seed']} | {row['target']:.5g} | {row['depth 1']['learning_rate']:.3g} | "
                + " | ".join(_fmt_steps(row[d]["steps_to_target"]) for d in depths)
                + " |"
            )
        lines.append("")
    if "mnist" in results:
        mnist = results["mnist"]
        lines += [
            f"### MNIST CNN ({mnist['data']['train']:,} train / {mnist['data']['test']:,} test "
            "digits)",
            "",
            f"Smoothed loss: the trailing {MNIST_SMOOTHING}-step mean of the minibatch training "
            "loss. \"Steps to plain@k\": steps until a run's smoothed loss first reaches the "
            "plain run's smoothed loss after k steps.",
            "",
        ]
        for config_name, config in mnist["configs"].items():
            ats = list(config["targets"])
            lines += [
                f"**{config_name}** (lr {config['learning_rate']:g}):",
                "",
                "| run | train loss (last 10% of steps) | "
                + " | ".join(f"steps to plain@{at}" for at in ats)
                + " | test accuracy | test loss | seconds |",
                "|---|---:|" + "---:|" * len(ats) + "---:|---:|---:|",
            ]
            for run_name, run in config["runs"].items():
                lines.append(
                    f"| {run_name} | {run['final_train_loss']:.4f} | "
                    + " | ".join(_fmt_steps(run["steps_to_plain_loss_at"][at]) for at in ats)
                    + f" | {run['test_accuracy']:.4f} | {run['test_loss']:.4f} | "
                    f"{run['seconds']:.0f} |"
                )
            lines.append("")
    return "\n".join(lines)


def plot_figures(results: dict, args) -> list[str]:
    """Draws every figure of the sections in ``results`` into --figures-dir; returns paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = pathlib.Path(args.figures_dir)
    figures.mkdir(parents=True, exist_ok=True)
    written = []
    regression = results.get("regression", {})

    def loss_axes(ax, title, ylabel="training loss"):
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)

    def save(fig, name):
        fig.tight_layout()
        path = figures / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))

    def curve_axes(ax, section, labels, title):
        for label in labels:
            s = section["methods"][label]
            steps = np.arange(len(s["curve"])) * s["curve_stride"]
            ax.plot(steps, s["curve"], label=f"{label} (lr {s['learning_rate']:.2g})")
        ax.axhline(section["target"], color="gray", linestyle=":", linewidth=1)
        loss_axes(ax, title)

    if regression:
        names = list(regression)
        panels = [
            ("depth", lambda: ["GD depth 1"] + [f"implicit depth {N}" for N in args.depths]),
            (
                "adaptive",
                lambda: (
                    ["GD depth 1", "AdaGrad depth 1", "AdaDelta depth 1", "Adam depth 1"]
                    + [
                        f"implicit depth {args.depths[-1]}",
                        f"Adam + implicit depth {args.depths[-1]}",
                    ]
                ),
            ),
            (
                "init",
                lambda: (
                    ["GD depth 1", "GD depth 1, near-zero init"]
                    + [f"implicit depth {N}, near-zero init" for N in args.depths]
                    + [f"explicit depth {N}, near-zero factors" for N in args.depths]
                ),
            ),
        ]
        for panel, labels in panels:
            fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.3), squeeze=False)
            for ax, name in zip(axes[0], names, strict=True):
                curve_axes(ax, regression[name], labels(), f"Ethanol {name} ({panel})")
            save(fig, f"ethanol_{panel}.png")
        # Validation: explicit vs implicit trajectories.
        fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.3), squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            for i, (depth, v) in enumerate(regression[name]["validation"].items()):
                steps = np.arange(len(v["explicit_curve"])) * v["curve_stride"]
                ax.plot(steps, v["implicit_curve"], color=f"C{i}", label=f"implicit {depth}")
                ax.plot(
                    steps, v["explicit_curve"], color=f"C{i}", linestyle="--",
                    label=f"explicit {depth} (balanced init)",
                )  # fmt: skip
            loss_axes(ax, f"Ethanol {name}: explicit nets vs implicit rule")
        save(fig, "ethanol_validation.png")
    if "mnist" in results:
        configs = results["mnist"]["configs"]
        cols = min(2, len(configs))
        rows = -(-len(configs) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
        for ax in axes.flat[len(configs):]:
            ax.set_visible(False)
        for ax, (config_name, config) in zip(axes.flat, configs.items(), strict=False):
            for run_name, run in config["runs"].items():
                window, stride = run["smoothing_window"], run["smoothed_stride"]
                steps = window + np.arange(len(run["smoothed_train_loss"])) * stride
                ax.plot(steps, run["smoothed_train_loss"], label=run_name)
            for target in config["targets"].values():
                ax.axhline(target, color="gray", linestyle=":", linewidth=1)
            loss_axes(
                ax,
                f"MNIST CNN: {config_name}, lr {config['learning_rate']:g}",
                f"training loss ({window}-step trailing mean)",
            )
        save(fig, "mnist_cnn_loss.png")
    return written


