"""Analysis of wartok runs: read result files into one table, write paper tables and figures.

`analysis/` reads what runs wrote (result.json through the schema in `wartok/results.py`,
scalars.jsonl, sweep.json, an Optuna storage) and imports nothing else from the package.
It is a plain folder package, not installed by pip: run its scripts from the project root
(`python analysis/make_tables.py ...`, which puts the project root on sys.path itself) or
import it with the project root on sys.path (the tests and notebooks do that).
"""
