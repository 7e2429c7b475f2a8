"""Published reference tables and task metadata shipped as package data (JSON, each with its source).

- ``clip_ta8_tasks.json``: class names and prompt templates of the 8-task CLIP protocol;
- ``<suite>.<lineage>.json``: the published no-defense baselines a suite's `bench reproduce` gate
  checks against (format: `bench.reproduce.ReferenceTable`).
"""
