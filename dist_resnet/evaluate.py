"""Evaluate saved weights on their data set's test split: the classification report and plots
that training writes, from a run directory, a checkpoint or a weights file.

    python dist_resnet/evaluate.py runs/NAME                 # or accelerate launch ...
    python dist_resnet/evaluate.py runs/NAME/checkpoints/step-00000120 --output-dir eval/

The data set, test split, batch size and precision default to the run's own, read from the
run it was given (its config.json, or a checkpoint's meta.json) or from the weights file, so
the report is the training report.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from dist_resnet import batches, checkpoint, cli, data, datasets, distributed, recipe, report, rundir
from dist_resnet.config import (MIXED_PRECISION, WIDTHS, Config, Parser, add_model_option, launcher_problem, positive,
                                rank_from_env)
from dist_resnet.model import WeightsError, io_shape, load_model
from dist_resnet.runs import Source, find_source

PROG = "dist_resnet/evaluate.py"


@dataclass(frozen=True)
class Options:
    weights: Path
    dataset: str | None
    data_dir: str | None
    test_limit: int | None
    batch_size: int | None  # per process
    mixed_precision: str | None
    output_dir: Path | None
    cpu: bool
    model: str | None = None


def parse_args(argv: list[str] | None = None) -> Options:
    parser = Parser(PROG, __doc__.split("\n\n")[0])
    parser.add_argument("weights", type=Path,
                        help="a run's output directory, a checkpoint directory, or a model.safetensors file")
    parser.add_argument("--dataset", choices=list(datasets.DATASETS),
                        help="default: the run's, else the one the weights file names, else mnist")
    parser.add_argument("--data-dir", help="default: the run's, else ./data")
    parser.add_argument("--test-limit", type=positive(int), help="default: the run's (all test images)")
    parser.add_argument("--batch-size", type=positive(int), help="per process; default: the run's")
    parser.add_argument("--mixed-precision", choices=MIXED_PRECISION,
                        help="default: the run's, so the report matches training's")
    parser.add_argument("--output-dir", type=Path,
                        help="default: eval/ in the run's directory (eval/step-N for a checkpoint)")
    parser.add_argument("--cpu", action="store_true")
    add_model_option(parser)
    options = Options(**vars(parser.parse_args(argv)))
    problem = launcher_problem()  # evaluate.py runs under a launcher too
    if problem:
        parser.error(problem)
    return options


def read_weights(path: Path, model_given: str | None = None):
    """(source, model, what its weights file says it was trained on) for `path`. A run's newest
    checkpoint can be deleted while it is read (the running run writes a newer one and deletes
    the oldest): then the run's newest checkpoint is read again."""
    for attempt in range(3):
        try:
            source = find_source(path)
            model = load_model(source.weights, WIDTHS.accepts, model_given)
            return source, model, datasets.card_spec(source.weights, model)
        except (WeightsError, checkpoint.CheckpointError):
            unfinished_run = (path / rundir.RECORD).is_file() and not (path / "model.safetensors").exists()
            if attempt == 2 or not unfinished_run:
                raise


def test_split(options: Options, source: Source, model, card):
    """The test split the weights are evaluated on: the run's data set, size and
    normalisation (else what the weights file says, card), checked against the model."""
    config = source.config
    name = options.dataset or (config.dataset if config else card.name if card else "mnist")
    if card and card.name != name:
        raise WeightsError(f"{source.weights} was trained on {card.name}, not --dataset {name}")
    image_size = config.image_size if config else None
    data_options = datasets.Options(options.data_dir or source.data_dir, image_size=image_size)
    mean, std = (config.mean, config.std) if config else (card.mean, card.std) if card else (None, None)
    test = datasets.open_test(name, data_options, options.test_limit or source.test_limit,
                              mean and tuple(mean), std and tuple(std))
    spec, (channels, classes) = test.spec, io_shape(model)
    channels, classes = channels or spec.channels, classes or len(spec.class_names)  # None: not told apart
    if channels != spec.channels or classes != len(spec.class_names):
        raise WeightsError(f"{source.weights}: a model of {channels} channel(s) and "
                           f"{classes} classes does not fit {name} ({spec.channels} channel(s), "
                           f"{len(spec.class_names)} classes)")
    if card and card.class_names != spec.class_names:
        raise WeightsError(f"{source.weights}: trained on the classes {', '.join(card.class_names[:5])}..., "
                           f"not those in {data_options.data_dir} ({', '.join(spec.class_names[:5])}...)")
    return test


@cli.interruptible(PROG)
def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        source, model, card = read_weights(options.weights, options.model)
        accelerator = distributed.setup(cpu=options.cpu, timeout_s=Config.dist_timeout,
                                        mixed_precision=options.mixed_precision or source.mixed_precision)
    except cli.USER_ERROR_TYPES as err:
        return cli.fail(PROG, err, show=rank_from_env() == 0)
    say = lambda message: distributed.print_main(accelerator, message)  # noqa: E731
    try:
        if source.note:
            say(source.note)
        model = model.to(accelerator.device)
        test = test_split(options, source, model, card)
        path, _ = batches.choose_path("auto", len(test) * test.spec.image_bytes, accelerator.device,
                                   int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        test = data.source(test, path, accelerator.device, workers=0)
        result = recipe.evaluate(model, test, accelerator, options.batch_size or source.batch_size)
        output_dir = options.output_dir or source.output_dir
        if rundir.holds_run(output_dir):  # its report and plots are the training run's
            raise rundir.RunDirError(f"--output-dir {output_dir} holds a training run: write the evaluation "
                                     "into its eval/ (the default) or another directory")
        if accelerator.is_main_process:
            plots = report.Plots(output_dir, say=say)
            try:
                output_dir.mkdir(parents=True, exist_ok=True)
                plots.draw(result, test.host_images, records=None, final=True)  # drawn while the report is written
                text, _ = report.write_report(result, output_dir)
            except OSError as err:
                raise rundir.CannotWrite(f"cannot write the report in {output_dir} ({err.strerror or err})") from None
            finally:
                plots.close()
            say(text)
            say(f"accuracy {result.accuracy:.4f} on {len(result.labels)} test images; report and plots in {output_dir}")
    except cli.USER_ERROR_TYPES as err:
        return cli.fail(PROG, err, show=accelerator.is_main_process)
    finally:
        distributed.teardown(accelerator)
    return 0


if __name__ == "__main__":
    cli.end(main())
