"""Fine-tuning as a service: `colaft serve`, an OpenAI-shaped API over ColA training.

    client (openai package, httpx) -> api.py (FastAPI app; routers per resource in routes/;
                                               keys: auth.py; bodies: schemas.py)
      -> db.py (SQLAlchemy: users, files, jobs, events, checkpoints) + files on disk (files.py)
      -> scheduler.py: one Engine thread per base model; every job is a user of its
         ColaModel; one mixed batch of all running jobs per step through Trainer.step,
         fits on the configured backend; jobs.py: a job's admission, checkpoints,
         events and end
      -> inference.py: completions on base and fine-tuned models, batched across adapters

`colaft serve` and `colaft users` (commands.py) start it and manage its keys.
"""
