"""Fine-tuning as a service: `colaft serve`, an OpenAI-shaped API over ColA training.

    client (openai package, httpx) -> api.py (FastAPI app; routers per resource in routes/;
                                               keys: auth.py; bodies: schemas.py)
      -> db.py (SQLAlchemy: users, files, jobs, events, checkpoints) + files on disk (files.py)
      -> scheduler.py: one Engine thread per base model, the scheduler; it holds
           host.py   the base model, its ColaModel and Trainer: every job is a user of them;
                     one mixed batch of all running jobs per step, fits on the configured backend
           store.py  the jobs' rows, events, checkpoints and results (database and disk)
           jobs.py   a running job in memory (Run), its adapters and fit settings
           fits.py   the channel of a job whose fits run on the user's device
           control.py  pausing and resuming jobs, unloading deleted models
      -> inference.py: completions on base and fine-tuned models and checkpoints, batched across adapters

`colaft serve` and `colaft users` (commands.py) start it and manage its keys (settings.py:
what the options set); launch.py starts a server process and waits until it is ready.
"""
