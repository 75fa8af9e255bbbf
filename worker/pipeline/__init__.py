"""The training pipeline: `run_job` and the stages it calls, litgpt-recipe style.

Importing this package is cheap; the stages import torch and transformers themselves.
"""

from worker.pipeline.errors import PipelineError, TrainingStopped
from worker.pipeline.report import JobReporter, RecordingReporter

__all__ = ["JobReporter", "PipelineError", "RecordingReporter", "TrainingStopped"]
