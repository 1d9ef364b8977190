"""Summarise many runs (the tasks of a Slurm job array, seeds, a grid of options): for each
group of runs that trained the same thing but for the seed, the mean, standard deviation,
minimum and maximum of the final test accuracy, the time to the final evaluation and the
training throughput, as Markdown, JSON and a plot.

    python -m dist_resnet.summarize runs/array-1234-* --output-dir runs/array-1234-summary

A run directory that is missing, unfinished (no final report: still running, stopped, failed)
or damaged is listed with the reason and left out of the statistics, never a crash.
"""

import io
import json
import math
import os
import statistics
import sys
import textwrap
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from dist_resnet import cli, files, rundir
from dist_resnet.config import MUST_MATCH_ON_RESUME, PATH, ExitCode, MissingPackage, Parser, require

PROG = "dist_resnet/summarize.py"
REPORT = "classification_report.json"  # written after the final evaluation: its presence means done
# What a group shares: every option that decides what is trained, except the seed, and the
# number of processes (on CPU it changes the BatchNorm statistics).
GROUP_BY = tuple(name for name in MUST_MATCH_ON_RESUME if name != "seed")
MEASURES = {"test_acc": "test accuracy", "time_to_final_eval_s": "time to final evaluation (s)",
            "images_per_s": "images/s (median of the loss reports)"}


class NothingToSummarise(Exception):
    """No run directory given holds a finished run."""


@dataclass
class RunResult:
    path: str
    status: str  # done | unfinished | missing | damaged
    reason: str = ""
    run_name: str | None = None
    group: dict | None = None  # GROUP_BY option -> value, and world_size
    seed: int | None = None
    test_acc: float | None = None
    time_to_final_eval_s: float | None = None
    images_per_s: float | None = None


def read_run(directory: Path) -> RunResult:
    """What one run directory says about its run; why not, for one that has no result. Every
    file is checked before it is read (a FIFO or a directory where a file belongs would hang
    or fail) and every field it gives is checked before it is used: a damaged run is left out
    with its reason, never a crash."""
    if not directory.is_dir():
        return RunResult(str(directory), "missing", "no such directory (the task never started?)")
    try:
        record = rundir.RunRecord.read(directory)
    except rundir.RunDirError as err:
        return RunResult(str(directory), "damaged" if os.path.lexists(directory / rundir.RECORD) else "missing", str(err))
    config = record.config
    group = {name: getattr(config, name) for name in GROUP_BY} | {"world_size": record.facts.world_size}
    result = RunResult(str(directory), "unfinished", run_name=config.run_name, group=group, seed=config.seed)
    try:
        steps, speeds = _training_log(directory / "metrics.jsonl")
        report = directory / REPORT
        if not os.path.lexists(report):
            result.reason = (f"no final report; its metrics end at step {steps[-1]}" if steps else
                             "no final report and no training step logged") + " (still running, stopped or failed)"
            return result
        result.test_acc = _accuracy(report)
        # Wall time from the run's start to its final report: for a resumed run, pauses included.
        try:
            started = datetime.strptime(record.facts.started, "%Y-%m-%dT%H:%M:%S%z").timestamp()
        except ValueError:
            raise Damaged(f"{directory / rundir.RECORD}: started {record.facts.started[:40]!r} is not a time "
                          "of the form 2026-01-31T12:00:00+0000") from None
        result.time_to_final_eval_s = report.stat().st_mtime - started
        if result.time_to_final_eval_s < 0:
            raise Damaged(f"{report} is older than the run's start ({record.facts.started})")
    except Damaged as err:
        return RunResult(str(directory), "damaged", str(err), config.run_name, group, config.seed)
    result.images_per_s = statistics.median(speeds) if speeds else None
    result.status = "done"
    return result


class Damaged(Exception):
    """A run file that cannot be what the run wrote; the message says which and why."""


MAX_REPORT_BYTES = 2**24  # the report of 100,000 classes


def _accuracy(report: Path) -> float:
    try:
        accuracy = json.loads(files.read_checked(report, MAX_REPORT_BYTES, links=False).decode())["accuracy"]
    except files.NotReadable as err:
        raise Damaged(f"{report}: {err}") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError) as err:
        raise Damaged(f"{report}: unreadable ({type(err).__name__}: {' '.join(str(err).split())[:80]})") from None
    if type(accuracy) not in (int, float) or not 0 <= accuracy <= 1:
        raise Damaged(f"{report}: accuracy {str(accuracy)[:40]!r} is not a number from 0 to 1")
    return float(accuracy)


