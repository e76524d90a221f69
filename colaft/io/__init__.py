"""Persistence: everything colaft writes to disk or sends as bytes, read back with checks.

    files     atomic folders and files (a crash never leaves a half-written one)
    tensors   nested states (optimizer, scheduler) as JSON + safetensors, no pickle
    adapters  every user's adapters and ColaConfig (the ColaModel's save/load)
    state     a trainer's and one owner's resumable state (bit-for-bit resume)
    peft      PEFT LoRA export and import

Nothing here imports colaft.model: the model calls in, handing itself over (see
ARCHITECTURE.md, "Layers").
"""
