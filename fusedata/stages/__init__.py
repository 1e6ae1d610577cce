"""The dataset stages (extract, align, fuse), one module each, on one contract (base.py).

From Python, a whole stage is one call, e.g. `run_stage(FuseStage(FuseJob(target, aligned, out)))`,
or `run_fuse(FuseJob(...))` for its manifest.
"""

from fusedata.stages.align import AlignConfig, AlignJob, AlignStage, run_align
from fusedata.stages.base import LocalExecutor, Resources, Stage, StageResult, Task, run_stage
from fusedata.stages.extract import ExtractConfig, ExtractJob, ExtractStage, run_extract
from fusedata.stages.fuse import FuseConfig, FuseJob, FuseStage, run_fuse

__all__ = [
    "AlignConfig", "AlignJob", "AlignStage", "ExtractConfig", "ExtractJob", "ExtractStage", "FuseConfig", "FuseJob",
    "FuseStage", "LocalExecutor", "Resources", "Stage", "StageResult", "Task", "run_align", "run_extract", "run_fuse",
    "run_stage",
]
