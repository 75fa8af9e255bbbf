"""OpenAI's fine-tuning dialect (`/v1/files`, `/v1/fine_tuning/jobs`): schemas and mappings
onto Tunery's datasets and jobs. The routes are in `api.routes.files` and
`api.routes.fine_tuning`."""
