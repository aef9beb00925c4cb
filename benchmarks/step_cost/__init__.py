"""Step cost of SRPO against GRPO (`trl.GRPOTrainer`) and TRL's SDPO (`trl.experimental.sdpo.SDPOTrainer`).

`harness.py` measures (method in its docstring and in `benchmarks/RESULTS.md`), `report.py` writes the tables and
the plot, `__main__.py` is the command line: `python -m benchmarks.step_cost --help`, from the repository root.
"""
