"""The API's routers, one per resource: files, fine-tuning jobs (and pausing them), client fits,
inference (the model list and completions), models by id, the dashboard.

colaft.serve.api assembles them into the app; common.py holds what they share (the
service, the caller, errors in OpenAI's shape, ownership checks, cursor pages).
"""