def _training_log(path: Path) -> tuple[list[int], list[float]]:
    """The steps and the images/s of metrics.jsonl's training records, read a line at a time
    (files.jsonl_records: a long run's log is never held whole). A line cut short by a crash is
    skipped; a training record whose fields are not what a run writes is damage."""
    steps, speeds = [], []
    try:
        for number, (_, record) in enumerate(files.jsonl_records(path), 1):
            if record is None or record.get("event") != "train":
                continue
            step, speed = record.get("step"), record.get("images_per_s")
            if type(step) is not int or step < 0:
                raise Damaged(f"{path}: record {number}: a training record whose step is {str(step)[:40]!r}")
            if speed is not None and not (type(speed) in (int, float) and 0 <= speed < math.inf):
                raise Damaged(f"{path}: record {number}: images_per_s {str(speed)[:40]!r} is not a number >= 0")
            steps.append(step)
            if speed is not None:
                speeds.append(float(speed))
    except files.NotReadable as err:
        raise Damaged(f"{path}: {err}") from None
    except OSError as err:
        raise Damaged(f"{path}: unreadable ({err.strerror or err})") from None
    return steps, speeds


def describe(values: list[float]) -> dict:
    """n, mean, sample standard deviation (None for one value), min and max."""
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values)}


def summarise(results: list[RunResult]) -> list[dict]:
    """One entry per group of finished runs, in the order of their first run."""
    groups: dict[str, list[RunResult]] = {}
    for result in results:
        if result.status == "done":
            groups.setdefault(json.dumps(result.group, sort_keys=True), []).append(result)
    varying = _varying([json.loads(key) for key in groups])
    summary = []
    for key, members in groups.items():
        group = json.loads(key)
        label = ", ".join(f"{name} {_text(group[name])}" for name in varying) or "all runs"
        stats = {measure: describe(values) for measure in MEASURES
                 if (values := [getattr(r, measure) for r in members if getattr(r, measure) is not None])}
        seeds = [r.seed for r in members]
        # The same seed twice is the same run twice (bitwise, on a CPU): it counts twice and
        # understates the spread. Said, not dropped: the user chose these directories.
        duplicates = {str(seed): [r.path for r in members if r.seed == seed]
                      for seed in sorted(set(seeds)) if seeds.count(seed) > 1}
        summary.append({"label": label, "group": group, "seeds": sorted(seeds),
                        "runs": [r.path for r in members], "duplicate_seeds": duplicates, **stats})
    return summary


def _text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _varying(groups: list[dict]) -> list[str]:
    """The options whose values differ between groups: what names each group."""
    return [name for name in (groups[0] if groups else {}) if len({json.dumps(g[name]) for g in groups}) > 1]


def markdown(summary: list[dict], results: list[RunResult]) -> str:
    lines = ["| group | runs | " + " | ".join(f"{title}: mean ± std [min, max]" for title in MEASURES.values()) + " |",
             "|---|---:|" + "---|" * len(MEASURES)]
    for entry in summary:
        cells = []
        for measure in MEASURES:
            stats = entry.get(measure)
            digits = 4 if measure == "test_acc" else 1
            cells.append("n/a" if stats is None else
                         f"{stats['mean']:.{digits}f} ± " + ("n/a" if stats["std"] is None else f"{stats['std']:.{digits}f}")
                         + f" [{stats['min']:.{digits}f}, {stats['max']:.{digits}f}]")
        lines.append(f"| {entry['label']} | {entry['test_acc']['n']} | " + " | ".join(cells) + " |")
    repeated = [(entry["label"], seed, paths) for entry in summary for seed, paths in entry["duplicate_seeds"].items()]
    if repeated:
        lines += ["", "The same seed more than once in a group (the same run repeated: counted each time, "
                  "so the spread is understated):", ""]
        lines += [f"- {label}: seed {seed}: " + ", ".join(f"`{path}`" for path in paths)
                  for label, seed, paths in repeated]
    left_out = [r for r in results if r.status != "done"]
    if left_out:
        lines += ["", f"Left out ({len(left_out)} of {len(results)} runs):", ""]
        lines += [f"- `{r.path}`: {r.status}: {r.reason}" for r in left_out]
    return "\n".join(lines) + "\n"


