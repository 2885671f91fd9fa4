"""The speedup report: eager, plain torch.compile and fv_compile with each attention backend,
measured in one run on the user's model and device, speed always beside accuracy.

    report = run_report(ReportConfig(model="wan-tiny", backends=["auto"]))
    write_report(report, "fv-report")

`fv-compile report` is the command-line front end (fv_compile/cli.py).
"""

from fv_compile.report.render import render_markdown, write_report
from fv_compile.report.run import Report, ReportConfig, run_report
from fv_compile.report.variants import VariantResult, parse_backends
from fv_compile.report.workload import WorkloadError

__all__ = [
    "Report",
    "ReportConfig",
    "VariantResult",
    "WorkloadError",
    "parse_backends",
    "render_markdown",
    "run_report",
    "write_report",
]
