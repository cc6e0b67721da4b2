"""The `sculpt` command, one module per command group: ``inspect_commands`` (inspect, passes),
``run_commands`` (run, compare), ``demo_command`` (demo), ``tvm_commands`` (targets, compile, verify,
bench); ``main`` builds the parser and keeps the error contract, ``common`` holds what they share."""

from sculpt.cli.common import check_number_flag, parse_input_shapes
from sculpt.cli.main import EXIT_INTERNAL_ERROR, EXIT_USER_ERROR, build_parser, main

__all__ = ["EXIT_INTERNAL_ERROR", "EXIT_USER_ERROR", "build_parser", "check_number_flag", "main",
           "parse_input_shapes"]
