"""One file describes a whole fusion run: `fusedata run pipeline.toml` / `fusedata plan pipeline.toml`.

- config.py: the TOML file parsed into the stages' own job and config dataclasses;
- run.py: the steps in order, each skipped when done, damaged shards recomputed;
- plan.py: tokens, disk and time per step before running.
"""

from fusedata.dataset import verify_dataset
from fusedata.pipeline.config import Pipeline, load_pipeline
from fusedata.pipeline.plan import plan_pipeline, render_plan
from fusedata.pipeline.run import StepResult, run_pipeline

__all__ = ["Pipeline", "StepResult", "load_pipeline", "plan_pipeline", "render_plan", "run_pipeline",
           "verify_dataset"]
