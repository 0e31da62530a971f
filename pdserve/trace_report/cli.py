"""`pdserve trace-report FILES`: per-phase latency of spans collected as OTLP JSON lines."""

import argparse
from pathlib import Path

from pdserve.command import Command


def _add_arguments(parser: argparse.ArgumentParser, _model_dir: Path) -> None:
    parser.add_argument("files", nargs="+", type=Path,
                        help="JSON lines of OTLP ExportTraceServiceRequest (the OTel Collector's file exporter)")


def _run(args, _) -> int:
    from pdserve.trace_report.report import report_files

    print(report_files(args.files))
    return 0


COMMAND = Command("trace-report", "per-phase latency (p50/p99) of spans in OTLP JSON-lines files", _add_arguments,
                  _run)
