"""A run's configuration, in three parts:

- options.py: every setting in one typed place (Config), what a run resolved at its start
  (Facts), the kinds of values and their checks, the exit codes, the resume rules;
- command_line.py: the one way the commands read a command line, and train.py's own, in groups;
- option_files.py: options files (--config) and run records read as a command line's defaults.

The names other modules use are here, so that they import `dist_resnet.config` alone.
"""

from dist_resnet.config.command_line import (CommandLine, DefaultsHelp, Parser, add_model_option, build_parser,
                                             launcher_problem,
                                             parse_config, rank_from_env, read_command_line, world_size_from_env)
from dist_resnet.config.option_files import NOT_REPEATED, RUN_RECORD, read_options_file
from dist_resnet.config.options import (ADDED_OPTIONS, BEST_METRICS, CHOICES, COMPILE_MODES, DEBUG_OVERRIDES,
                                        FAST_RECIPE, KINDS, MAX_DIST_TIMEOUT_S, MIXED_PRECISION,
                                        MUST_MATCH_ON_RESUME, NAME, PATH, RECORD_FORMAT, WIDTHS, Config, ExitCode,
                                        Facts, Kind, MissingPackage, from_values, positive, require,
                                        resume_mismatches)

__all__ = ["ADDED_OPTIONS", "BEST_METRICS", "CHOICES", "COMPILE_MODES", "DEBUG_OVERRIDES", "FAST_RECIPE", "KINDS",
           "MAX_DIST_TIMEOUT_S", "MIXED_PRECISION", "MUST_MATCH_ON_RESUME", "NAME", "NOT_REPEATED", "PATH",
           "RECORD_FORMAT", "RUN_RECORD", "WIDTHS", "CommandLine", "Config", "DefaultsHelp", "ExitCode", "Facts",
           "Kind", "MissingPackage", "Parser", "add_model_option", "build_parser", "from_values", "launcher_problem",
           "parse_config", "positive", "rank_from_env", "read_command_line", "read_options_file", "require",
           "resume_mismatches", "world_size_from_env"]
