"""Options files and run records as a command line's defaults: a YAML file of options
(`--config FILE`), or a run's record, config.json, to rerun a run or to continue it
(`--resume auto` into its --output-dir). Both come from elsewhere, so both are read as
untrusted: bounded, FIFO-safe, without YAML aliases, and every value checked as the command
line checks it."""

import argparse
import dataclasses
import json
import typing
from pathlib import Path

from dist_resnet import files
from dist_resnet.config.options import RECORD_FORMAT, Config, Facts, Kind, typed_value, require

# What a run's config.json says about where it ran, not what it trained: rerunning it from its
# record leaves these to the command line (a new --output-dir; the record's own --config file).
NOT_REPEATED = ("output_dir", "run_name", "resume", "overwrite", "config_file")
# A run's record in its output directory (rundir.RECORD): its options and facts.
RUN_RECORD = "config.json"


class _Lenient(argparse.ArgumentParser):
    """A parser that reads a few options ahead of the real one, and leaves every mistake to it."""

    def error(self, message):
        raise ValueError(message)


def typed_ahead(argv: list[str]) -> argparse.Namespace:
    """The few options read ahead of the rest, as typed on the command line (None: not typed):
    --config, --resume, --output-dir, --model. Every mistake is left to the real parser."""
    pre = _Lenient(add_help=False, allow_abbrev=False)
    for name in ("--config", "--resume", "--output-dir", "--model"):
        pre.add_argument(name)
    try:
        return pre.parse_known_args(argv)[0]
    except ValueError:  # the real parser says what is wrong
        return argparse.Namespace(config=None, resume=None, output_dir=None, model=None)


def options_file_in(argv: list[str]) -> tuple[str | None, str | None]:
    """(FILE, RECORD): the --config FILE of a command line, read ahead of the rest because its
    options become the defaults; or, for --resume auto into an --output-dir that holds a run,
    without --config, that run's record, so that a run continues with the options it was
    started with, without retyping them (those given again must agree: rundir.claim)."""
    known = typed_ahead(argv)
    if known.config or known.resume != "auto" or not known.output_dir:
        return known.config, None
    record = Path(known.output_dir) / RUN_RECORD
    return None, (str(record) if record.is_file() and not record.is_symlink() else None)


def read_options_file(path: str) -> dict:
    """The options of a YAML file, or of a run's config.json (its options, less NOT_REPEATED and
    the facts beside them): a mapping of option names to values, names with - or _."""
    text = _read_small_text(path)
    if Path(path).suffix == ".json":
        try:
            values = json.loads(text)
        except RecursionError:
            raise ValueError(f"nested more than {MAX_OPTIONS_NESTING} deep, as no options file is") from None
        except ValueError as err:
            raise ValueError(f"not JSON ({err})") from None
        if isinstance(values, dict) and "format" in values:  # a run record: options beside facts
            values = _record_options(values)
    else:
        values = _safe_yaml(text)
    if values is None:  # an empty YAML file
        values = {}
    if not isinstance(values, dict):
        raise ValueError("expected a mapping of option names to values")
    return {str(name).replace("-", "_"): value for name, value in values.items()}


MAX_OPTIONS_FILE_BYTES = 2**20  # a run's config.json has about 3 KB
MAX_OPTIONS_NESTING = 8  # options are values or lists of values; a record nests 4 deep


def _read_small_text(path: str) -> str:
    """The text of a regular file of at most MAX_OPTIONS_FILE_BYTES (files.read_checked: a FIFO
    or /dev/zero would hang or fill the memory); ValueError otherwise."""
    try:
        data = files.read_checked(path, MAX_OPTIONS_FILE_BYTES)
    except OSError as err:
        raise ValueError(f"cannot read it ({err.strerror or err})") from None
    try:
        return data.decode()
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 text ({err.reason} at byte {err.start})") from None


def _safe_yaml(text: str):
    """YAML's plain data, without aliases (a few hundred bytes of nested ones expand to
    gigabytes) and nested at most MAX_OPTIONS_NESTING deep (deeper overflows the composer's
    recursion); both are checked on the parser's events, before anything is built."""
    yaml = require("yaml", "--config FILE", "give a run's config.json instead")
    try:
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise ValueError(f"a YAML alias (*{event.anchor}) at line {event.start_mark.line + 1}; "
                                 "an options file has none: write the value out")
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_OPTIONS_NESTING:
                    raise ValueError(f"nested more than {MAX_OPTIONS_NESTING} deep at line "
                                     f"{event.start_mark.line + 1}, as no options file is")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"not valid YAML ({' '.join(str(err).split())})") from None


def _record_options(values: dict) -> dict:
    """The options of a run's config.json, which must be one this version writes: its format,
    no names but options and facts, every option (of its time) present and of its kind."""
    if values.get("format") != RECORD_FORMAT:
        raise ValueError(f"a run record of format {values.get('format')!r}; this version reads format {RECORD_FORMAT}")
    if {"step", "window", "config"} <= values.keys():
        raise ValueError("a checkpoint's meta.json, not a run's config.json: give the run's config.json "
                         "(beside its checkpoints/), or continue the checkpoint with --resume PATH")
    options = {f.name for f in dataclasses.fields(Config)}
    known = options | {f.name for f in dataclasses.fields(Facts)} | {"format", "run_id", "options_given"}
    unknown = sorted(map(str, values.keys() - known))
    if unknown:
        raise ValueError(f"unknown {', '.join(unknown)}: not an option or fact of a run record")
    # Config.from_dict gives options newer than the record the defaults its run had without them:
    # not left to a recipe, whose value for them may be another (--recipe fast's --adam-beta2).
    config = Config.from_dict({k: v for k, v in values.items() if k in options}, "the record")
    return {k: v for k, v in config.to_dict().items() if k not in NOT_REPEATED}


def checked_options(parser: argparse.ArgumentParser, values: dict) -> dict:
    """The options of an options file (read_options_file) as the parser's defaults, each checked
    as strictly as on the command line: an unknown name, or a value of the wrong type, kind or choice raises
    ValueError naming it."""
    actions = {action.dest: action for action in parser._actions}
    hints = typing.get_type_hints(Config)
    options = {}
    for name, value in values.items():
        if name not in hints or name not in actions or name == "config_file":
            raise ValueError(f"unknown option {name!r}")
        if name == "overwrite" and value is not False:  # a shared options file must not delete runs
            raise ValueError("overwrite: give --overwrite on the command line, not in an options file")
        action = actions[name]
        if isinstance(value, str) and callable(action.type):  # as on the command line: "32,64"
            try:
                value = action.type(value)
            except argparse.ArgumentTypeError as err:
                raise ValueError(f"{name}: {err}") from None
        value = typed_value(value, hints[name], name)
        if value is not None and isinstance(action.type, Kind) and not action.type.accepts(value):
            raise ValueError(f"{name}: expected {action.type.expected}, got {value!r}")
        if value is not None and action.choices and value not in action.choices:
            raise ValueError(f"{name}: expected one of {', '.join(map(str, action.choices))}, got {value!r}")
        options[name] = value
    return options
