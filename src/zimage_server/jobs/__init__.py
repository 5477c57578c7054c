"""Async (Segmind v2) jobs: rows in the store, run on the engine, signed webhooks."""

from zimage_server.jobs.runner import JobRunner, Submission, owner_of, result_body
from zimage_server.jobs.states import JobStatus

__all__ = ["JobRunner", "JobStatus", "Submission", "owner_of", "result_body"]
