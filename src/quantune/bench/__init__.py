"""`quantune bench`: the benchmark tables side by side with the tools users pick instead, and the report.

One module per table (training, dit_training, files, inference, quality_ptq, quality_finetune), each runnable alone as
`python -m quantune.bench.NAME [--quick] --out DIR`; every variant inside a table runs in its own process.
"""

from quantune.bench.report import TABLES, check_readme, run_bench, update_readme, write_report

__all__ = ["TABLES", "check_readme", "run_bench", "update_readme", "write_report"]
