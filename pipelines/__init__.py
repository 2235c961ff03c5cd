"""Task families: procedural ones and few-shot image data sets imported to Parquet."""

from pipelines.base import Task, TaskBatch, TaskFamily, task_seed

__all__ = ["Task", "TaskBatch", "TaskFamily", "task_seed"]