LABEL_WIDTH = 22  # characters a line of a group's label below its column


def wrapped(label: str) -> str:
    """A group's label over lines of about LABEL_WIDTH characters, broken between its options
    (and within one only when it is longer than a line), so that no label runs off the plot."""
    lines: list[str] = []
    parts = label.split(", ")
    for i, part in enumerate(parts):
        pieces = textwrap.wrap(part + ("," if i < len(parts) - 1 else ""), LABEL_WIDTH) or [""]
        if lines and len(lines[-1]) + 1 + len(pieces[0]) <= LABEL_WIDTH:
            lines[-1] += " " + pieces.pop(0)
        lines += pieces
    return "\n".join(lines)


def plot(summary: list[dict], results: list[RunResult]) -> bytes:
    """summary.png: figure()'s drawing."""
    buffer = io.BytesIO()
    figure(summary, results).savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def figure(summary: list[dict], results: list[RunResult]):
    """Each finished run's test accuracy, one column per group, with the group's mean ± std,
    each column named by its wrapped label."""
    require("matplotlib", "the summary plot", "read summary.md and summary.json, which are written without it")
    # matplotlib's Agg canvas directly, never pyplot (as plots.py, and for its reasons).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    labels = [wrapped(entry["label"]) for entry in summary]
    label_lines = max(label.count("\n") + 1 for label in labels)
    figure = Figure(figsize=(max(4.0, 2.0 * len(summary)), 3.2 + 0.18 * label_lines))
    ax = figure.add_subplot()
    by_path = {r.path: r for r in results}
    for x, entry in enumerate(summary):
        accuracies = [by_path[path].test_acc for path in entry["runs"]]
        ax.scatter([x] * len(accuracies), accuracies, color="tab:blue", alpha=0.6, zorder=2)
        stats = entry["test_acc"]
        ax.errorbar(x + 0.15, stats["mean"], yerr=stats["std"] or 0, fmt="o", color="black", capsize=4, zorder=3)
    ax.set_xticks(range(len(summary)), labels, fontsize=8)
    ax.set_xlim(-0.5, len(summary) - 0.5)
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))  # percentages, as every other plot
    ax.set_ylabel("final test accuracy")
    repeated = any(entry["duplicate_seeds"] for entry in summary)
    ax.set_title(f"{sum(e['test_acc']['n'] for e in summary)} runs (dots), mean ± std (bars)"
                 + ("; a seed repeated in a group (summary.md)" if repeated else ""), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    FigureCanvasAgg(figure)
    figure.tight_layout()
    return figure


def build_parser() -> Parser:
    p = Parser(PROG, "Summarise finished runs: mean, std, min and max of the final test accuracy, the "
               "time to the final evaluation and images/s, per group of runs that differ only in the seed.")
    p.add_argument("run_dirs", nargs="+", type=PATH, metavar="RUN_DIR", help="output directories of runs")
    p.add_argument("--output-dir", type=PATH, default="summary",
                   help="where summary.md, summary.json and summary.png go")
    return p


@cli.interruptible(PROG)
def main(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    results = [read_run(Path(path)) for path in options.run_dirs]
    summary = summarise(results)
    output_dir = Path(options.output_dir)
    try:
        if not summary:
            raise NothingToSummarise(f"none of the {len(results)} run directories holds a finished run: "
                                     + "; ".join(f"{r.path}: {r.status}" for r in results))
        text = markdown(summary, results)
        output_dir.mkdir(parents=True, exist_ok=True)
        files.write_atomic(output_dir / "summary.md", text)
        files.write_atomic(output_dir / "summary.json", json.dumps(
            {"groups": summary, "runs": [asdict(r) for r in results]}, indent=1) + "\n")
        try:
            files.write_atomic(output_dir / "summary.png", plot(summary, results))
        except MissingPackage as err:
            print(f"{PROG}: warning: no summary.png: {err}", file=sys.stderr)
    except NothingToSummarise as err:
        return cli.fail(PROG, err, code=ExitCode.BAD_INPUT)
    except OSError as err:
        return cli.fail(PROG, f"cannot write in {output_dir} ({err.strerror or err})", code=ExitCode.CANNOT_WRITE)
    print(text + f"\nwritten: {output_dir / 'summary.md'}, summary.json, summary.png", end="\n")
    return ExitCode.OK


if __name__ == "__main__":
    cli.end(main())
