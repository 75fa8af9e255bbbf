"""The checks a job's payload passes before it is queued, and the dry run's report.

`POST /v1/finetune/llm` reads its body through `Preflight` (`checks`): the schema section by
section (`body`), the operator limits, the model (`model`), the dataset (`dataset`), the
resume source, and the steps the run would train (`plan`). One 422 names every problem found.
`?dry_run=true` also asks the hub whether hub ids exist (`hub`) and answers with the report
instead of queueing.
"""
